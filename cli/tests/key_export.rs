//! Data keys for standard readers are handed out by the restorer's KeyService, only to holders of
//! `key_export` for the tenant, and every handout (or refusal) is recorded on the audit topic of a real broker
//! before a key leaves. The DuckDB script `chatvault keys export --format duckdb` writes reads the tenant's
//! month with a filtered query in DuckDB (from PyPI).

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use chatvault_core::audit::{AuditOutcome, AuditRecord};
use chatvault_proto::v1::{ChatEvent, IngestBatchRequest};
use chatvault_testkit::kafka::read_topic;
use chatvault_testkit::pipeline::{
    ACME_KEY_EXPORT_TOKEN, INGEST_TOKEN, RESTORE_TOKEN, TOPIC, authorized, data_keys,
    ingest_client, start_archiver, start_gateway, start_restorer, wait_until,
};
use chatvault_testkit::python::venv_python;
use prost::Message as _;

fn event(tenant: &str, conversation: &str, message: &str, minute: i64) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation.into(),
        occurred_at_micros: common::BASE_MICROS + minute * 60_000_000,
        ..common::message_event(tenant, message, &format!("text of {message}"))
    }
}

fn export(restorer: &str, token: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_chatvault"))
        .args(["keys", "export", "--restorer", restorer])
        .args(args)
        .env("CHATVAULT_TOKEN", token)
        .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_handed_out_only_with_the_role_recorded_and_open_the_month_in_duckdb()
-> anyhow::Result<()> {
    let python = venv_python();
    // Kept whole until the end: dropping it stops the broker, the S3 server and the keyring directory.
    let peers = common::start_peers(2).await?;
    let (kafka, s3, config) = (&peers.kafka, &peers.s3, peers.config.clone());
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let events = vec![
        event("acme", "C1", "m1", 0),
        event("acme", "C1", "m2", 10),
        event("acme", "C1", "m3", 20),
        event("acme", "C2", "m4", 15),
        event("globex", "C1", "m5", 5),
    ];
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    assert!(
        wait_until(Duration::from_secs(30), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= 5
        })
        .await
    );
    let endpoint = restorer.endpoint();

    // JSON: the month's key, the one the archive was written with.
    let json = export(
        &endpoint,
        ACME_KEY_EXPORT_TOKEN,
        &["--tenant", "acme", "--period", "2025-11"],
    )?;
    assert!(json.status.success(), "{json:?}");
    let exported: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let key = data_keys(&config).await?.get("acme", "2025-11").await?;
    let key_base64 = base64::engine::general_purpose::STANDARD.encode(key.key);
    assert_eq!(exported["key_base64"], key_base64.as_str());
    assert_eq!(exported["dek_id"], key.dek_id.as_str());

    // DuckDB: the script over a range (months without data are left out) answers a filtered query.
    let archive_root = s3.bucket_dir();
    let script = export(
        &endpoint,
        ACME_KEY_EXPORT_TOKEN,
        &[
            "--tenant",
            "acme",
            "--period",
            "2025-10",
            "--to-period",
            "2025-12",
            "--format",
            "duckdb",
            "--archive",
            archive_root.to_str().expect("utf-8 path"),
        ],
    )?;
    assert!(script.status.success(), "{script:?}");
    let script = String::from_utf8(script.stdout)?;
    assert_eq!(
        script.matches("PRAGMA add_parquet_key").count(),
        1,
        "{script}"
    );
    let query = format!(
        "import duckdb, sys\ncon = duckdb.connect()\ncon.execute(sys.stdin.read())\n\
         print(con.execute(\"SELECT string_agg(message_id, ',' ORDER BY occurred_at) FROM events \
         WHERE conversation_id = 'C1' AND occurred_at >= to_timestamp({}) \").fetchone()[0])",
        common::BASE_MICROS / 1_000_000 + 5 * 60
    );
    let mut duckdb = Command::new(&python)
        .args(["-c", &query])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut duckdb.stdin.take().expect("stdin"), script.as_bytes())?;
    let read = duckdb.wait_with_output()?;
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(String::from_utf8(read.stdout)?.trim(), "m2,m3");

    // Without the role, or for another tenant: refused, naming the missing role and tenant.
    for (token, tenant) in [(RESTORE_TOKEN, "acme"), (ACME_KEY_EXPORT_TOKEN, "globex")] {
        let refused = export(
            &endpoint,
            token,
            &["--tenant", tenant, "--period", "2025-11"],
        )?;
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("PermissionDenied"), "{stderr}");
        assert!(
            stderr.contains(&format!("key_export role for tenant {tenant}")),
            "{stderr}"
        );
        assert!(refused.stdout.is_empty(), "nothing is handed out");
    }

    // Each call left one record: who, which tenant and months, how many keys; never a key.
    let records: Vec<AuditRecord> = read_topic(&kafka.brokers, &format!("{TOPIC}.audit"))?
        .iter()
        .map(|payload| AuditRecord::decode(payload.as_slice()))
        .collect::<Result<_, _>>()?;
    let exports: Vec<(&str, &str, AuditOutcome, i64)> = records
        .iter()
        .filter(|r| r.action == "chatvault.v1.KeyService/ExportDataKeys")
        .map(|r| {
            (
                r.subject.as_str(),
                r.tenant_id.as_str(),
                AuditOutcome::try_from(r.outcome).expect("outcome"),
                r.item_count,
            )
        })
        .collect();
    assert_eq!(
        exports,
        [
            ("key-export-acme", "acme", AuditOutcome::Allowed, 1),
            ("key-export-acme", "acme", AuditOutcome::Allowed, 1),
            ("restore-all", "acme", AuditOutcome::Denied, 0),
            ("key-export-acme", "globex", AuditOutcome::Denied, 0),
        ]
    );
    let ranged = records
        .iter()
        .filter(|r| r.action.ends_with("ExportDataKeys"))
        .nth(1)
        .expect("the ranged export");
    assert_eq!(
        (ranged.from_micros, ranged.to_micros),
        (1_759_276_800_000_000, 1_767_225_600_000_000),
        "2025-10-01 to 2026-01-01"
    );
    let everything = format!("{records:?}");
    assert!(!everything.contains(&key_base64) && !everything.contains(&hex::encode(key.key)));

    gateway.stop().await?;
    restorer.stop().await?;
    archiver.stop().await?;
    Ok(())
}
