//! DuckDB and pyarrow (real readers, from PyPI) read a tenant's month of the archive with its data key alone
//! and return the same rows as the restorer; a wrong key fails.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use chatvault_core::event::kind_name;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{GetConversationRequest, IngestBatchRequest, ListConversationsRequest};
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, RESTORE_TOKEN, TOPIC, authorized, data_keys, ingest_client, restore_client,
    start_archiver, start_gateway, start_restorer, test_config, wait_until,
};
use chatvault_testkit::python::{script, venv_python};
use chatvault_testkit::s3::S3Server;
use common::workload;
use serde_json::Value;

/// The columns both sides are compared on, keyed by event id.
type Rows = BTreeMap<String, (String, String, String, String, i64)>;

fn read_with(reader: &str, root: &std::path::Path, key_base64: &str) -> std::process::Output {
    Command::new(venv_python())
        .arg(script("read_archive.py"))
        .args([
            "--reader",
            reader,
            "--tenant",
            "acme",
            "--month",
            "2025-11",
            "--key-base64",
            key_base64,
        ])
        .arg("--root")
        .arg(root)
        .output()
        .expect("python runs")
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
                    row["occurred_at_micros"].as_i64().expect("micros"),
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

    let key = data_keys(&config)?.get("acme", "2025-11").await?;
    let key_base64 = base64::engine::general_purpose::STANDARD.encode(key.key);
    let root = s3.bucket_dir();
    for reader in ["duckdb", "pyarrow"] {
        let output = read_with(reader, &root, &key_base64);
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
    let wrong = data_keys(&config)?.get_or_create("acme", "2025-10").await?;
    let wrong_base64 = base64::engine::general_purpose::STANDARD.encode(wrong.key);
    for reader in ["duckdb", "pyarrow"] {
        let output = read_with(reader, &root, &wrong_base64);
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
