//! Shared pieces of the end-to-end tests: a deterministic chat workload and an independent model of what a
//! restored conversation must look like, single test events, and signed webhook requests.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};

use chatvault_config::Config;
use chatvault_core::event::{EventLimits, validate_and_complete};
use chatvault_proto::v1::{ChatEvent, EventKind, Sender, Source};

/// A small deterministic pseudo-random generator (xorshift), so workloads are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub const BASE_MICROS: i64 = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z

/// Generates chat activity: messages (some in threads, some ~500 bytes), edits, deletions, reactions and
/// membership, across `tenants` × `conversations_per_tenant`, with timestamps spanning two UTC days and a
/// send order that is not the time order.
pub fn workload(
    seed: u64,
    tenants: &[&str],
    conversations_per_tenant: usize,
    events_per_conversation: usize,
) -> Vec<ChatEvent> {
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    for tenant in tenants {
        for conversation_index in 0..conversations_per_tenant {
            let conversation = format!("C{conversation_index:03}-{tenant}");
            let mut messages: Vec<String> = Vec::new();
            let mut time = BASE_MICROS + rng.below(3_600) as i64 * 1_000_000;
            for step in 0..events_per_conversation {
                time += 1_000_000 + rng.below(40_000_000) as i64;
                let user = format!("U{}", rng.below(6));
                let sender = Some(Sender {
                    id: user.clone(),
                    display_name: format!("user {user}"),
                    is_bot: false,
                });
                let base = ChatEvent {
                    tenant_id: tenant.to_string(),
                    workspace_id: format!("W-{tenant}"),
                    conversation_id: conversation.clone(),
                    occurred_at_micros: time,
                    sender,
                    ..Default::default()
                };
                let roll = rng.below(100);
                let event = if messages.is_empty() || roll < 55 {
                    let message_id = format!("{conversation}-m{step}");
                    let thread_id = if !messages.is_empty() && rng.chance(30) {
                        messages[rng.below(messages.len() as u64) as usize].clone()
                    } else {
                        String::new()
                    };
                    messages.push(message_id.clone());
                    let filler = "lorem ipsum dolor sit amet ".repeat(1 + rng.below(18) as usize);
                    ChatEvent {
                        kind: EventKind::MessageCreated as i32,
                        message_id,
                        thread_id,
                        text: format!("message {step} of {conversation}: {filler}"),
                        mentions: if rng.chance(20) {
                            vec![format!("U{}", rng.below(6))]
                        } else {
                            vec![]
                        },
                        raw_payload: format!("{{\"step\":{step}}}").into_bytes(),
                        raw_content_type: "application/json".into(),
                        ..base
                    }
                } else if roll < 70 {
                    let target = messages[rng.below(messages.len() as u64) as usize].clone();
                    ChatEvent {
                        kind: EventKind::MessageEdited as i32,
                        message_id: target,
                        text: format!("edited at step {step}"),
                        ..base
                    }
                } else if roll < 77 {
                    let target = messages[rng.below(messages.len() as u64) as usize].clone();
                    ChatEvent {
                        kind: EventKind::MessageDeleted as i32,
                        message_id: target,
                        ..base
                    }
                } else if roll < 92 {
                    let target = messages[rng.below(messages.len() as u64) as usize].clone();
                    let kind = if rng.chance(70) {
                        EventKind::ReactionAdded
                    } else {
                        EventKind::ReactionRemoved
                    };
                    ChatEvent {
                        kind: kind as i32,
                        message_id: target,
                        reaction: ["thumbsup", "eyes", "tada"][rng.below(3) as usize].into(),
                        ..base
                    }
                } else {
                    let kind = if rng.chance(60) {
                        EventKind::MemberJoined
                    } else {
                        EventKind::MemberLeft
                    };
                    ChatEvent {
                        kind: kind as i32,
                        ..base
                    }
                };
                // A third of the events carry their own id, the rest get a derived one.
                let event = if rng.chance(33) {
                    ChatEvent {
                        event_id: format!("explicit-{tenant}-{conversation_index}-{step}"),
                        ..event
                    }
                } else {
                    event
                };
                all.push(event);
            }
        }
    }
    // Send order: shuffled within windows of 16, so timestamps arrive out of order.
    for window in all.chunks_mut(16) {
        for i in (1..window.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            window.swap(i, j);
        }
    }
    all
}

/// What the archive must hold for `sent` events: one event per event id, completed as the gateway completes
/// it (source, derived id), with the receive time zeroed for comparison.
pub fn expected_archive(sent: &[ChatEvent]) -> BTreeMap<String, ChatEvent> {
    let mut expected = BTreeMap::new();
    for event in sent {
        let mut completed = event.clone();
        validate_and_complete(&mut completed, Source::Grpc, &EventLimits::default())
            .expect("workload events are valid");
        completed.received_at_micros = 0;
        expected
            .entry(completed.event_id.clone())
            .or_insert(completed);
    }
    expected
}

/// The independent model of a restored message: final text, edited, deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMessage {
    pub text: String,
    pub edited: bool,
    pub deleted: bool,
    pub thread_id: String,
}

/// Applies created/edited/deleted events in time order (ties by event id, like the archive's sort).
pub fn model_messages(events: &[&ChatEvent]) -> HashMap<String, ModelMessage> {
    let mut ordered: Vec<&ChatEvent> = events.to_vec();
    ordered.sort_by(|a, b| {
        (a.occurred_at_micros, &a.event_id).cmp(&(b.occurred_at_micros, &b.event_id))
    });
    let mut model: HashMap<String, ModelMessage> = HashMap::new();
    for event in ordered {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if event.message_id.is_empty() {
            continue;
        }
        let entry = model
            .entry(event.message_id.clone())
            .or_insert_with(|| ModelMessage {
                text: String::new(),
                edited: false,
                deleted: false,
                thread_id: String::new(),
            });
        match kind {
            EventKind::MessageCreated => {
                entry.thread_id = event.thread_id.clone();
                if !entry.deleted && !entry.edited {
                    entry.text = event.text.clone();
                }
            }
            EventKind::MessageEdited => {
                entry.edited = true;
                if !entry.deleted {
                    entry.text = event.text.clone();
                }
            }
            EventKind::MessageDeleted => {
                entry.deleted = true;
                entry.text.clear();
            }
            _ => {}
        }
    }
    model
}

/// A `chatvault archiver` process with `config`'s Kafka, storage, keys and batching settings, aborting at
/// `crash_at` (`CHATVAULT_CRASH_AT`, see `archiver/src/crash.rs`) when given.
pub fn archiver_command(config: &Config, crash_at: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    command
        .arg("archiver")
        .env("CHATVAULT__KAFKA__BROKERS", &config.shared.kafka.brokers)
        .env("CHATVAULT__KAFKA__TOPIC", &config.shared.kafka.topic)
        .env("CHATVAULT__STORAGE__URL", &config.shared.storage.url)
        .env(
            "CHATVAULT__KEYS__KEYRING_PATH",
            &config.shared.keys.keyring_path,
        )
        .env("CHATVAULT__ARCHIVER__GROUP_ID", &config.archiver.group_id)
        .env(
            "CHATVAULT__ARCHIVER__MAX_BATCH_AGE",
            chatvault_core::duration::format(config.archiver.max_batch_age),
        )
        .env(
            "CHATVAULT__ARCHIVER__MAX_BATCH_EVENTS",
            config.archiver.max_batch_events.to_string(),
        )
        .env("CHATVAULT__ARCHIVER__SESSION_TIMEOUT", "6s")
        // Several archivers run at once: each takes a free port for its metrics endpoint.
        .env("CHATVAULT__TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn,chatvault_archiver=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in &config.shared.storage.options {
        command.env(
            format!("CHATVAULT__STORAGE__OPTIONS__{}", key.to_uppercase()),
            value,
        );
    }
    match crash_at {
        Some(point) => command.env("CHATVAULT_CRASH_AT", point),
        None => command.env_remove("CHATVAULT_CRASH_AT"),
    };
    command
}

/// A message `message_id` with `text` in conversation `C1` of `tenant`, sent by `U1`.
pub fn message_event(tenant: &str, message_id: &str, text: &str) -> ChatEvent {
    ChatEvent {
        tenant_id: tenant.into(),
        conversation_id: "C1".into(),
        message_id: message_id.into(),
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: "U1".into(),
            ..Default::default()
        }),
        occurred_at_micros: 1_764_000_000_000_000,
        text: text.into(),
        ..Default::default()
    }
}

/// The headers of a Slack Events API request of `body` signed with `secret` at `timestamp` (HMAC-SHA256 of
/// `v0:<timestamp>:<body>`).
pub fn slack_headers(body: &str, timestamp: i64, secret: &str) -> Vec<(&'static str, String)> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signature = ring::hmac::sign(&key, format!("v0:{timestamp}:{body}").as_bytes());
    vec![
        ("x-slack-request-timestamp", timestamp.to_string()),
        (
            "x-slack-signature",
            format!("v0={}", hex::encode(signature.as_ref())),
        ),
        ("content-type", "application/json".into()),
    ]
}

/// The real peers of an end-to-end test: a broker (librdkafka's mock cluster over TCP, with `partitions` for
/// the events' topic), an S3 server and a keyring directory, and the test configuration pointing at them.
/// Dropping it stops them.
pub struct Peers {
    pub kafka: chatvault_testkit::kafka::TestKafka,
    pub s3: chatvault_testkit::s3::S3Server,
    pub keyring: tempfile::TempDir,
    pub config: Config,
}

pub async fn start_peers(partitions: i32) -> anyhow::Result<Peers> {
    let kafka =
        chatvault_testkit::kafka::TestKafka::start(chatvault_testkit::pipeline::TOPIC, partitions)?;
    let s3 = chatvault_testkit::s3::S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = chatvault_testkit::pipeline::test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    Ok(Peers {
        kafka,
        s3,
        keyring,
        config,
    })
}

/// `chatvault <args>` with extra environment, its output once it exits; killed after 60 s. Polls instead of
/// blocking, so in-process roles of the test keep their runtime thread.
pub async fn run_chatvault(
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() >= deadline {
            child.kill()?;
            anyhow::bail!("chatvault {args:?} did not exit within 60s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(child.wait_with_output()?)
}

/// A command's stdout and stderr, for assertions and their messages.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The conversations the restorer lists for `tenant`.
pub async fn listed_conversations(
    endpoint: &str,
    tenant: &str,
) -> anyhow::Result<Vec<chatvault_proto::v1::ConversationSummary>> {
    Ok(chatvault_testkit::pipeline::restore_client(endpoint)
        .await?
        .list_conversations(chatvault_testkit::pipeline::authorized(
            chatvault_proto::v1::ListConversationsRequest {
                tenant_id: tenant.into(),
            },
            chatvault_testkit::pipeline::RESTORE_TOKEN,
        ))
        .await?
        .into_inner()
        .conversations)
}

/// The texts of every archived event of `tenant`'s listed conversations, as the restorer returns them.
pub async fn restored_texts(
    endpoint: &str,
    tenant: &str,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    use chatvault_proto::v1::restore_item::Item;
    let mut client = chatvault_testkit::pipeline::restore_client(endpoint).await?;
    let mut texts = std::collections::BTreeSet::new();
    for summary in listed_conversations(endpoint, tenant).await? {
        let mut stream = client
            .get_conversation(chatvault_testkit::pipeline::authorized(
                chatvault_proto::v1::GetConversationRequest {
                    tenant_id: tenant.into(),
                    conversation_id: summary.conversation_id,
                    include_events: true,
                    ..Default::default()
                },
                chatvault_testkit::pipeline::RESTORE_TOKEN,
            ))
            .await?
            .into_inner();
        while let Some(item) = stream.message().await? {
            if let Some(Item::ArchivedEvent(event)) = item.item {
                texts.insert(event.text);
            }
        }
    }
    Ok(texts)
}

/// Polls [`restored_texts`] of `tenants` (united) until they are `expected`; fails after `timeout`, showing
/// the last answer.
pub async fn wait_for_restored(
    endpoint: &str,
    tenants: &[&str],
    expected: &std::collections::BTreeSet<String>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut answer = Ok(std::collections::BTreeSet::new());
        for tenant in tenants {
            answer = match (answer, restored_texts(endpoint, tenant).await) {
                (Ok(mut all), Ok(texts)) => {
                    all.extend(texts);
                    Ok(all)
                }
                (Err(error), _) | (_, Err(error)) => Err(error),
            };
        }
        if answer.as_ref().is_ok_and(|restored| restored == expected) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the restorer did not return the {} expected events of {tenants:?} within {timeout:?}; last \
             answer: {answer:?}",
            expected.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A message of `tenant` in `conversation` at `at_micros`, sent by `sender` and mentioning `mentions`.
pub fn chat_event(
    tenant: &str,
    conversation: &str,
    id: &str,
    at_micros: i64,
    sender: &str,
    mentions: &[&str],
) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation.into(),
        occurred_at_micros: at_micros,
        sender: Some(Sender {
            id: sender.into(),
            ..Default::default()
        }),
        mentions: mentions.iter().map(|m| m.to_string()).collect(),
        ..message_event(tenant, id, &format!("text of {id}"))
    }
}

/// The message ids a conversation restores to.
pub async fn restored_message_ids(
    endpoint: &str,
    tenant: &str,
    conversation: &str,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    use chatvault_proto::v1::restore_item::Item;
    let mut client = chatvault_testkit::pipeline::restore_client(endpoint).await?;
    let request = chatvault_testkit::pipeline::authorized(
        chatvault_proto::v1::GetConversationRequest {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            include_events: true,
            ..Default::default()
        },
        chatvault_testkit::pipeline::RESTORE_TOKEN,
    );
    let mut stream = client.get_conversation(request).await?.into_inner();
    let mut ids = std::collections::BTreeSet::new();
    while let Some(item) = stream.message().await? {
        if let Some(Item::ArchivedEvent(event)) = item.item {
            ids.insert(event.message_id);
        }
    }
    Ok(ids)
}

/// DuckDB's answer to `sql` over the view the export script `script` defines.
pub fn duckdb(script: &str, sql: &str) -> anyhow::Result<String> {
    let query = format!(
        "import duckdb, sys\ncon = duckdb.connect()\ncon.execute(sys.stdin.read())\nprint(con.execute({sql:?}).fetchone()[0])"
    );
    let mut child = Command::new(chatvault_testkit::python::venv_python())
        .args(["-c", &query])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "duckdb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// `chatvault <args> --restorer <endpoint> --token <token>`, its output once it exits (see
/// [`run_chatvault`]). The future owns its arguments.
pub fn run_with_restorer(
    endpoint: &str,
    token: &str,
    args: &[&str],
) -> impl std::future::Future<Output = anyhow::Result<std::process::Output>> + use<> {
    let mut all: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    all.extend([
        "--restorer".into(),
        endpoint.to_string(),
        "--token".into(),
        token.to_string(),
    ]);
    async move {
        let borrowed: Vec<&str> = all.iter().map(String::as_str).collect();
        run_chatvault(&borrowed, &[]).await
    }
}
