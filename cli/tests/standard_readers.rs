//! DuckDB and pyarrow (real readers, from PyPI) read a tenant's months of the archive with their data keys
//! alone, through the documented recipes (`scripts/read_archive.py`), and return the same rows as the
//! restorer: for a pipeline-written archive, and for an archive of realistic size (files of 50,000+ rows,
//! messages up to `max_text_bytes`, Chinese text), every column, with and without filters. A wrong key fails.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use chatvault_archive::file::FileOptions;
use chatvault_core::event::{kind_name, source_name};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{
    Attachment, ChatEvent, EventKind, GetConversationRequest, IngestBatchRequest,
    ListConversationsRequest, Sender, Source,
};
use chatvault_restorer::testing::Fixture;
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, RESTORE_TOKEN, TOPIC, authorized, data_keys, ingest_client, restore_client,
    start_archiver, start_gateway, start_restorer, test_config, wait_until,
};
use chatvault_testkit::python::{script, venv_python};
use chatvault_testkit::s3::S3Server;
use common::workload;
use serde_json::{Value, json};

/// The columns both sides are compared on, keyed by event id.
type Rows = BTreeMap<String, (String, String, String, String, i64)>;

fn read_with(
    reader: &str,
    root: &std::path::Path,
    keys: &[(&str, &str)],
    extra: &[String],
) -> std::process::Output {
    let mut command = Command::new(venv_python());
    command
        .arg(script("read_archive.py"))
        .args(["--reader", reader, "--tenant", "acme"])
        .arg("--root")
        .arg(root);
    for (month, key) in keys {
        command.arg("--key").arg(format!("{month}={key}"));
    }
    command.args(extra).output().expect("python runs")
}

fn parse_rows(output: &std::process::Output) -> Rows {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).expect("json row");
            let text = |name: &str| row[name].as_str().unwrap_or_default().to_string();
            assert_eq!(text("tenant"), "acme", "hive partition column tenant");
            assert!(
                text("date").starts_with("2025-11-"),
                "hive partition column date"
            );
            (
                text("event_id"),
                (
                    text("conversation_id"),
                    text("kind"),
                    text("text"),
                    text("sender_id"),
                    row["occurred_at"].as_i64().expect("micros"),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duckdb_and_pyarrow_read_a_tenants_month_with_its_data_key() -> anyhow::Result<()> {
    let python = venv_python(); // fail fast with the fix when the virtualenv is missing
    let kafka = TestKafka::start(TOPIC, 3)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;

    let sent = workload(11, &["acme", "globex"], 4, 60);
    let mut client = ingest_client(&gateway.endpoint()).await?;
    for chunk in sent.chunks(100) {
        client
            .ingest_batch(authorized(
                IngestBatchRequest {
                    events: chunk.to_vec(),
                },
                INGEST_TOKEN,
            ))
            .await?;
    }
    let produced = record_count(&kafka.brokers, TOPIC)?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats
                .events
                .committed_records
                .load(std::sync::atomic::Ordering::Relaxed) as i64
                >= produced
        })
        .await,
        "not archived in time"
    );

    // What the restorer returns for every acme conversation.
    let mut restore = restore_client(&restorer.endpoint()).await?;
    let conversations = restore
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: "acme".into(),
            },
            RESTORE_TOKEN,
        ))
        .await?
        .into_inner()
        .conversations;
    let mut restored = Rows::new();
    for summary in conversations {
        let mut stream = restore
            .get_conversation(authorized(
                GetConversationRequest {
                    tenant_id: "acme".into(),
                    conversation_id: summary.conversation_id.clone(),
                    include_events: true,
                    ..Default::default()
                },
                RESTORE_TOKEN,
            ))
            .await?
            .into_inner();
        while let Some(item) = stream.message().await? {
            if let Some(Item::ArchivedEvent(event)) = item.item {
                restored.insert(
                    event.event_id.clone(),
                    (
                        event.conversation_id.clone(),
                        kind_name(event.kind).to_string(),
                        event.text.clone(),
                        event.sender.map(|s| s.id).unwrap_or_default(),
                        event.occurred_at_micros,
                    ),
                );
            }
        }
    }
    assert!(
        restored.len() >= 200,
        "too few acme events to mean anything: {}",
        restored.len()
    );

    let key = data_keys(&config).await?.get("acme", "2025-11").await?;
    let key_base64 = base64::engine::general_purpose::STANDARD.encode(key.key);
    let root = s3.bucket_dir();
    for reader in ["duckdb", "pyarrow"] {
        let output = read_with(reader, &root, &[("2025-11", &key_base64)], &[]);
        assert!(
            output.status.success(),
            "{reader} ({}) failed: {}",
            python.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let rows = parse_rows(&output);
        assert_eq!(rows.len(), restored.len(), "{reader}: row count");
        assert_eq!(rows, restored, "{reader}: rows differ from the restorer's");
    }

    // Another month's key (a different data key) opens nothing.
    let wrong = data_keys(&config)
        .await?
        .get_or_create("acme", "2025-10")
        .await?;
    let wrong_base64 = base64::engine::general_purpose::STANDARD.encode(wrong.key);
    for reader in ["duckdb", "pyarrow"] {
        let output = read_with(reader, &root, &[("2025-11", &wrong_base64)], &[]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{reader} must fail with a wrong key: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    gateway.stop().await?;
    archiver.stop().await?;
    restorer.stop().await?;
    Ok(())
}

/// Every column the comparison covers, as the readers print them (`scripts/read_archive.py`): empty strings
/// are nulls in the archive, `mentions_json` and `attachments_json` are parsed, `raw_payload` is hex.
fn columns_of_event(event: &ChatEvent) -> Value {
    let sender = event.sender.clone().unwrap_or_default();
    json!({
        "event_id": event.event_id,
        "tenant_id": event.tenant_id,
        "source": source_name(event.source),
        "workspace_id": event.workspace_id,
        "conversation_id": event.conversation_id,
        "thread_id": event.thread_id,
        "message_id": event.message_id,
        "kind": kind_name(event.kind),
        "sender_id": sender.id,
        "sender_name": sender.display_name,
        "sender_is_bot": sender.is_bot,
        "occurred_at": event.occurred_at_micros,
        "received_at": event.received_at_micros,
        "text": event.text,
        "reaction": event.reaction,
        "mentions": event.mentions,
        "attachments": event.attachments.iter().map(|a| json!({
            "id": a.id, "name": a.name, "mime_type": a.mime_type, "size_bytes": a.size_bytes,
            "sha256": a.sha256, "url": a.url,
        })).collect::<Vec<_>>(),
        "raw_payload": hex::encode(&event.raw_payload),
        "raw_content_type": event.raw_content_type,
    })
}

fn columns_of_reader_row(row: &Value) -> Value {
    let text = |name: &str| Value::String(row[name].as_str().unwrap_or_default().to_string());
    let parsed = |name: &str| match row[name].as_str() {
        Some(json) => serde_json::from_str(json).expect("JSON column"),
        None => json!([]),
    };
    let attachments: Vec<Value> = parsed("attachments_json")
        .as_array()
        .expect("array")
        .iter()
        .map(|a| {
            let field = |name: &str| Value::String(a[name].as_str().unwrap_or_default().into());
            json!({
                "id": field("id"), "name": field("name"), "mime_type": field("mime_type"),
                "size_bytes": a["size_bytes"].as_u64().unwrap_or_default(),
                "sha256": field("sha256"), "url": field("url"),
            })
        })
        .collect();
    json!({
        "event_id": text("event_id"),
        "tenant_id": text("tenant_id"),
        "source": text("source"),
        "workspace_id": text("workspace_id"),
        "conversation_id": text("conversation_id"),
        "thread_id": text("thread_id"),
        "message_id": text("message_id"),
        "kind": text("kind"),
        "sender_id": text("sender_id"),
        "sender_name": text("sender_name"),
        "sender_is_bot": row["sender_is_bot"],
        "occurred_at": row["occurred_at"],
        "received_at": row["received_at"],
        "text": text("text"),
        "reaction": text("reaction"),
        "mentions": parsed("mentions_json"),
        "attachments": attachments,
        "raw_payload": text("raw_payload"),
        "raw_content_type": text("raw_content_type"),
    })
}

/// A reader's rows keyed by identity; fails on a repeated identity (this archive holds each event once).
fn reader_rows(reader: &str, output: &std::process::Output) -> BTreeMap<(String, String), Value> {
    assert!(
        output.status.success(),
        "{reader} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut rows = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let row: Value = serde_json::from_str(line).expect("json row");
        assert_eq!(row["tenant"], "acme", "{reader}: hive column tenant");
        let columns = columns_of_reader_row(&row);
        let identity = (
            columns["conversation_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            columns["event_id"].as_str().unwrap_or_default().to_string(),
        );
        assert!(
            rows.insert(identity.clone(), columns).is_none(),
            "{reader}: {identity:?} read twice"
        );
    }
    rows
}

/// Random words, Latin and Chinese, of `len` bytes at most (cut at a character boundary).
fn words(rng: &mut common::Rng, len: usize) -> String {
    const LATIN: &[&str] = &[
        "invoice",
        "deadline",
        "shipment",
        "contract",
        "review",
        "budget",
        "the",
        "a",
        "of",
        "meeting",
        "approve",
        "quarterly",
        "customer",
        "ticket",
        "escalate",
        "merge",
        "deploy",
        "rollback",
    ];
    const CHINESE: &[&str] = &[
        "合同",
        "发票",
        "会议",
        "审批",
        "客户",
        "预算",
        "上线",
        "回滚",
        "季度",
        "截止日期",
        "请确认",
    ];
    let chinese = rng.chance(15);
    let mut text = String::with_capacity(len + 16);
    while text.len() < len {
        let word = if chinese && rng.chance(70) {
            CHINESE[rng.below(CHINESE.len() as u64) as usize]
        } else {
            LATIN[rng.below(LATIN.len() as u64) as usize]
        };
        text.push_str(word);
        text.push(' ');
    }
    let mut cut = len.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_readers_read_every_column_of_files_of_realistic_size() -> anyhow::Result<()> {
    venv_python();
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    // The archive is written with the archiver's file options and committed through the manifest log, as
    // the archiver does, so files reach 50,000+ rows without a broker backlog. Kafka only carries the
    // restorer's audit records (a restore is served once its record is acknowledged).
    let kafka = TestKafka::start(TOPIC, 1)?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let store = object_store_from_config(&config.shared.storage)?;
    let mut fixture = Fixture::over(store, data_keys(&config).await?, TOPIC);
    fixture.file_options = FileOptions {
        zstd_level: config.archiver.zstd_level,
        row_group_rows: config.archiver.row_group_rows,
        row_group_bytes: config.archiver.row_group_bytes,
        ..FileOptions::default()
    };
    let max_text_bytes = config.gateway.limits.max_text_bytes;

    // Two UTC days across a month boundary (two data keys), 52,000 events each: one file per day of one
    // batch, each of 52,000 rows; then a small second batch.
    let day_micros = 86_400_000_000i64;
    let october_31 = 1_761_868_800_000_000i64; // 2025-10-31T00:00:00Z
    let mut rng = common::Rng::new(2026);
    let mut events = Vec::new();
    for day in 0..2 {
        for n in 0..52_000i64 {
            let conversation = format!("C{:02}", rng.below(12));
            let len = if rng.chance(1) && n % 7 == 0 {
                max_text_bytes
            } else {
                300 + rng.below(1_700) as usize
            };
            let user = format!("U{}", rng.below(40));
            let at =
                october_31 + day * day_micros + n * (day_micros / 52_000) + rng.below(1_000) as i64;
            events.push(ChatEvent {
                event_id: format!("d{day}-e{n}"),
                tenant_id: "acme".into(),
                source: Source::Slack as i32,
                workspace_id: "T-acme".into(),
                conversation_id: conversation,
                thread_id: if rng.chance(20) {
                    format!("d{day}-e{}", n / 2)
                } else {
                    String::new()
                },
                message_id: format!("d{day}-m{n}"),
                kind: EventKind::MessageCreated as i32,
                sender: Some(Sender {
                    id: user.clone(),
                    display_name: format!("用户 {user}"),
                    is_bot: rng.chance(3),
                }),
                occurred_at_micros: at,
                received_at_micros: at + 1_500_000,
                text: words(&mut rng, len),
                mentions: if rng.chance(10) {
                    vec!["U1".into(), "U7".into()]
                } else {
                    vec![]
                },
                attachments: if rng.chance(5) {
                    vec![Attachment {
                        id: format!("F{n}"),
                        name: "报告.pdf".into(),
                        mime_type: "application/pdf".into(),
                        size_bytes: 1000 + n as u64,
                        sha256: "ab".repeat(32),
                        url: String::new(),
                    }]
                } else {
                    vec![]
                },
                raw_payload: if rng.chance(30) {
                    format!("{{\"type\":\"message\",\"n\":{n}}}").into_bytes()
                } else {
                    vec![]
                },
                raw_content_type: String::new(),
                ..Default::default()
            });
            if !events.last().expect("pushed").raw_payload.is_empty() {
                events.last_mut().expect("pushed").raw_content_type = "application/json".into();
            }
        }
    }
    let (first, _) = fixture.commit_batch(0, &events).await;
    let big_files: Vec<u64> = first.files.iter().map(|file| file.rows).collect();
    assert_eq!(big_files, vec![52_000, 52_000], "two files of 52,000 rows");
    let small: Vec<ChatEvent> = events
        .iter()
        .step_by(997)
        .cloned()
        .map(|mut event| {
            event.event_id = format!("late-{}", event.event_id);
            event
        })
        .collect();
    fixture.commit_batch(1, &small).await;
    let all: Vec<&ChatEvent> = events.iter().chain(&small).collect();

    // The restorer's rows: every conversation, whole, and one filtered on time.
    let restorer = start_restorer(&config).await?;
    let client = restore_client(&restorer.endpoint()).await?;
    let restore = |conversation: String, from_micros: i64, to_micros: i64| {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .get_conversation(authorized(
                    GetConversationRequest {
                        tenant_id: "acme".into(),
                        conversation_id: conversation,
                        from_micros,
                        to_micros,
                        include_events: true,
                        include_evidence: false,
                    },
                    RESTORE_TOKEN,
                ))
                .await?
                .into_inner();
            let mut rows = BTreeMap::new();
            while let Some(item) = stream.message().await? {
                if let Some(Item::ArchivedEvent(event)) = item.item {
                    rows.insert(
                        (event.conversation_id.clone(), event.event_id.clone()),
                        columns_of_event(&event),
                    );
                }
            }
            anyhow::Ok(rows)
        }
    };
    let mut restored = BTreeMap::new();
    let conversations = client
        .clone()
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: "acme".into(),
            },
            RESTORE_TOKEN,
        ))
        .await?
        .into_inner()
        .conversations;
    assert_eq!(conversations.len(), 12);
    for summary in conversations {
        restored.extend(restore(summary.conversation_id, 0, 0).await?);
    }
    assert_eq!(
        restored.len(),
        all.len(),
        "the restorer returns every event"
    );
    let expected: BTreeMap<(String, String), Value> = all
        .iter()
        .map(|e| {
            (
                (e.conversation_id.clone(), e.event_id.clone()),
                columns_of_event(e),
            )
        })
        .collect();
    assert!(
        restored == expected,
        "the restorer returns what was archived"
    );

    let keys = data_keys(&config).await?;
    let key = |period: &str| {
        let keys = keys.clone();
        let period = period.to_string();
        async move {
            let key = keys.get("acme", &period).await.expect("data key");
            base64::engine::general_purpose::STANDARD.encode(key.key)
        }
    };
    let october = key("2025-10").await;
    let november = key("2025-11").await;
    let keys = [
        ("2025-10", october.as_str()),
        ("2025-11", november.as_str()),
    ];
    let root = s3.bucket_dir();
    let (from, to) = (
        october_31 + day_micros / 4,
        october_31 + day_micros + day_micros / 2,
    );
    let filtered = restore("C03".into(), from, to).await?;
    assert!(
        filtered.len() > 1_000,
        "the filter keeps a good part: {}",
        filtered.len()
    );
    let filter_args = [
        "--conversation".to_string(),
        "C03".to_string(),
        "--from-micros".to_string(),
        from.to_string(),
        "--to-micros".to_string(),
        to.to_string(),
    ];
    for reader in ["duckdb", "pyarrow"] {
        let rows = reader_rows(reader, &read_with(reader, &root, &keys, &[]));
        assert_eq!(
            rows.len(),
            restored.len(),
            "{reader}: every row of every file"
        );
        assert!(
            rows == restored,
            "{reader}: rows differ from the restorer's"
        );
        let rows = reader_rows(reader, &read_with(reader, &root, &keys, &filter_args));
        assert_eq!(rows.len(), filtered.len(), "{reader}: filtered rows");
        assert!(
            rows == filtered,
            "{reader}: filtered rows differ from the restorer's"
        );
    }

    // SQL over the view, as a data team writes it: an aggregate with a filter on text.
    let output = read_with(
        "duckdb",
        &root,
        &keys,
        &[
            "--sql".to_string(),
            "SELECT count(*) AS n, max(length(text)) AS longest FROM events WHERE text LIKE '%合同%'"
                .to_string(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row: Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim())?;
    let with_word = all.iter().filter(|e| e.text.contains("合同")).count();
    assert_eq!(row["n"].as_u64(), Some(with_word as u64));
    restorer.stop().await?;
    Ok(())
}
