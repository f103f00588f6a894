//! Tenants' key-encryption keys in a PKCS#11 token (SoftHSM2 through cryptoki), with the archiver, the restorer
//! and the key commands as `chatvault` processes over a real broker and S3 server:
//! - a wrong module, token label or PIN fails start-up naming the setting;
//! - events are archived and restored with data keys wrapped on the token;
//! - `chatvault keys rotate` makes a new token key current (new months are wrapped under it), `keys rewrap`
//!   moves the older records to it, `keys retire` destroys the old version on the token, and everything still
//!   restores;
//! - a whole-tenant shred destroys the tenant's keys on the token.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chatvault_config::Config;
use chatvault_core::config::KeyProviderKind;
use chatvault_proto::v1::{ChatEvent, IngestBatchRequest};
use chatvault_testkit::pipeline::{INGEST_TOKEN, authorized, ingest_client, start_gateway};
use chatvault_testkit::process::{ChildRole, free_address, wait_until_serving, write_config};
use chatvault_testkit::softhsm::SoftHsm;

const RESTORE_SERVICE: &str = "chatvault.v1.RestoreService";
const DAY_MICROS: i64 = 86_400_000_000;

fn event(tenant: &str, conversation: &str, id: &str, at_micros: i64) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation.into(),
        occurred_at_micros: at_micros,
        ..common::message_event(tenant, id, &format!("text of {id}"))
    }
}

/// `chatvault <args>` finding the token.
async fn run(hsm: &SoftHsm, args: &[&str]) -> anyhow::Result<std::process::Output> {
    common::run_chatvault(args, &hsm.env()).await
}

fn key_record(bucket: &Path, tenant: &str, period: &str) -> anyhow::Result<serde_json::Value> {
    let path = bucket.join(format!("keys/tenant={tenant}/period={period}.json"));
    Ok(serde_json::from_slice(&std::fs::read(&path).map_err(
        |error| anyhow::anyhow!("{}: {error}", path.display()),
    )?)?)
}

fn spawn_role(role: &str, config: &Config, dir: &Path, hsm: &SoftHsm) -> anyhow::Result<ChildRole> {
    let path = dir.join(format!("{role}.toml"));
    write_config(config, &path)?;
    let path = path.to_string_lossy().to_string();
    ChildRole::spawn_with_env(
        role,
        Path::new(env!("CARGO_BIN_EXE_chatvault")),
        &[role, "-c", &path],
        &hsm.env(),
    )
}

/// `chatvault archiver` with `config` must fail at start-up naming `setting`.
async fn refused_at_start_up(
    hsm: &SoftHsm,
    config: &Config,
    dir: &Path,
    setting: &str,
) -> anyhow::Result<()> {
    let path: PathBuf = dir.join("bad.toml");
    write_config(config, &path)?;
    let output = run(hsm, &["archiver", "-c", &path.to_string_lossy()]).await?;
    let text = common::output_text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains(setting), "expected {setting}: {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_wrapped_on_a_pkcs11_token_archive_restore_rotate_and_shred() -> anyhow::Result<()>
{
    let peers = common::start_peers(2).await?;
    let hsm = SoftHsm::start("chatvault-test")?;
    let dir = tempfile::tempdir()?;
    let bucket = peers.s3.bucket_dir();
    let mut config = peers.config.clone();
    config.shared.keys.provider = KeyProviderKind::Pkcs11;
    config.shared.keys.pkcs11 = hsm.config();
    config.shared.keys.cache_ttl = Duration::from_secs(1);
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();
    config.restorer.grpc_listen = free_address()?;

    // Misconfiguration fails start-up, naming the setting.
    let mut bad = config.clone();
    bad.shared.keys.pkcs11.pin = Some("wrong-pin".into());
    refused_at_start_up(&hsm, &bad, dir.path(), "keys.pkcs11.pin").await?;
    let mut bad = config.clone();
    bad.shared.keys.pkcs11.token_label = "no-such-token".into();
    refused_at_start_up(&hsm, &bad, dir.path(), "keys.pkcs11.token_label").await?;
    let mut bad = config.clone();
    bad.shared.keys.pkcs11.module = "/usr/lib/no-such-pkcs11.so".into();
    refused_at_start_up(&hsm, &bad, dir.path(), "keys.pkcs11.module").await?;

    let gateway = start_gateway(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    let _archiver = spawn_role("archiver", &config, dir.path(), &hsm)?;
    let endpoint = format!("http://{}", config.restorer.grpc_listen);
    let _restorer = spawn_role("restorer", &config, dir.path(), &hsm)?;
    wait_until_serving(&endpoint, RESTORE_SERVICE, Duration::from_secs(60)).await?;

    let november = common::BASE_MICROS;
    let first: Vec<ChatEvent> = vec![
        event("acme", "C1", "nov-1", november),
        event("acme", "C2", "nov-2", november + 60_000_000),
        event("globex", "C1", "globex-nov-1", november),
    ];
    ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: first.clone(),
            },
            INGEST_TOKEN,
        ))
        .await?;
    let mut acme: BTreeSet<String> =
        BTreeSet::from(["text of nov-1".into(), "text of nov-2".into()]);
    common::wait_for_restored(&endpoint, &["acme"], &acme, Duration::from_secs(90)).await?;
    common::wait_for_restored(
        &endpoint,
        &["globex"],
        &BTreeSet::from(["text of globex-nov-1".to_string()]),
        Duration::from_secs(90),
    )
    .await?;
    let record = key_record(&bucket, "acme", "2025-11")?;
    assert_eq!(record["provider"], "pkcs11", "{record}");
    assert_eq!(record["kek_id"], "chatvault-kek-acme-v1", "{record}");

    // Rotate on the token; a new month is wrapped under the new version; rewrap moves November.
    let config_path = dir
        .path()
        .join("archiver.toml")
        .to_string_lossy()
        .to_string();
    let rotated = run(
        &hsm,
        &[
            "keys",
            "rotate",
            "--tenant",
            "acme",
            "-c",
            &config_path,
            "--json",
        ],
    )
    .await?;
    assert!(
        rotated.status.success(),
        "{}",
        common::output_text(&rotated)
    );
    let rotation: serde_json::Value = serde_json::from_slice(&rotated.stdout)?;
    assert_eq!(
        rotation["previous_kek_id"], "chatvault-kek-acme-v1",
        "{rotation}"
    );
    assert_eq!(
        rotation["current_kek_id"], "chatvault-kek-acme-v2",
        "{rotation}"
    );
    ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: vec![event("acme", "C3", "dec-1", november + 10 * DAY_MICROS)],
            },
            INGEST_TOKEN,
        ))
        .await?;
    acme.insert("text of dec-1".into());
    common::wait_for_restored(&endpoint, &["acme"], &acme, Duration::from_secs(90)).await?;
    assert_eq!(
        key_record(&bucket, "acme", "2025-12")?["kek_id"],
        "chatvault-kek-acme-v2"
    );
    let rewrap = run(
        &hsm,
        &[
            "keys",
            "rewrap",
            "--tenant",
            "acme",
            "-c",
            &config_path,
            "--json",
        ],
    )
    .await?;
    assert!(rewrap.status.success(), "{}", common::output_text(&rewrap));
    let report: serde_json::Value = serde_json::from_slice(&rewrap.stdout)?;
    assert_eq!(
        (&report["rewrapped"], &report["current"], &report["failed"]),
        (&1.into(), &1.into(), &0.into()),
        "{report}"
    );
    assert_eq!(
        key_record(&bucket, "acme", "2025-11")?["kek_id"],
        "chatvault-kek-acme-v2"
    );
    // Version 1 is no longer needed: retired (destroyed on the token), everything still restores; the current
    // version cannot be retired.
    let current = run(
        &hsm,
        &[
            "keys",
            "retire",
            "--tenant",
            "acme",
            "--kek",
            "chatvault-kek-acme-v2",
            "-c",
            &config_path,
        ],
    )
    .await?;
    assert!(!current.status.success());
    assert!(
        common::output_text(&current).contains("rotate first"),
        "{}",
        common::output_text(&current)
    );
    let retired = run(
        &hsm,
        &[
            "keys",
            "retire",
            "--tenant",
            "acme",
            "--kek",
            "chatvault-kek-acme-v1",
            "-c",
            &config_path,
        ],
    )
    .await?;
    assert!(
        retired.status.success(),
        "{}",
        common::output_text(&retired)
    );
    assert!(
        common::output_text(&retired).contains("destroyed chatvault-kek-acme-v1"),
        "{}",
        common::output_text(&retired)
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    common::wait_for_restored(&endpoint, &["acme"], &acme, Duration::from_secs(90)).await?;

    // A whole-tenant shred destroys globex's key on the token.
    let shred = run(
        &hsm,
        &[
            "keys",
            "shred",
            "--tenant",
            "globex",
            "--reason",
            "offboarding",
            "--yes",
            "--json",
            "-c",
            &config_path,
        ],
    )
    .await?;
    assert!(shred.status.success(), "{}", common::output_text(&shred));
    let report: serde_json::Value = serde_json::from_slice(&shred.stdout)?;
    assert!(
        report["key_encryption_keys"]
            .as_str()
            .is_some_and(|done| done.contains("chatvault-kek-globex-v1")),
        "{report}"
    );
    let again = run(
        &hsm,
        &[
            "keys",
            "shred",
            "--tenant",
            "globex",
            "--dry-run",
            "-c",
            &config_path,
        ],
    )
    .await?;
    let text = common::output_text(&again);
    assert!(again.status.success(), "{text}");
    assert!(
        !text.contains("chatvault-kek-globex-v1") && !text.contains("data key globex/"),
        "globex's keys are gone from the token and the archive: {text}"
    );
    // acme is untouched.
    common::wait_for_restored(&endpoint, &["acme"], &acme, Duration::from_secs(90)).await?;
    gateway.stop().await?;
    Ok(())
}

/// The checkpoint signing key on the token: `checkpoint keygen --pkcs11-label` creates an Ed25519 key pair
/// there (once), `checkpoint sign` signs with it, and `verify` accepts the checkpoints with the printed
/// verifier key and rejects them with another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_signed_by_an_ed25519_key_that_stays_on_the_token() -> anyhow::Result<()> {
    let hsm = SoftHsm::start("chatvault-signing")?;
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive)?;
    let store: std::sync::Arc<dyn object_store::ObjectStore> = std::sync::Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&archive)?,
    );
    let keys = chatvault_archive::keys::DataKeys::with_local_keyring(
        store.clone(),
        &dir.path().join("keyring.json"),
    )?;
    let fixture = chatvault_restorer::testing::Fixture::over(store, keys, "chatvault.events");
    for seq in 0..2 {
        fixture
            .commit_batch(
                0,
                &[event("acme", "C1", &format!("m{seq}"), common::BASE_MICROS)],
            )
            .await;
    }
    let mut config = Config::default();
    config.shared.storage.url = format!("file://{}", archive.display());
    config.shared.keys.pkcs11 = hsm.config();
    config.shared.integrity.signing_key_pkcs11_label = Some("checkpoints".into());
    config.shared.integrity.origin = Some("chatvault.test/hsm".into());
    let path = dir.path().join("chatvault.toml");
    write_config(&config, &path)?;
    let path = path.to_string_lossy().to_string();

    let keygen = [
        "checkpoint",
        "keygen",
        "--origin",
        "chatvault.test/hsm",
        "--pkcs11-label",
        "checkpoints",
        "-c",
        &path,
    ];
    let output = run(&hsm, &keygen).await?;
    assert!(output.status.success(), "{}", common::output_text(&output));
    let verifier = String::from_utf8(output.stdout)?.trim().to_string();
    assert!(verifier.starts_with("chatvault.test/hsm+"), "{verifier}");
    // One key per label: a second keygen is refused rather than shadowing the first.
    let output = run(&hsm, &keygen).await?;
    assert!(
        !output.status.success() && common::output_text(&output).contains("already holds"),
        "{}",
        common::output_text(&output)
    );

    let output = run(&hsm, &["checkpoint", "sign", "-c", &path]).await?;
    assert!(output.status.success(), "{}", common::output_text(&output));
    let output = run(&hsm, &["verify", "-c", &path, "--trusted-key", &verifier]).await?;
    let text = common::output_text(&output);
    assert!(
        output.status.success()
            && text.contains("signatures verified")
            && text.contains("covers 2 manifest(s)"),
        "{text}"
    );
    let (other, _) = chatvault_archive::tlog::note::SigningKey::generate("chatvault.test/hsm")?;
    use chatvault_archive::tlog::note::NoteSigner;
    let output = run(
        &hsm,
        &[
            "verify",
            "-c",
            &path,
            "--trusted-key",
            &other.verifier_key(),
        ],
    )
    .await?;
    assert!(!output.status.success(), "{}", common::output_text(&output));

    // A key file and an HSM label at once is a configuration error naming the setting.
    let mut both = config.clone();
    both.shared.integrity.signing_key_path = Some(dir.path().join("key"));
    let both_path = dir.path().join("both.toml");
    write_config(&both, &both_path)?;
    let output = run(
        &hsm,
        &["config", "check", "-c", &both_path.to_string_lossy()],
    )
    .await?;
    assert!(
        !output.status.success()
            && common::output_text(&output).contains("integrity.signing_key_pkcs11_label"),
        "{}",
        common::output_text(&output)
    );
    Ok(())
}
