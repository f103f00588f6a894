//! `chatvault keys shred` over a real broker and S3 server: a legal hold refuses it; a dry run lists what
//! becomes unreadable; the shred is recorded in the audit trail; afterwards restores of the erased month fail
//! with the erased error naming the month and the date, its conversations are no longer listed, its keys are
//! no longer handed out, other months and tenants are untouched, new events of the month get a fresh key, and
//! `chatvault verify` counts the erased files as erased, not missing. A whole-tenant shred also destroys the
//! tenant's key-encryption keys in the keyring.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use chatvault_core::audit::AuditRecord;
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::key_service_client::KeyServiceClient;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{
    ChatEvent, ExportDataKeysRequest, GetConversationRequest, IngestBatchRequest,
};
use chatvault_testkit::kafka::read_topic;
use chatvault_testkit::pipeline::{
    ACME_KEY_EXPORT_TOKEN, INGEST_TOKEN, RESTORE_TOKEN, TOPIC, authorized, channel, ingest_client,
    restore_client, start_archiver, start_gateway, start_restorer, wait_until,
};
use chatvault_testkit::process::write_config;
use object_store::{ObjectStoreExt, PutPayload};
use prost::Message as _;

const DAY_MICROS: i64 = 86_400_000_000;

fn event(tenant: &str, conversation: &str, id: &str, at_micros: i64) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation.into(),
        occurred_at_micros: at_micros,
        ..common::message_event(tenant, id, &format!("text of {id}"))
    }
}

async fn chatvault(args: &[&str]) -> anyhow::Result<std::process::Output> {
    common::run_chatvault(args, &[]).await
}

use common::output_text as text;

/// A conversation's restored texts, or the gRPC error.
async fn restore(
    endpoint: &str,
    tenant: &str,
    conversation: &str,
) -> anyhow::Result<Result<BTreeSet<String>, tonic::Status>> {
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
    let mut stream = match client.get_conversation(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let mut texts = BTreeSet::new();
    loop {
        match stream.message().await {
            Ok(Some(item)) => {
                if let Some(Item::ArchivedEvent(event)) = item.item {
                    texts.insert(event.text);
                }
            }
            Ok(None) => return Ok(Ok(texts)),
            Err(status) => return Ok(Err(status)),
        }
    }
}

async fn conversations(endpoint: &str, tenant: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(common::listed_conversations(endpoint, tenant)
        .await?
        .into_iter()
        .map(|summary| summary.conversation_id)
        .collect())
}

fn keyring_ids(path: &Path, tenant: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let entry = &file["tenants"][tenant];
    let keys = entry["keys"]
        .as_object()
        .map(|keys| keys.keys().cloned().collect())
        .unwrap_or_default();
    let destroyed = entry["destroyed"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((keys, destroyed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_month_is_erased_everywhere_and_the_rest_is_untouched() -> anyhow::Result<()> {
    let peers = common::start_peers(2).await?;
    let mut config = peers.config.clone();
    // Other processes (this test's restorer) stop using a cached copy of a shredded key within this.
    config.shared.keys.cache_ttl = Duration::from_secs(1);
    let dir = tempfile::tempdir()?;
    let config_path: PathBuf = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let config_arg = config_path.to_string_lossy().to_string();
    let store = object_store_from_config(&config.shared.storage)?;

    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let november = common::BASE_MICROS; // 2025-11-24
    let december = common::BASE_MICROS + 10 * DAY_MICROS;
    let events = vec![
        event("acme", "C1", "nov-1", november),
        event("acme", "C1", "nov-2", november + 60_000_000),
        event("acme", "C2", "nov-3", november + 120_000_000),
        event("acme", "C3", "dec-1", december),
        event("globex", "C1", "globex-nov-1", november),
        event("globex", "C1", "globex-dec-1", december),
    ];
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= 6
        })
        .await
    );
    assert_eq!(restore(&endpoint, "acme", "C1").await??.len(), 2);

    // A legal hold on November refuses the shred; the dry run says so and lists what would go.
    let hold = serde_json::json!({
        "format": "chatvault-hold-v1", "hold_id": "matter-7", "tenant_id": "acme",
        "periods": ["2025-11"], "matter": "Doe v. Acme", "created_at_micros": november,
    });
    let hold_path = object_store::path::Path::from("holds/tenant=acme/matter-7.json");
    store
        .put(&hold_path, PutPayload::from(serde_json::to_vec(&hold)?))
        .await?;
    let dry = chatvault(&[
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--period",
        "2025-11",
        "--dry-run",
        "-c",
        &config_arg,
    ])
    .await?;
    assert!(dry.status.success(), "{}", text(&dry));
    let dry_text = text(&dry);
    assert!(dry_text.contains("dry run"), "{dry_text}");
    assert!(
        dry_text.contains("2025-11: data key acme/2025-11/"),
        "{dry_text}"
    );
    assert!(dry_text.contains("file(s)"), "{dry_text}");
    assert!(
        dry_text.contains("REFUSED: legal hold matter-7"),
        "{dry_text}"
    );
    let shred_november = [
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--period",
        "2025-11",
        "--reason",
        "erasure request 4711",
        "--yes",
        "-c",
        &config_arg,
    ];
    let held = chatvault(&shred_november).await?;
    assert!(!held.status.success(), "{}", text(&held));
    assert!(
        text(&held).contains("legal hold matter-7") && text(&held).contains("Doe v. Acme"),
        "{}",
        text(&held)
    );
    // Nothing was erased.
    assert_eq!(restore(&endpoint, "acme", "C1").await??.len(), 2);
    // Without --yes and without a terminal it asks for nothing and does nothing.
    let mut released = hold.clone();
    released["released_at_micros"] = chatvault_core::time::now_micros().into();
    store
        .put(&hold_path, PutPayload::from(serde_json::to_vec(&released)?))
        .await?;
    // A hold placed through the governance stream refuses it too, although it names one conversation and a
    // custodian: the month's data key encrypts every conversation of the month.
    let governance = chatvault_archive::governance::GovernanceLog::new(store.clone());
    let mut matter_9 =
        chatvault_archive::governance::hold::LegalHold::new("acme", "matter-9", "Roe v. Acme");
    matter_9.conversations = vec!["C1".into()];
    matter_9.custodians = vec!["u-ann".into()];
    matter_9.from_micros = Some(november);
    governance
        .commit(
            chatvault_archive::governance::Change::HoldPlaced { hold: matter_9 },
            "counsel",
            "",
        )
        .await?;
    let held = chatvault(&shred_november).await?;
    assert!(
        !held.status.success() && text(&held).contains("legal hold matter-9"),
        "{}",
        text(&held)
    );
    assert_eq!(restore(&endpoint, "acme", "C1").await??.len(), 2);
    governance
        .commit(
            chatvault_archive::governance::Change::HoldReleased {
                tenant_id: "acme".into(),
                hold_id: "matter-9".into(),
            },
            "counsel",
            "settled",
        )
        .await?;
    let unconfirmed: Vec<&str> = shred_november
        .iter()
        .copied()
        .filter(|arg| *arg != "--yes")
        .collect();
    let unconfirmed = chatvault(&unconfirmed).await?;
    assert!(!unconfirmed.status.success());
    assert!(
        text(&unconfirmed).contains("--yes"),
        "{}",
        text(&unconfirmed)
    );

    // The hold released, the shred runs.
    let shredded = chatvault(&shred_november).await?;
    assert!(shredded.status.success(), "{}", text(&shredded));
    assert!(
        text(&shredded).contains("1 data key(s) destroyed"),
        "{}",
        text(&shredded)
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // November of acme is erased: a clear error naming it and the date, not listed, no key handed out.
    let today = chatvault_core::time::Date::from_micros(chatvault_core::time::now_micros()).iso();
    let status = restore(&endpoint, "acme", "C1")
        .await?
        .expect_err("an erased conversation");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("erased on")
            && status.message().contains("2025-11")
            && status.message().contains(&today),
        "{status:?}"
    );
    assert!(
        !status.message().contains("4711"),
        "the reason stays out of errors"
    );
    assert_eq!(
        conversations(&endpoint, "acme").await?,
        BTreeSet::from(["C3".to_string()])
    );
    let mut keys = KeyServiceClient::new(channel(&endpoint).await?);
    let export = |period: &str| {
        authorized(
            ExportDataKeysRequest {
                tenant_id: "acme".into(),
                from_period: period.into(),
                to_period: String::new(),
                key_scope: String::new(),
            },
            ACME_KEY_EXPORT_TOKEN,
        )
    };
    let refused = keys
        .export_data_keys(export("2025-11"))
        .await
        .expect_err("no key of an erased month");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("erased"), "{refused:?}");
    assert_eq!(
        keys.export_data_keys(export("2025-12"))
            .await?
            .into_inner()
            .keys
            .len(),
        1
    );
    // The rest is untouched.
    assert_eq!(
        restore(&endpoint, "acme", "C3").await??,
        BTreeSet::from(["text of dec-1".to_string()])
    );
    assert_eq!(restore(&endpoint, "globex", "C1").await??.len(), 2);

    // New events of the erased month get a fresh key and restore.
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: vec![event("acme", "C4", "nov-after", november + DAY_MICROS)],
            },
            INGEST_TOKEN,
        ))
        .await?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= 7
        })
        .await
    );
    assert_eq!(
        restore(&endpoint, "acme", "C4").await??,
        BTreeSet::from(["text of nov-after".to_string()])
    );
    assert_eq!(
        conversations(&endpoint, "acme").await?,
        BTreeSet::from(["C3".to_string(), "C4".to_string()])
    );

    // Verify: intact, with the erased files counted as erased.
    let verified = chatvault(&["verify", "-c", &config_arg, "--json"]).await?;
    assert!(verified.status.success(), "{}", text(&verified));
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout)?;
    assert!(report["erased_files"].as_u64() >= Some(1), "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");

    // A whole-tenant shred: every month, and the tenant's key-encryption keys in the keyring.
    let keyring = &config.shared.keys.keyring_path;
    assert_eq!(keyring_ids(keyring, "globex")?.0, vec!["globex-kek-1"]);
    let whole = chatvault(&[
        "keys",
        "shred",
        "--tenant",
        "globex",
        "--reason",
        "offboarding",
        "--yes",
        "--json",
        "-c",
        &config_arg,
    ])
    .await?;
    assert!(whole.status.success(), "{}", text(&whole));
    let report: serde_json::Value = serde_json::from_slice(&whole.stdout)?;
    assert_eq!(
        report["erased"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert!(
        report["key_encryption_keys"]
            .as_str()
            .is_some_and(|done| done.contains("globex-kek-1")),
        "{report}"
    );
    assert_eq!(
        keyring_ids(keyring, "globex")?,
        (Vec::new(), vec!["globex-kek-1".to_string()])
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = restore(&endpoint, "globex", "C1")
        .await?
        .expect_err("an erased tenant");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    // The audit trail's keys are not for shredding.
    let audit = chatvault(&[
        "keys",
        "shred",
        "--tenant",
        "_audit",
        "--yes",
        "--reason",
        "x",
        "-c",
        &config_arg,
    ])
    .await?;
    assert!(!audit.status.success());
    assert!(text(&audit).contains("audit trail"), "{}", text(&audit));

    // Each shred was recorded before it acted: who, what, why.
    let records: Vec<AuditRecord> = read_topic(&peers.kafka.brokers, &format!("{TOPIC}.audit"))?
        .iter()
        .map(|payload| AuditRecord::decode(payload.as_slice()))
        .collect::<Result<_, _>>()?;
    let shreds: Vec<(&str, &str)> = records
        .iter()
        .filter(|record| record.action == "keys.shred")
        .map(|record| (record.tenant_id.as_str(), record.query.as_str()))
        .collect();
    assert_eq!(
        shreds,
        vec![
            ("acme", "period=2025-11 reason=erasure request 4711"),
            ("globex", "all periods reason=offboarding"),
        ]
    );
    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_scope_is_encrypted_exported_and_shredded_on_its_own() -> anyhow::Result<()> {
    let peers = common::start_peers(2).await?;
    let mut config = peers.config.clone();
    config.shared.keys.cache_ttl = Duration::from_secs(1);
    config.shared.keys.scopes = vec![chatvault_core::config::KeyScopeConfig {
        tenant: "acme".into(),
        name: "legal".into(),
        conversations: vec!["C-legal".into()],
        workspaces: vec![],
    }];
    let dir = tempfile::tempdir()?;
    let config_path: PathBuf = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let config_arg = config_path.to_string_lossy().to_string();
    let bucket = peers.s3.bucket_dir();

    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let november = common::BASE_MICROS;
    let events = vec![
        event("acme", "C1", "open-1", november),
        event("acme", "C1", "open-2", november + 60_000_000),
        event("acme", "C-legal", "legal-1", november + 30_000_000),
        event("acme", "C-legal", "legal-2", november + 90_000_000),
    ];
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= 4
        })
        .await
    );

    // Two data keys for acme's November: the default scope's and legal's, each with its own files.
    let record = |path: &str| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(bucket.join(path))?)?)
    };
    let default_key = record("keys/tenant=acme/period=2025-11.json")?;
    let legal_key = record("keys/tenant=acme/scope=legal/period=2025-11.json")?;
    assert_eq!(legal_key["scope"], "legal", "{legal_key}");
    assert_ne!(default_key["dek_id"], legal_key["dek_id"]);
    let names: BTreeSet<String> =
        std::fs::read_dir(bucket.join("events/tenant=acme/date=2025-11-24"))?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().to_string()))
            .collect::<anyhow::Result<_>>()?;
    assert!(
        names.iter().any(|name| name.starts_with("s-legal-p")),
        "{names:?}"
    );
    assert!(names.iter().any(|name| name.starts_with('p')), "{names:?}");
    assert_eq!(restore(&endpoint, "acme", "C-legal").await??.len(), 2);
    assert_eq!(restore(&endpoint, "acme", "C1").await??.len(), 2);

    // DuckDB with handed-out keys: the default scope's script reads only the default files (a filtered
    // query), the scope's script only the scope's.
    let archive = bucket.to_string_lossy().to_string();
    let script = |extra: &[&str]| -> anyhow::Result<String> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .args([
                "keys",
                "export",
                "--restorer",
                &endpoint,
                "--tenant",
                "acme",
            ])
            .args([
                "--period",
                "2025-11",
                "--format",
                "duckdb",
                "--archive",
                &archive,
            ])
            .args(extra)
            .env("CHATVAULT_TOKEN", ACME_KEY_EXPORT_TOKEN)
            .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
            .output()?;
        anyhow::ensure!(output.status.success(), "{}", text(&output));
        Ok(String::from_utf8(output.stdout)?)
    };
    let default_script = script(&[])?;
    assert_eq!(
        common::duckdb(
            &default_script,
            "SELECT string_agg(DISTINCT conversation_id, ',') FROM events WHERE message_id LIKE '%-1' OR message_id LIKE '%-2'"
        )?,
        "C1"
    );
    let legal_script = script(&["--scope", "legal"])?;
    assert_eq!(
        common::duckdb(
            &legal_script,
            "SELECT count(*) FROM events WHERE conversation_id = 'C-legal'"
        )?,
        "2"
    );

    // Shredding the scope erases the legal conversation only.
    let shred = chatvault(&[
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--scope",
        "legal",
        "--reason",
        "matter closed",
        "--yes",
        "-c",
        &config_arg,
    ])
    .await?;
    assert!(shred.status.success(), "{}", text(&shred));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = restore(&endpoint, "acme", "C-legal")
        .await?
        .expect_err("the erased scope");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("key scope legal"), "{status:?}");
    assert_eq!(restore(&endpoint, "acme", "C1").await??.len(), 2);
    assert_eq!(
        conversations(&endpoint, "acme").await?,
        BTreeSet::from(["C1".to_string()])
    );
    assert!(
        script(&["--scope", "legal"]).is_err(),
        "no key of the erased scope"
    );
    assert_eq!(
        common::duckdb(
            &script(&[])?,
            "SELECT count(*) FROM events WHERE conversation_id = 'C1'"
        )?,
        "2"
    );
    let verified = chatvault(&["verify", "-c", &config_arg, "--json"]).await?;
    assert!(verified.status.success(), "{}", text(&verified));
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout)?;
    assert!(report["erased_files"].as_u64() >= Some(1), "{report}");
    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}
