//! Tenants' data keys held by AWS KMS (moto's KMS server over HTTP, a real broker, the S3 server), with the
//! archiver and restorer as `chatvault` processes finding credentials through the standard AWS chain:
//! - a misconfigured key, or a KMS that cannot be reached, fails start-up with an error naming the setting;
//! - events are archived and restored through KMS-generated data keys, bound to their tenant and month by the
//!   encryption context;
//! - while the KMS hangs, acknowledged events of a new month are not committed (no key), and once it answers
//!   they all are: nothing acknowledged is lost;
//! - moving to a new KMS key and running `chatvault keys rewrap` leaves every key record under the new key
//!   (proved by decrypting with the new key named), recorded in the audit trail; a restorer configured with
//!   the new key restores everything.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use base64::Engine;
use chatvault_config::Config;
use chatvault_core::audit::AuditRecord;
use chatvault_core::config::KeyProviderKind;
use chatvault_proto::v1::{ChatEvent, IngestBatchRequest};
use chatvault_testkit::kafka::read_topic;
use chatvault_testkit::moto::{CREDENTIAL_ENV, Moto};
use chatvault_testkit::pipeline::{INGEST_TOKEN, TOPIC, authorized, ingest_client, start_gateway};
use chatvault_testkit::process::{ChildRole, free_address, wait_until_serving, write_config};
use prost::Message as _;

const RESTORE_SERVICE: &str = "chatvault.v1.RestoreService";
const DAY_MICROS: i64 = 86_400_000_000;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chatvault"))
}

fn event(tenant: &str, conversation: &str, id: &str, at_micros: i64) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation.into(),
        occurred_at_micros: at_micros,
        ..common::message_event(tenant, id, &format!("text of {id}"))
    }
}

/// Every data key record in the bucket: path relative to the bucket → record JSON.
fn key_records(bucket: &Path) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut records = BTreeMap::new();
    let root = bucket.join("keys");
    if !root.exists() {
        return Ok(records);
    }
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "json") {
                let relative = path.strip_prefix(bucket)?.to_string_lossy().to_string();
                records.insert(relative, serde_json::from_slice(&std::fs::read(&path)?)?);
            }
        }
    }
    Ok(records)
}

/// The encryption context chatvault binds a record's data key to (see `KeyContext::pairs`).
fn context_of(record: &serde_json::Value) -> HashMap<String, String> {
    let field = |name: &str| record[name].as_str().unwrap_or_default().to_string();
    HashMap::from([
        ("chatvault:tenant".to_string(), field("tenant_id")),
        ("chatvault:scope".to_string(), "default".to_string()),
        ("chatvault:period".to_string(), field("period")),
        ("chatvault:dek_id".to_string(), field("dek_id")),
    ])
}

/// Decrypts a record's wrapped key at the KMS naming `key_id` (moto checks the ciphertext is that key's).
async fn decrypt_record(
    kms: &Moto,
    record: &serde_json::Value,
    key_id: &str,
) -> anyhow::Result<Vec<u8>> {
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(record["wrapped_key"].as_str().unwrap_or_default())?;
    let decrypted = kms
        .kms_client()
        .decrypt()
        .key_id(key_id)
        .ciphertext_blob(Blob::new(ciphertext))
        .set_encryption_context(Some(context_of(record)))
        .send()
        .await?;
    Ok(decrypted
        .plaintext()
        .map(|blob| blob.as_ref().to_vec())
        .unwrap_or_default())
}

fn spawn_role(role: &str, config: &Config, dir: &Path) -> anyhow::Result<ChildRole> {
    let path = dir.join(format!("{role}.toml"));
    write_config(config, &path)?;
    let path = path.to_string_lossy().to_string();
    ChildRole::spawn_with_env(role, &binary(), &[role, "-c", &path], &CREDENTIAL_ENV)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_held_by_a_kms_survive_its_outage_and_move_to_a_new_key_by_rewrap()
-> anyhow::Result<()> {
    let peers = common::start_peers(2).await?;
    let kms = Moto::start()?;
    let dir = tempfile::tempdir()?;
    let bucket = peers.s3.bucket_dir();
    let first_key = kms.create_key("chatvault test key 1").await?;

    let mut config = peers.config.clone();
    config.shared.keys.provider = KeyProviderKind::AwsKms;
    config.shared.keys.aws_kms = kms.config(&first_key);
    // Short, so that both roles go back to the KMS during the outage below.
    config.shared.keys.cache_ttl = Duration::from_secs(1);
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();
    config.restorer.grpc_listen = free_address()?;

    // Misconfiguration fails start-up, naming the setting: statically (no key) and at the KMS (no such key).
    let mut keyless = config.clone();
    keyless.shared.keys.aws_kms.key_id = String::new();
    write_config(&keyless, &dir.path().join("keyless.toml"))?;
    let checked = common::run_chatvault(
        &[
            "config",
            "check",
            "-c",
            &dir.path().join("keyless.toml").to_string_lossy(),
        ],
        &CREDENTIAL_ENV,
    )
    .await?;
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success(), "{stderr}");
    assert!(stderr.contains("keys.aws_kms.key_id"), "{stderr}");
    let mut missing = config.clone();
    missing.shared.keys.aws_kms.key_id = "alias/no-such-key".into();
    write_config(&missing, &dir.path().join("missing.toml"))?;
    let started = common::run_chatvault(
        &[
            "archiver",
            "-c",
            &dir.path().join("missing.toml").to_string_lossy(),
        ],
        &CREDENTIAL_ENV,
    )
    .await?;
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success(), "{stderr}");
    assert!(
        stderr.contains("keys.aws_kms.key_id") && stderr.contains("NotFoundException"),
        "{stderr}"
    );

    // A KMS nobody answers at (a closed port).
    let mut unreachable = config.clone();
    unreachable.shared.keys.aws_kms.endpoint_url = format!("http://{}", free_address()?);
    write_config(&unreachable, &dir.path().join("unreachable.toml"))?;
    let started = common::run_chatvault(
        &[
            "archiver",
            "-c",
            &dir.path().join("unreachable.toml").to_string_lossy(),
        ],
        &CREDENTIAL_ENV,
    )
    .await?;
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success(), "{stderr}");
    assert!(
        stderr.contains("keys.aws_kms.endpoint_url") && stderr.contains("could not be reached"),
        "{stderr}"
    );

    // Archive and restore through the KMS.
    let gateway = start_gateway(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    let _archiver = spawn_role("archiver", &config, dir.path())?;
    let restorer_endpoint = format!("http://{}", config.restorer.grpc_listen);
    let mut restorer = spawn_role("restorer", &config, dir.path())?;
    wait_until_serving(&restorer_endpoint, RESTORE_SERVICE, Duration::from_secs(60)).await?;

    let november: Vec<ChatEvent> = (0..12)
        .map(|i| {
            let tenant = if i % 3 == 2 { "globex" } else { "acme" };
            let conversation = if i % 2 == 0 { "C1" } else { "C2" };
            event(
                tenant,
                conversation,
                &format!("nov-{i}"),
                common::BASE_MICROS + i * 60_000_000,
            )
        })
        .collect();
    ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: november.clone(),
            },
            INGEST_TOKEN,
        ))
        .await?;
    let mut expected: BTreeSet<String> = november.iter().map(|event| event.text.clone()).collect();
    common::wait_for_restored(
        &restorer_endpoint,
        &["acme", "globex"],
        &expected,
        Duration::from_secs(90),
    )
    .await?;
    let records = key_records(&bucket)?;
    let acme_november = &records["keys/tenant=acme/period=2025-11.json"];
    assert_eq!(acme_november["provider"], "aws_kms", "{acme_november}");
    assert_eq!(
        acme_november["kek_id"],
        first_key.as_str(),
        "{acme_november}"
    );
    // The wrapped key is bound to its tenant and month: the KMS refuses it under another context.
    let mut swapped = acme_november.clone();
    swapped["tenant_id"] = "globex".into();
    assert!(decrypt_record(&kms, &swapped, &first_key).await.is_err());

    // The KMS hangs: events of a new month are acknowledged but cannot be committed (no data key can be
    // generated); once it answers again, every one of them is archived.
    kms.pause()?;
    let december_micros = common::BASE_MICROS + 10 * DAY_MICROS; // 2025-12-04
    let december: Vec<ChatEvent> = (0..8)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            event(
                tenant,
                "C3",
                &format!("dec-{i}"),
                december_micros + i * 60_000_000,
            )
        })
        .collect();
    ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: december.clone(),
            },
            INGEST_TOKEN,
        ))
        .await?;
    // Long enough for the archiver to seal and try to commit December's batch several times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = key_records(&bucket)?;
    assert!(
        !during.contains_key("keys/tenant=acme/period=2025-12.json"),
        "a data key was created while the KMS was hung: {during:?}"
    );
    assert!(
        !bucket.join("events/tenant=acme/date=2025-12-04").exists(),
        "December's events were committed without a data key"
    );
    kms.resume()?;
    expected.extend(december.iter().map(|event| event.text.clone()));
    common::wait_for_restored(
        &restorer_endpoint,
        &["acme", "globex"],
        &expected,
        Duration::from_secs(120),
    )
    .await?;

    // Rotation: a new KMS key in the configuration, then rewrap.
    let second_key = kms.create_key("chatvault test key 2").await?;
    let mut rotated = config.clone();
    rotated.shared.keys.aws_kms.key_id = second_key.clone();
    let rotated_path = dir.path().join("rotated.toml");
    write_config(&rotated, &rotated_path)?;
    let rotated_path = rotated_path.to_string_lossy().to_string();
    // `keys rotate` is for the keyring; with a KMS it says how to rotate there.
    let refused = common::run_chatvault(
        &["keys", "rotate", "--tenant", "acme", "-c", &rotated_path],
        &CREDENTIAL_ENV,
    )
    .await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("rotate in the KMS") && stderr.contains("keys rewrap"),
        "{stderr}"
    );

    let before = key_records(&bucket)?;
    let mut plaintexts = BTreeMap::new();
    for (path, record) in &before {
        assert_eq!(record["kek_id"], first_key.as_str(), "{path}: {record}");
        plaintexts.insert(
            path.clone(),
            decrypt_record(&kms, record, &first_key).await?,
        );
    }
    // acme and globex for two months, and the audit trail's own keys.
    assert!(before.len() >= 5, "{before:?}");
    assert!(
        before
            .keys()
            .any(|path| path.starts_with("keys/tenant=_audit/")),
        "{before:?}"
    );
    let rewrap = common::run_chatvault(
        &["keys", "rewrap", "-c", &rotated_path, "--json"],
        &CREDENTIAL_ENV,
    )
    .await?;
    assert!(rewrap.status.success(), "{rewrap:?}");
    let report: serde_json::Value = serde_json::from_slice(&rewrap.stdout)?;
    // Records created between the listing above and the rewrap (an audit month) are rewrapped too.
    assert!(
        report["rewrapped"].as_u64() >= Some(before.len() as u64),
        "{report}"
    );
    assert_eq!(report["failed"], 0, "{report}");
    let after = key_records(&bucket)?;
    for (path, plaintext) in &plaintexts {
        let record = &after[path];
        assert_eq!(record["kek_id"], second_key.as_str(), "{path}: {record}");
        assert!(record["rewrapped_at_micros"].as_i64() > Some(0), "{record}");
        assert_eq!(record["dek_id"], before[path]["dek_id"], "{path}");
        // The same data key, now under the second key; the first no longer opens the record.
        assert_eq!(&decrypt_record(&kms, record, &second_key).await?, plaintext);
        assert!(decrypt_record(&kms, record, &first_key).await.is_err());
    }
    // Again: nothing left to do.
    let again = common::run_chatvault(
        &[
            "keys",
            "rewrap",
            "-c",
            &rotated_path,
            "--tenant",
            "acme",
            "--json",
        ],
        &CREDENTIAL_ENV,
    )
    .await?;
    assert!(again.status.success(), "{again:?}");
    let report: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(report["rewrapped"], 0, "{report}");
    assert!(report["current"].as_u64() >= Some(2), "{report}");

    // A restorer that knows only the second key restores everything.
    restorer.terminate_and_wait(Duration::from_secs(30)).await?;
    let _restorer = spawn_role("restorer", &rotated, dir.path())?;
    wait_until_serving(&restorer_endpoint, RESTORE_SERVICE, Duration::from_secs(60)).await?;
    common::wait_for_restored(
        &restorer_endpoint,
        &["acme", "globex"],
        &expected,
        Duration::from_secs(60),
    )
    .await?;

    // Each rewrap was recorded in the audit trail before it acted, naming the operator.
    let records: Vec<AuditRecord> = read_topic(&peers.kafka.brokers, &format!("{TOPIC}.audit"))?
        .iter()
        .map(|payload| AuditRecord::decode(payload.as_slice()))
        .collect::<Result<_, _>>()?;
    let rewraps: Vec<(&str, &str)> = records
        .iter()
        .filter(|record| record.action == "keys.rewrap")
        .map(|record| (record.tenant_id.as_str(), record.subject.as_str()))
        .collect();
    assert_eq!(rewraps.len(), 2, "{rewraps:?}");
    assert_eq!(rewraps[1].0, "acme");
    assert!(
        rewraps
            .iter()
            .all(|(_, subject)| subject.starts_with("operator:")),
        "{rewraps:?}"
    );
    gateway.stop().await?;
    Ok(())
}
