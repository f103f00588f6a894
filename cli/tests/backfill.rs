//! `chatvault import` end to end, through a real gateway, broker, archiver and S3 server:
//! - `slack-export`: an export ZIP generated from the documented format (every message subtype the reference
//!   lists); the importer is killed mid-run and resumed; the restorer then returns every message exactly
//!   once, a message also captured live by the Events API is one archived event, and a re-run adds nothing;
//! - `mattermost`: a bulk export's JSON lines (posts, replies, edits, reactions, direct posts) restore
//!   exactly, and a re-run adds nothing.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{ChatEvent, EventKind, GetConversationRequest, RestoredMessage};
use chatvault_testkit::pipeline::{
    ACME_INGEST_TOKEN, RESTORE_TOKEN, authorized, restore_client, start_archiver, start_gateway,
    start_restorer, wait_until,
};
use serde_json::{Value, json};

const SLACK_SECRET: &str = "import-test-signing-secret";
const TEAM: &str = "T061EG9R6";
/// Days of the busy channel: enough units that the importer can be killed in the middle.
const BUSY_DAYS: usize = 120;
const BUSY_PER_DAY: usize = 15;

fn ts(seconds: i64, micros: i64) -> String {
    format!("{seconds}.{micros:06}")
}

/// The export: users, four kinds of conversation, a day file per conversation with every subtype, a thread
/// whose reply is in the next day's file, and a busy channel of many day files.
fn write_export(path: &Path) -> anyhow::Result<()> {
    let day = 1_700_000_000; // 2023-11-14T22:13:20Z
    let general = json!([
        // Also delivered live through the Events API.
        {"type": "message", "user": "U1", "text": "hello from both paths", "ts": ts(day, 100), "team": TEAM},
        {"type": "message", "user": "U1", "text": "thread root", "ts": ts(day + 10, 0), "thread_ts": ts(day + 10, 0),
         "reply_count": 1, "reply_users": ["U2"], "replies": [{"user": "U2", "ts": ts(day + 86_400, 0)}]},
        {"type": "message", "subtype": "bot_message", "bot_id": "B1", "username": "deploybot", "text": "deployed v2",
         "ts": ts(day + 20, 0)},
        {"type": "message", "subtype": "file_share", "user": "U2", "text": "the budget", "ts": ts(day + 30, 0),
         "files": [{"id": "F1", "name": "budget.xlsx", "mimetype": "application/vnd.ms-excel", "size": 2048,
                    "url_private": "https://files.slack.com/files-pri/T1-F1/budget.xlsx?t=xoxe-export-secret"}]},
        {"type": "message", "user": "U2", "text": "edited text", "ts": ts(day + 40, 0),
         "edited": {"user": "U2", "ts": ts(day + 45, 0)}},
        {"type": "message", "user": "U1", "text": "react to me", "ts": ts(day + 50, 0),
         "reactions": [{"name": "thumbsup", "count": 2, "users": ["U1", "U2"]}, {"name": "eyes", "count": 1, "users": ["U3"]}]},
        {"type": "message", "subtype": "channel_join", "user": "U3", "text": "<@U3> has joined the channel", "ts": ts(day + 60, 0)},
        {"type": "message", "subtype": "me_message", "user": "U3", "text": "waves", "ts": ts(day + 70, 0)},
        {"type": "message", "subtype": "thread_broadcast", "user": "U2", "text": "also in channel",
         "ts": ts(day + 80, 0), "thread_ts": ts(day + 10, 0), "root": {"ts": ts(day + 10, 0)}},
        {"type": "message", "subtype": "tombstone", "user": "USLACKBOT", "text": "This message was deleted.",
         "ts": ts(day + 90, 0), "thread_ts": ts(day + 90, 0), "reply_count": 1},
        {"type": "message", "subtype": "channel_name", "user": "U1", "name": "general-chat", "old_name": "general",
         "text": "renamed", "ts": ts(day + 100, 0)},
        {"type": "message", "subtype": "channel_leave", "user": "U3", "text": "<@U3> has left", "ts": ts(day + 110, 0)},
        {"type": "message", "user": "U9", "text": "an external user nobody lists", "ts": ts(day + 120, 0)},
        {"type": "message", "user": "U1", "text": "an old export's single file", "ts": ts(day + 130, 0),
         "file": {"id": "F2", "name": "old.txt", "mimetype": "text/plain", "size": 3}},
        {"type": "message", "user": "U1", "text": "no ts here"},
        {"type": "message", "subtype": "message_changed", "hidden": true, "ts": ts(day + 140, 0)},
    ]);
    let general_next = json!([
        {"type": "message", "user": "U2", "text": "a reply a day later", "ts": ts(day + 86_400, 0), "thread_ts": ts(day + 10, 0),
         "parent_user_id": "U1"},
        {"type": "message", "user": "U2", "text": "a reply to the deleted parent", "ts": ts(day + 86_410, 0),
         "thread_ts": ts(day + 90, 0)},
    ]);
    let entries: Vec<(String, Value)> = vec![
        (
            "users.json".into(),
            json!([
                {"id": "U1", "team_id": TEAM, "name": "ann", "real_name": "Ann Lee", "profile": {"display_name": "Ann"}},
                {"id": "U2", "team_id": TEAM, "name": "bob", "profile": {"display_name": "", "real_name": "Bob Ma"}},
                {"id": "U3", "team_id": TEAM, "name": "carl", "profile": {"display_name": "Carl"}},
            ]),
        ),
        (
            "channels.json".into(),
            json!([
                {"id": "C100", "name": "general", "created": 1_600_000_000, "creator": "U1", "members": ["U1", "U2"]},
                {"id": "C500", "name": "busy", "created": 1_600_000_100, "creator": "U2"},
            ]),
        ),
        (
            "groups.json".into(),
            json!([{"id": "G200", "name": "secret-plans", "created": 1_600_000_200, "creator": "U1"}]),
        ),
        (
            "dms.json".into(),
            json!([{"id": "D300", "created": 1_600_000_300, "members": ["U1", "U2"]}]),
        ),
        (
            "mpims.json".into(),
            json!([{"id": "G400", "name": "mpdm-ann--bob--carl-1", "created": 1_600_000_400, "creator": "U1"}]),
        ),
        ("integration_logs.json".into(), json!([])),
        ("general/2023-11-14.json".into(), general),
        ("general/2023-11-15.json".into(), general_next),
        (
            "secret-plans/2023-11-14.json".into(),
            json!([{"type": "message", "user": "U1", "text": "private plans", "ts": ts(day + 5, 0)}]),
        ),
        (
            "D300/2023-11-14.json".into(),
            json!([{"type": "message", "user": "U2", "text": "a direct message", "ts": ts(day + 6, 0)}]),
        ),
        (
            "mpdm-ann--bob--carl-1/2023-11-14.json".into(),
            json!([{"type": "message", "user": "U3", "text": "a group DM", "ts": ts(day + 7, 0)}]),
        ),
    ];
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path)?);
    let options = zip::write::SimpleFileOptions::default();
    for (name, value) in entries {
        writer.start_file(name, options)?;
        writer.write_all(&serde_json::to_vec_pretty(&value)?)?;
    }
    for index in 0..BUSY_DAYS {
        let seconds = day + 2 * 86_400 + index as i64 * 86_400;
        let messages: Vec<Value> = (0..BUSY_PER_DAY)
            .map(|n| {
                json!({"type": "message", "user": if n % 2 == 0 { "U1" } else { "U2" },
                       "text": format!("busy day {index} message {n}"), "ts": ts(seconds + n as i64, 0)})
            })
            .collect();
        let date = chatvault_core::time::format_time(seconds * 1_000_000);
        writer.start_file(format!("busy/{}.json", &date[..10]), options)?;
        writer.write_all(&serde_json::to_vec(&messages)?)?;
    }
    writer.finish()?;
    Ok(())
}

/// A conversation as restored: its messages and its archived events.
async fn restore(
    endpoint: &str,
    conversation: &str,
) -> anyhow::Result<(Vec<RestoredMessage>, Vec<ChatEvent>)> {
    restore_of(endpoint, "acme", conversation).await
}

async fn restore_of(
    endpoint: &str,
    tenant: &str,
    conversation: &str,
) -> anyhow::Result<(Vec<RestoredMessage>, Vec<ChatEvent>)> {
    let mut client = restore_client(endpoint).await?;
    let request = authorized(
        GetConversationRequest {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            include_events: true,
            ..Default::default()
        },
        RESTORE_TOKEN,
    );
    let mut stream = client.get_conversation(request).await?.into_inner();
    let (mut messages, mut archived) = (Vec::new(), Vec::new());
    while let Some(item) = stream.message().await? {
        match item.item {
            Some(Item::Message(message)) => messages.push(message),
            Some(Item::ArchivedEvent(event)) => archived.push(event),
            _ => {}
        }
    }
    Ok((messages, archived))
}

fn import_command(zip: &Path, gateway: &str, token: &str, extra: &[&str]) -> Command {
    import_from("slack-export", zip, gateway, token, extra)
}

fn import_from(source: &str, export: &Path, gateway: &str, token: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    command
        .args(["import", source])
        .arg(export)
        .args(["--tenant", "acme", "--gateway", gateway])
        .args(extra)
        .env("CHATVAULT_TOKEN", token)
        .env("RUST_LOG", "warn")
        .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs the importer to its end (at most two minutes), polling so the in-process roles keep running.
async fn import(
    zip: &Path,
    gateway: &str,
    token: &str,
    extra: &[&str],
) -> anyhow::Result<std::process::Output> {
    finish(import_command(zip, gateway, token, extra)).await
}

async fn finish(mut command: Command) -> anyhow::Result<std::process::Output> {
    let mut child = command.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() >= deadline {
            child.kill()?;
            anyhow::bail!("the import did not finish within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child.wait_with_output()?)
}

fn units_done(checkpoint: &Path) -> usize {
    std::fs::read(checkpoint)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|state| state["done"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_export_is_imported_once_resumes_after_a_kill_and_collapses_with_live_capture()
-> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    let peers = common::start_peers(2).await?;
    let mut config = peers.config.clone();
    config.gateway.webhooks = vec![WebhookConfig {
        name: "acme-slack".into(),
        platform: Some(WebhookPlatform::Slack),
        tenant: "acme".into(),
        secrets: vec![SLACK_SECRET.into()],
        ..Default::default()
    }];
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let grpc = gateway.endpoint();

    // One message captured live before the export is imported.
    let body = json!({
        "type": "event_callback", "team_id": TEAM, "api_app_id": "A1", "event_id": "Ev1", "event_time": 1_700_000_000,
        "event": {"type": "message", "channel": "C100", "user": "U1", "text": "hello from both paths",
                  "ts": ts(1_700_000_000, 100), "event_ts": ts(1_700_000_000, 100), "channel_type": "channel"}
    })
    .to_string();
    let now = chatvault_core::time::now_micros() / 1_000_000;
    let mut request = reqwest::Client::new()
        .post(format!("{}/webhooks/acme-slack", gateway.http_endpoint()))
        .body(body.clone());
    for (name, value) in common::slack_headers(&body, now, SLACK_SECRET) {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await?.status().as_u16(), 200);

    let dir = tempfile::tempdir()?;
    let zip = dir.path().join("export.zip");
    write_export(&zip)?;
    let checkpoint = dir.path().join("export.zip.chatvault-import");
    let units_total = 1 + 5 + BUSY_DAYS;

    // Bad input is refused with the reason, and nothing is checkpointed.
    let not_zip = dir.path().join("not.zip");
    std::fs::write(&not_zip, b"this is not a zip")?;
    let refused = import(&not_zip, &grpc, ACME_INGEST_TOKEN, &[]).await?;
    assert!(!refused.status.success());
    assert!(
        common::output_text(&refused).contains("not a readable ZIP"),
        "{}",
        common::output_text(&refused)
    );
    // A token without the ingest role is refused by the gateway.
    let denied = import(&zip, &grpc, RESTORE_TOKEN, &[]).await?;
    assert!(!denied.status.success());
    assert!(
        common::output_text(&denied).contains("refused the import (PermissionDenied)"),
        "{}",
        common::output_text(&denied)
    );
    assert_eq!(units_done(&checkpoint), 0);

    // The first run is killed once part of the export is acknowledged.
    let mut child =
        import_command(&zip, &grpc, ACME_INGEST_TOKEN, &["--batch-events", "5"]).spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while units_done(&checkpoint) < 10 {
        assert!(
            child.try_wait()?.is_none(),
            "the import ended before it could be killed"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill()?;
    child.wait()?;
    let done_at_kill = units_done(&checkpoint);
    assert!(
        done_at_kill < units_total,
        "killed after {done_at_kill} of {units_total} units"
    );

    // The second run resumes and finishes.
    let resumed = import(&zip, &grpc, ACME_INGEST_TOKEN, &["--json"]).await?;
    assert!(
        resumed.status.success(),
        "{}",
        common::output_text(&resumed)
    );
    let summary: Value = serde_json::from_slice(&resumed.stdout)?;
    assert_eq!(summary["units_total"], units_total);
    assert_eq!(
        summary["units_resumed"].as_u64().expect("resumed") as usize
            + summary["units_imported"].as_u64().expect("imported") as usize,
        units_total,
        "{summary}"
    );
    assert!(summary["units_resumed"].as_u64() >= Some(done_at_kill as u64));
    assert_eq!(summary["interrupted"], false);
    let rejected = summary["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 1, "{summary}");
    assert_eq!(rejected[0]["unit"], "general/2023-11-14.json");
    assert_eq!(rejected[0]["item"], "message 14");
    assert_eq!(rejected[0]["reason"], "ts is missing");
    assert_eq!(
        summary["skipped"]["subtype message_changed (a change notification)"],
        1
    );

    // A third run adds nothing; its readable summary says so.
    let again = import(&zip, &grpc, ACME_INGEST_TOKEN, &[]).await?;
    assert!(again.status.success(), "{}", common::output_text(&again));
    let text = common::output_text(&again);
    assert!(
        text.contains(&format!(
            "units: 0 of {units_total} imported by this run, {units_total} by earlier runs"
        )),
        "{text}"
    );
    // Another export cannot reuse this checkpoint.
    let other = dir.path().join("other.zip");
    write_export(&other)?;
    let mut bytes = std::fs::read(&other)?;
    bytes.extend_from_slice(b"trailing");
    std::fs::write(&other, bytes)?;
    let mismatch = import(
        &other,
        &grpc,
        ACME_INGEST_TOKEN,
        &["--checkpoint", checkpoint.to_str().expect("utf-8")],
    )
    .await?;
    assert!(
        common::output_text(&mismatch).contains("belongs to another import"),
        "{}",
        common::output_text(&mismatch)
    );

    // Everything is archived; the restorer returns each message once.
    let busy_messages = BUSY_DAYS * BUSY_PER_DAY;
    assert!(
        wait_until(Duration::from_secs(90), || {
            stats.events.committed_events.load(Ordering::Relaxed) as usize >= busy_messages + 20
        })
        .await,
        "the imported events were not archived"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (messages, archived) = loop {
        let (messages, archived) = restore(&endpoint, "C100").await?;
        if messages.len() >= 13 || std::time::Instant::now() > deadline {
            break (messages, archived);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let by_id = |id: &str| {
        messages
            .iter()
            .find(|message| message.message_id == id)
            .unwrap_or_else(|| panic!("message {id} in {messages:#?}"))
    };
    let day = 1_700_000_000;
    // Live and imported are one archived event: the same derived id.
    let creations = archived
        .iter()
        .filter(|event| {
            event.message_id == ts(day, 100) && event.kind == EventKind::MessageCreated as i32
        })
        .count();
    assert_eq!(creations, 1);
    assert_eq!(by_id(&ts(day, 100)).text, "hello from both paths");
    let root = by_id(&ts(day + 10, 0));
    assert_eq!(
        root.sender.as_ref().map(|s| s.display_name.as_str()),
        Some("Ann")
    );
    let reply = by_id(&ts(day + 86_400, 0));
    assert_eq!(reply.thread_id, ts(day + 10, 0));
    assert_eq!(
        reply.sender.as_ref().map(|s| s.display_name.as_str()),
        Some("Bob Ma")
    );
    let bot = by_id(&ts(day + 20, 0));
    let bot_sender = bot.sender.as_ref().expect("bot sender");
    assert!(
        bot_sender.is_bot && bot_sender.id == "B1" && bot_sender.display_name == "deploybot",
        "{bot_sender:?}"
    );
    let file = by_id(&ts(day + 30, 0));
    assert_eq!(
        file.attachments[0].url,
        "https://files.slack.com/files-pri/T1-F1/budget.xlsx"
    );
    let edited = by_id(&ts(day + 40, 0));
    assert!(edited.edited && edited.text == "edited text", "{edited:?}");
    let reacted = by_id(&ts(day + 50, 0));
    let reactions: BTreeSet<(String, Vec<String>)> = reacted
        .reactions
        .iter()
        .map(|reaction| (reaction.name.clone(), reaction.user_ids.clone()))
        .collect();
    assert_eq!(
        reactions,
        BTreeSet::from([
            ("eyes".to_string(), vec!["U3".to_string()]),
            (
                "thumbsup".to_string(),
                vec!["U1".to_string(), "U2".to_string()]
            ),
        ])
    );
    assert_eq!(by_id(&ts(day + 80, 0)).thread_id, ts(day + 10, 0));
    assert!(by_id(&ts(day + 90, 0)).deleted);
    assert_eq!(by_id(&ts(day + 86_410, 0)).thread_id, ts(day + 90, 0));
    assert_eq!(by_id(&ts(day + 130, 0)).attachments[0].name, "old.txt");
    assert_eq!(
        by_id(&ts(day + 120, 0)).text,
        "an external user nobody lists"
    );
    by_id(&ts(day + 70, 0));
    let kinds: BTreeSet<i32> = archived.iter().map(|event| event.kind).collect();
    for kind in [
        EventKind::ConversationCreated,
        EventKind::MemberJoined,
        EventKind::MemberLeft,
        EventKind::ConversationRenamed,
    ] {
        assert!(kinds.contains(&(kind as i32)), "{kind:?} missing");
    }
    // The export token of file links reaches neither attachments nor raw payloads.
    for event in &archived {
        let raw = String::from_utf8_lossy(&event.raw_payload);
        assert!(!raw.contains("xoxe"), "{raw}");
        assert!(event.attachments.iter().all(|a| !a.url.contains("xoxe")));
    }
    assert_eq!(messages.len(), 13, "{messages:#?}");

    for (conversation, text) in [
        ("G200", "private plans"),
        ("D300", "a direct message"),
        ("G400", "a group DM"),
    ] {
        let (messages, _) = restore(&endpoint, conversation).await?;
        let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, vec![text], "{conversation}");
    }
    // Every busy message once, whatever the kill made the importer send twice.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (messages, _) = restore(&endpoint, "C500").await?;
        let ids: BTreeSet<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        if messages.len() == busy_messages && ids.len() == busy_messages {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "busy restores {} messages ({} distinct), expected {busy_messages}",
            messages.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mattermost_bulk_export_restores_exactly_and_a_rerun_adds_nothing() -> anyhow::Result<()>
{
    chatvault_core::storage::install_crypto_provider();
    let peers = common::start_peers(1).await?;
    let config = peers.config.clone();
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let grpc = gateway.endpoint();

    let at = 1_700_000_000_000_i64;
    let mut lines = vec![
        json!({"type": "version", "version": 1, "info": {"generator": "mmctl", "version": "9.11"}}),
        json!({"type": "team", "team": {"name": "eng", "display_name": "Engineering", "type": "O"}}),
        json!({"type": "channel", "channel": {"team": "eng", "name": "town-square", "display_name": "Town Square", "type": "O"}}),
        json!({"type": "user", "user": {"username": "ann", "email": "ann@example.com", "nickname": "Annie",
               "teams": [{"name": "eng", "channels": [{"name": "town-square"}]}]}}),
        json!({"type": "user", "user": {"username": "wei", "first_name": "王", "last_name": "伟"}}),
        json!({"type": "post", "post": {"team": "eng", "channel": "town-square", "user": "ann",
               "message": "release plan for @wei", "create_at": at, "edit_at": at + 60_000,
               "reactions": [{"user": "wei", "emoji_name": "+1", "create_at": at + 30_000}],
               "replies": [{"user": "wei", "message": "好的，明天发布", "create_at": at + 120_000,
                            "reactions": [{"user": "ann", "emoji_name": "tada", "create_at": at + 130_000}]}]}}),
        json!({"type": "post", "post": {"team": "eng", "channel": "town-square", "user": "wei",
               "type": "system_join_channel", "message": "wei joined the channel", "create_at": at - 1000}}),
        json!({"type": "direct_channel", "direct_channel": {"members": ["wei", "ann"]}}),
        json!({"type": "direct_post", "direct_post": {"channel_members": ["wei", "ann"], "user": "wei",
               "message": "a direct message", "create_at": at + 500_000}}),
    ];
    // Enough posts for several checkpoint units.
    for n in 0..2_500_i64 {
        lines.push(
            json!({"type": "post", "post": {"team": "eng", "channel": "random", "user": "ann",
                           "message": format!("random {n}"), "create_at": at + 1_000_000 + n}}),
        );
    }
    let dir = tempfile::tempdir()?;
    let export = dir.path().join("mattermost.jsonl");
    let mut text = String::new();
    for line in &lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(&export, text)?;

    let first = finish(import_from(
        "mattermost",
        &export,
        &grpc,
        ACME_INGEST_TOKEN,
        &["--json"],
    ))
    .await?;
    assert!(first.status.success(), "{}", common::output_text(&first));
    let summary: Value = serde_json::from_slice(&first.stdout)?;
    assert_eq!(summary["units_total"], 3, "{summary}");
    assert_eq!(summary["units_imported"], 3, "{summary}");
    // 4 + 1 + 1 + 1 + 1 events of the conversation and the DM, and the random posts.
    assert_eq!(summary["events_imported"], 2_500 + 7, "{summary}");
    assert!(
        summary["rejected"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );
    let again = finish(import_from(
        "mattermost",
        &export,
        &grpc,
        ACME_INGEST_TOKEN,
        &["--json"],
    ))
    .await?;
    let summary: Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(
        (
            summary["units_imported"].as_u64(),
            summary["events_imported"].as_u64()
        ),
        (Some(0), Some(0))
    );

    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= 2_507
        })
        .await,
        "the imported events were not archived"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (messages, archived) = loop {
        let restored = restore_of(&endpoint, "acme", "eng/town-square").await?;
        if restored.0.len() >= 2 || std::time::Instant::now() > deadline {
            break restored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let (root, reply) = (&messages[0], &messages[1]);
    assert!(
        root.edited && root.text == "release plan for @wei",
        "{root:?}"
    );
    assert_eq!(root.mentions, vec!["wei"]);
    assert_eq!(
        root.sender.as_ref().map(|s| s.display_name.as_str()),
        Some("Annie")
    );
    assert_eq!(root.reactions.len(), 1);
    assert_eq!(
        (
            root.reactions[0].name.as_str(),
            root.reactions[0].user_ids.clone()
        ),
        ("+1", vec!["wei".to_string()])
    );
    assert_eq!(reply.thread_id, root.message_id);
    assert_eq!(reply.text, "好的，明天发布");
    assert_eq!(
        reply.sender.as_ref().map(|s| s.display_name.as_str()),
        Some("王 伟")
    );
    assert_eq!(reply.reactions[0].name, "tada");
    assert!(
        archived
            .iter()
            .any(|event| event.kind == EventKind::MemberJoined as i32)
    );
    let (direct, _) = restore_of(&endpoint, "acme", "direct:ann,wei").await?;
    assert_eq!(
        direct.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        vec!["a direct message"]
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (random, _) = restore_of(&endpoint, "acme", "eng/random").await?;
        let texts: BTreeSet<&str> = random.iter().map(|m| m.text.as_str()).collect();
        if random.len() == 2_500 && texts.len() == 2_500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "eng/random restores {} messages",
            random.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}

/// An RFC 3339 time (`2024-01-10T10:00:00Z`) `seconds` after 2024-01-10T10:00:00Z.
fn graph_time(seconds: i64) -> String {
    chatvault_core::time::format_time((1_704_880_800 + seconds) * 1_000_000).replacen(' ', "T", 1)
}

fn teams_message(container: Value, id: &str, at: i64, from: &str, text: &str) -> Value {
    let mut message = json!({
        "id": id, "etag": id, "messageType": "message", "replyToId": null,
        "createdDateTime": graph_time(at), "lastModifiedDateTime": graph_time(at),
        "lastEditedDateTime": null, "deletedDateTime": null, "subject": null,
        "from": {"user": {"id": from, "displayName": format!("name of {from}"), "userIdentityType": "aadUser"}},
        "body": {"contentType": "html", "content": format!("<p>{text}</p>")},
        "attachments": [], "mentions": [], "reactions": [], "messageHistory": []
    });
    for (key, value) in container.as_object().expect("object") {
        message[key] = value.clone();
    }
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_teams_export_api_is_paged_throttled_resumed_and_collapsed_across_users()
-> anyhow::Result<()> {
    use chatvault_testkit::graph::{App, Graph, GraphFaults, pem_der};
    chatvault_core::storage::install_crypto_provider();
    let peers = common::start_peers(1).await?;
    let config = peers.config.clone();
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let grpc = gateway.endpoint();

    // A 1:1 chat both users' exports return (70 messages: two pages each), a group chat of one user with an
    // edit, a reaction, a soft delete and a system event, a message outside the window, and a team's channel
    // with threads.
    let direct = json!({"chatId": "19:ann-bob@unq.gbl.spaces"});
    let shared: Vec<Value> = (0..70)
        .map(|n| {
            let from = if n % 2 == 0 { "u-ann" } else { "u-bob" };
            teams_message(
                direct.clone(),
                &format!("17048808{n:05}"),
                n * 60,
                from,
                &format!("direct {n}"),
            )
        })
        .collect();
    let group = json!({"chatId": "19:group@thread.v2"});
    let mut edited = teams_message(group.clone(), "1", 10, "u-ann", "edited text");
    edited["lastEditedDateTime"] = json!(graph_time(20));
    edited["lastModifiedDateTime"] = json!(graph_time(30));
    edited["reactions"] = json!([{"reactionType": "like", "displayName": "Like", "createdDateTime": graph_time(30),
                                  "user": {"application": null, "device": null,
                                           "user": {"id": "u-carl", "displayName": "Carl", "userIdentityType": "aadUser"}}}]);
    let mut deleted = teams_message(group.clone(), "2", 40, "u-bob", "soon gone");
    deleted["deletedDateTime"] = json!(graph_time(50));
    deleted["lastModifiedDateTime"] = json!(graph_time(50));
    let mut system = teams_message(group.clone(), "3", 5, "u-ann", "");
    system["messageType"] = json!("systemEventMessage");
    system["from"] = Value::Null;
    system["eventDetail"] = json!({"@odata.type": "#microsoft.graph.membersAddedEventMessageDetail",
        "members": [{"id": "u-carl", "displayName": "Carl", "userIdentityType": "aadUser"}],
        "initiator": {"user": {"id": "u-ann"}}});
    let mut outside = teams_message(group.clone(), "4", 0, "u-ann", "before the window");
    outside["lastModifiedDateTime"] = json!("2023-12-01T00:00:00Z");
    let mut ann = shared.clone();
    ann.extend([edited, deleted, system, outside]);
    let channel = json!({"channelIdentity": {"teamId": "team-1", "channelId": "19:general@thread.tacv2"}, "chatId": null});
    let mut general = Vec::new();
    for root in 0..20 {
        let id = format!("1704881{root:06}");
        general.push(teams_message(
            channel.clone(),
            &id,
            5_000 + root * 100,
            "u-ann",
            &format!("root {root}"),
        ));
        for reply in 0..2 {
            let mut message = teams_message(
                channel.clone(),
                &format!("{id}{reply}"),
                5_000 + root * 100 + 10 + reply,
                "u-bob",
                &format!("reply {reply} to {root}"),
            );
            message["replyToId"] = json!(id);
            general.push(message);
        }
    }
    let key_pem = std::fs::read_to_string("tests/fixtures/teams-app-key.pem")?;
    let certificate_pem = std::fs::read_to_string("tests/fixtures/teams-app-certificate.pem")?;
    let public_key = ring::signature::RsaKeyPair::from_pkcs8(&pem_der(&key_pem, "PRIVATE KEY"))
        .map_err(|error| anyhow::anyhow!("{error}"))?
        .public()
        .as_ref()
        .to_vec();
    let graph = Graph::start(
        App {
            directory: "dir-1".into(),
            client_id: "app-1".into(),
            secret: Some("app-secret".into()),
            certificate: Some((pem_der(&certificate_pem, "CERTIFICATE"), public_key)),
        },
        HashMap::from([("u-ann".to_string(), ann), ("u-bob".to_string(), shared)]),
        HashMap::from([("team-1".to_string(), general)]),
        GraphFaults {
            throttle_every_first_page: true,
            unavailable_once: vec![("users/u-bob".into(), 1)],
            revoke_tokens_after: Some(4),
        },
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "app-secret\n")?;
    let checkpoint = dir.path().join("teams.chatvault-import");
    let teams = |credential: Vec<String>, checkpoint: &Path, extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
        command
            .args(["import", "teams", "--tenant", "acme", "--gateway", &grpc])
            .args(["--directory", "dir-1", "--client-id", "app-1"])
            .args(credential)
            .args([
                "--user", "u-ann", "--user", "u-bob", "--user", "u-ghost", "--team", "team-1",
            ])
            .args([
                "--from",
                "2024-01-01T00:00:00Z",
                "--to",
                "2024-02-01T00:00:00Z",
                "--model",
                "A",
            ])
            .args([
                "--authority",
                &graph.endpoint(),
                "--graph",
                &graph.endpoint(),
            ])
            .args(["--max-requests-per-second", "100", "--json", "--checkpoint"])
            .arg(checkpoint)
            .args(extra)
            .env("CHATVAULT_TOKEN", ACME_INGEST_TOKEN)
            .env("RUST_LOG", "warn")
            .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let secret = vec![
        "--client-secret-file".to_string(),
        secret_file.display().to_string(),
    ];
    let certificate = vec![
        "--certificate".to_string(),
        "tests/fixtures/teams-app-certificate.pem".to_string(),
        "--certificate-key".to_string(),
        "tests/fixtures/teams-app-key.pem".to_string(),
    ];

    // A wrong secret is refused with the identity platform's reason, and never printed.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret")?;
    let refused = finish(teams(
        vec!["--client-secret-file".into(), wrong.display().to_string()],
        &dir.path().join("unused"),
        &[],
    ))
    .await?;
    let text = common::output_text(&refused);
    assert!(
        !refused.status.success() && text.contains("AADSTS7000215"),
        "{text}"
    );
    assert!(!text.contains("not-the-secret"), "{text}");

    // The first run stops where a page keeps failing; what came before it is checkpointed.
    graph.break_page(Some(("teams/team-1", 1)));
    let stopped = finish(teams(
        secret.clone(),
        &checkpoint,
        &["--max-retry-time", "3s"],
    ))
    .await?;
    let text = common::output_text(&stopped);
    assert!(!stopped.status.success(), "{text}");
    assert!(text.contains("kept throttling or failing"), "{text}");
    let state: Value = serde_json::from_slice(&std::fs::read(&checkpoint)?)?;
    assert_eq!(
        state["done"],
        json!(["users/u-ann", "users/u-bob", "users/u-ghost"]),
        "{state}"
    );
    assert!(
        state["cursors"]["teams/team-1"]
            .as_str()
            .is_some_and(|next| next.contains("skiptoken")),
        "{state}"
    );

    // The second run, with the certificate, resumes at the failed page.
    graph.break_page(None);
    let resumed = finish(teams(certificate.clone(), &checkpoint, &[])).await?;
    assert!(
        resumed.status.success(),
        "{}",
        common::output_text(&resumed)
    );
    let summary: Value = serde_json::from_slice(&resumed.stdout)?;
    assert_eq!(
        (
            summary["units_resumed"].as_u64(),
            summary["units_imported"].as_u64()
        ),
        (Some(3), Some(1)),
        "{summary}"
    );
    assert_eq!(summary["events_imported"], 60 - 50, "{summary}");
    for (unit, page) in [
        ("users/u-ann", 0),
        ("users/u-ann", 1),
        ("users/u-bob", 0),
        ("teams/team-1", 0),
    ] {
        assert_eq!(
            graph.served(unit, page),
            1,
            "{unit} page {page} served again"
        );
    }

    // A whole run into a fresh checkpoint: the chat both users see is sent once; the unknown user is reported.
    let whole = finish(teams(secret, &dir.path().join("again"), &[])).await?;
    assert!(whole.status.success(), "{}", common::output_text(&whole));
    let summary: Value = serde_json::from_slice(&whole.stdout)?;
    assert_eq!(summary["duplicates_skipped"], 70, "{summary}");
    let rejected = summary["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 1, "{summary}");
    assert_eq!(rejected[0]["unit"], "users/u-ghost");
    assert!(
        rejected[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("404 NotFound")),
        "{summary}"
    );
    assert!(graph.counts.throttled.load(Ordering::Relaxed) >= 6);
    assert_eq!(graph.counts.unavailable.load(Ordering::Relaxed), 1);
    // Tokens were revoked every four requests and renewed.
    assert!(graph.counts.unauthorized.load(Ordering::Relaxed) >= 2);
    assert!(graph.counts.tokens_issued.load(Ordering::Relaxed) >= 4);

    // Restored: each message once, edits, reactions, the soft delete, membership, threads.
    let expected_events = 70 + 2 + 1 + 1 + 1 + 60;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= expected_events
        })
        .await,
        "the imported events were not archived"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (direct, _) = restore_of(&endpoint, "acme", "19:ann-bob@unq.gbl.spaces").await?;
        let (general, _) = restore_of(&endpoint, "acme", "19:general@thread.tacv2").await?;
        if direct.len() == 70 && general.len() == 60 {
            let roots = general.iter().filter(|m| m.thread_id.is_empty()).count();
            assert_eq!(roots, 20);
            assert_eq!(general[1].thread_id, general[0].message_id);
            assert_eq!(direct[0].text, "<p>direct 0</p>");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restored {} direct and {} channel messages",
            direct.len(),
            general.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (group, archived) = restore_of(&endpoint, "acme", "19:group@thread.v2").await?;
    assert_eq!(group.len(), 2, "{group:#?}");
    let edited = group.iter().find(|m| m.message_id == "1").expect("edited");
    assert!(edited.edited, "{edited:?}");
    assert_eq!(edited.reactions[0].name, "Like");
    assert_eq!(edited.reactions[0].user_ids, vec!["u-carl"]);
    assert!(
        group
            .iter()
            .find(|m| m.message_id == "2")
            .expect("deleted")
            .deleted
    );
    assert!(
        archived
            .iter()
            .any(|event| event.kind == EventKind::MemberJoined as i32)
    );
    assert!(
        archived.iter().all(|event| event.message_id != "4"),
        "outside the window"
    );

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}
