//! S3 Object Lock end to end, on a real S3 API with Object Lock (moto's server) and a real Kafka protocol peer
//! (librdkafka's mock cluster): the archiver writes event files and manifests with the retain-until date of
//! the retention policies and the legal-hold flag of the holds; S3 refuses to delete them; disposition of
//! expired data deletes every version and its signed report verifies; a hold placed or released later
//! reaches the files already written; an erasure of a file S3 keeps says so and offers the shred; `chatvault
//! doctor` checks the bucket; `chatvault verify` passes throughout.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chatvault_archive::disposition::{
    DispositionLog, DispositionReport, Document, Plan, check_report,
};
use chatvault_archive::governance::policy::DAY_MICROS;
use chatvault_archive::tlog::note::{NoteSigner, SigningKey, VerifierKey};
use chatvault_core::config::LockMode;
use chatvault_core::object_lock::{LockStatus, LockingS3, ObjectLock};
use chatvault_core::storage::locking_store_from_config;
use chatvault_proto::v1::IngestBatchRequest;
use chatvault_testkit::moto::Moto;
use chatvault_testkit::pipeline::{
    ACME_HOLD_TOKEN, ACME_POLICY_TOKEN, INGEST_TOKEN, TOPIC, authorized, ingest_client,
    start_archiver, start_gateway, start_restorer, wait_until,
};
use chatvault_testkit::process::write_config;
use common::output_text as text;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// S3 keeps dates in milliseconds.
fn millis(micros: i64) -> i64 {
    micros / 1000 * 1000
}

/// The one object under `prefix` whose name contains `needle`.
async fn object_under(store: &dyn ObjectStore, prefix: &str, needle: &str) -> anyhow::Result<Path> {
    let found: Vec<Path> = store
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location)
        .try_filter(|path| std::future::ready(path.as_ref().contains(needle)))
        .try_collect()
        .await?;
    anyhow::ensure!(
        found.len() == 1,
        "objects under {prefix} with {needle}: {found:?}"
    );
    Ok(found[0].clone())
}

/// Polls the lock of `path` until `done` says so; fails after a minute showing the last one.
async fn wait_for_lock(
    locking: &LockingS3,
    path: &Path,
    done: impl Fn(&LockStatus) -> bool,
) -> anyhow::Result<LockStatus> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = locking.lock_of(path).await?;
        if done(&status) {
            return Ok(status);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the lock of {path} did not change as expected: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_writes_locks_and_s3_refuses_deleting_locked_versions() -> anyhow::Result<()> {
    let moto = Moto::start()?;
    moto.create_locked_bucket("worm").await?;
    let storage = moto.storage_config("worm", LockMode::Compliance);
    let locking = locking_store_from_config(&storage)?.expect("object lock is on");
    let store: std::sync::Arc<dyn ObjectStore> = locking.clone();
    let until = chatvault_core::time::now_micros() + DAY_MICROS;
    let put = async |name: &str, lock: ObjectLock| {
        store
            .put_opts(
                &Path::from(name),
                PutPayload::from_static(b"bytes"),
                lock.put_options(PutOptions::from(PutMode::Create)),
            )
            .await
    };

    // A retained version cannot be deleted; it still reads.
    put(
        "retained",
        ObjectLock {
            retain_until_micros: Some(until),
            legal_hold: false,
        },
    )
    .await?;
    let status = locking.lock_of(&Path::from("retained")).await?;
    assert_eq!(status.mode.as_deref(), Some("COMPLIANCE"));
    assert_eq!(status.retain_until_micros, Some(millis(until)));
    let refused = store.delete(&Path::from("retained")).await.unwrap_err();
    assert!(
        matches!(refused, object_store::Error::PermissionDenied { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("retained"), "{refused}");
    assert_eq!(
        store
            .get(&Path::from("retained"))
            .await?
            .bytes()
            .await?
            .as_ref(),
        b"bytes"
    );
    // Retention moves later (S3 refuses an earlier date in compliance mode; moto does not model that).
    locking
        .extend_retention(&Path::from("retained"), until + DAY_MICROS)
        .await?;
    assert_eq!(
        locking
            .lock_of(&Path::from("retained"))
            .await?
            .retain_until_micros,
        Some(millis(until + DAY_MICROS))
    );

    // A legal hold blocks deletion until it is cleared; then every version goes, not only the current one.
    put(
        "held",
        ObjectLock {
            retain_until_micros: None,
            legal_hold: true,
        },
    )
    .await?;
    assert!(locking.lock_of(&Path::from("held")).await?.legal_hold);
    assert!(store.delete(&Path::from("held")).await.is_err());
    locking.set_legal_hold(&Path::from("held"), false).await?;
    store.delete(&Path::from("held")).await?;
    assert_eq!(moto.versions("worm", "held").await?, Vec::<String>::new());

    // Unlocked objects (key records) stay deletable; the commit protocol's conditional create holds.
    put("plain", ObjectLock::default()).await?;
    assert!(matches!(
        put("plain", ObjectLock::default()).await,
        Err(object_store::Error::AlreadyExists { .. })
    ));
    assert!(
        !locking
            .lock_of(&Path::from("plain"))
            .await?
            .blocks_deletion(0)
    );
    store.delete(&Path::from("plain")).await?;
    assert_eq!(moto.versions("worm", "plain").await?, Vec::<String>::new());

    // Object Lock is refused on storage that is not S3.
    let local = chatvault_core::config::StorageConfig {
        url: "memory://".into(),
        object_lock: LockMode::Governance,
        ..Default::default()
    };
    let error = locking_store_from_config(&local).unwrap_err();
    assert!(error.message().contains("storage.object_lock"), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_objects_carry_policy_retention_and_hold_flags_and_disposition_respects_them()
-> anyhow::Result<()> {
    let peers = common::start_peers(1).await?;
    let moto = Moto::start()?;
    moto.create_locked_bucket("worm").await?;
    moto.create_bucket("plain").await?;
    let mut config = peers.config.clone();
    config.shared.storage = moto.storage_config("worm", LockMode::Governance);
    config.restorer.lock_sync_delay = Duration::from_secs(1);
    let dir = tempfile::tempdir()?;
    let (signing_key, key_text) = SigningKey::generate("object-lock.test")?;
    let key_path = dir.path().join("signing-key");
    std::fs::write(&key_path, key_text)?;
    config.shared.integrity.signing_key_path = Some(key_path);
    let verifier = VerifierKey::parse(&signing_key.verifier_key())?;
    let config_path: PathBuf = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let config_arg = config_path.to_string_lossy().to_string();
    let locking = locking_store_from_config(&config.shared.storage)?.expect("object lock is on");
    let store: std::sync::Arc<dyn ObjectStore> = locking.clone();

    // `chatvault doctor` passes the locked bucket and fails one without Object Lock.
    let doctor = common::run_chatvault(&["doctor", "-c", &config_arg, "--json"], &[]).await?;
    assert!(doctor.status.success(), "{}", text(&doctor));
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout)?;
    let statuses: Vec<(String, String)> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|check| {
            (
                check["name"].as_str().unwrap_or_default().to_string(),
                check["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for name in [
        "storage answers",
        "conditional create",
        "object lock enabled",
        "versioning",
        "no default retention",
        "legal hold honoured",
    ] {
        assert!(
            statuses.contains(&(name.to_string(), "ok".to_string())),
            "{name}: {statuses:?}"
        );
    }
    let mut plain = config.clone();
    plain.shared.storage = moto.storage_config("plain", LockMode::Governance);
    let plain_path = dir.path().join("plain.toml");
    write_config(&plain, &plain_path)?;
    let doctor =
        common::run_chatvault(&["doctor", "-c", &plain_path.to_string_lossy()], &[]).await?;
    assert!(!doctor.status.success());
    assert!(
        text(&doctor).contains("FAIL  object lock enabled"),
        "{}",
        text(&doctor)
    );

    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let run =
        |token: &'static str, args: &[&str]| common::run_with_restorer(&endpoint, token, args);
    let ok = |output: std::process::Output| {
        assert!(output.status.success(), "{}", text(&output));
        output
    };

    // Governance first: chat goes after a year, C2 is kept ten years, C3 is under a hold.
    for (token, args) in [
        (
            ACME_POLICY_TOKEN,
            &[
                "policy",
                "set",
                "--tenant",
                "acme",
                "--id",
                "chat-1y",
                "--delete-after",
                "365d",
            ][..],
        ),
        (
            ACME_POLICY_TOKEN,
            &[
                "policy",
                "set",
                "--tenant",
                "acme",
                "--id",
                "keep-c2",
                "--scope",
                "conversation:C2",
                "--retain",
                "3650d",
            ][..],
        ),
        (
            ACME_HOLD_TOKEN,
            &[
                "hold",
                "place",
                "--tenant",
                "acme",
                "--id",
                "h1",
                "--matter",
                "Doe v. Acme",
                "--conversation",
                "C3",
            ][..],
        ),
    ] {
        ok(run(token, args).await?);
    }

    let recent = common::BASE_MICROS; // 2025-11-24
    let old = recent - 400 * DAY_MICROS; // 2024-10-20
    let c2_at = old - 2 * DAY_MICROS; // 2024-10-18
    let c3_at = old - 5 * DAY_MICROS; // 2024-10-15
    let events = vec![
        common::chat_event("acme", "C1", "c1-old", old, "u-bob", &[]),
        common::chat_event("acme", "C1", "c1-new", recent, "u-bob", &[]),
        common::chat_event("acme", "C2", "c2-ann", c2_at, "u-ann", &[]),
        common::chat_event("acme", "C2", "c2-bob", c2_at + 60_000_000, "u-bob", &[]),
        common::chat_event("acme", "C3", "c3-old", c3_at, "u-carl", &[]),
    ];
    let total = events.len() as u64;
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= total
        })
        .await,
        "the events were not archived"
    );

    // Each file carries what its events ask: C2's the ten-year retention of its latest event, C3's the hold
    // flag, C1's nothing (deletion policies set no date). The manifest carries the union.
    let events_prefix = "events/tenant=acme";
    let c1_old_file = object_under(store.as_ref(), events_prefix, "date=2024-10-20").await?;
    let c1_new_file = object_under(store.as_ref(), events_prefix, "date=2025-11-24").await?;
    let c2_file = object_under(store.as_ref(), events_prefix, "date=2024-10-18").await?;
    let c3_file = object_under(store.as_ref(), events_prefix, "date=2024-10-15").await?;
    let c2_until = millis(c2_at + 60_000_000 + 3650 * DAY_MICROS);
    let c2_lock = locking.lock_of(&c2_file).await?;
    assert_eq!(
        (
            c2_lock.mode.as_deref(),
            c2_lock.retain_until_micros,
            c2_lock.legal_hold
        ),
        (Some("GOVERNANCE"), Some(c2_until), false)
    );
    let c3_lock = locking.lock_of(&c3_file).await?;
    assert_eq!(
        (c3_lock.retain_until_micros, c3_lock.legal_hold),
        (None, true)
    );
    assert_eq!(locking.lock_of(&c1_old_file).await?, LockStatus::default());
    let manifest =
        object_under(store.as_ref(), &format!("manifests/topic={TOPIC}"), ".json").await?;
    let manifest_lock = locking.lock_of(&manifest).await?;
    assert_eq!(
        (manifest_lock.retain_until_micros, manifest_lock.legal_hold),
        (Some(c2_until), true)
    );

    // S3 refuses to delete what is retained or held, and every version stays.
    for locked in [&c2_file, &c3_file, &manifest] {
        let refused = store.delete(locked).await.unwrap_err();
        assert!(
            matches!(refused, object_store::Error::PermissionDenied { .. }),
            "{refused}"
        );
        assert!(!moto.versions("worm", locked.as_ref()).await?.is_empty());
    }

    // Disposition of expired data: C1's old event goes (its file had no lock, every version is deleted); C3's
    // is held. The signed report verifies.
    let planned = ok(run(
        ACME_POLICY_TOKEN,
        &[
            "retention",
            "plan",
            "--tenant",
            "acme",
            "--as-of",
            "2025-12-01T00:00:00Z",
            "--json",
        ],
    )
    .await?);
    let plan: Plan = serde_json::from_slice(&planned.stdout)?;
    assert!(plan.shred_offers.is_empty(), "{plan:?}");
    let applied = ok(run(
        ACME_POLICY_TOKEN,
        &[
            "retention",
            "apply",
            "--tenant",
            "acme",
            "--plan",
            &plan.plan_id.to_string(),
            "--json",
        ],
    )
    .await?);
    let report: DispositionReport = serde_json::from_slice(&applied.stdout)?;
    assert_eq!(
        (report.rows_removed, report.rows_held),
        (1, 1),
        "{report:?}"
    );
    assert!(report.objects_left.is_empty(), "{report:?}");
    assert!(
        moto.versions("worm", c1_old_file.as_ref())
            .await?
            .is_empty()
    );
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C1").await?,
        ["c1-new".to_string()].into()
    );

    // A hold placed after the write reaches the file already written, and its release clears the flag again;
    // C3's file keeps the flag of its own hold.
    ok(run(
        ACME_HOLD_TOKEN,
        &[
            "hold",
            "place",
            "--tenant",
            "acme",
            "--id",
            "h2",
            "--matter",
            "late",
            "--conversation",
            "C1",
        ],
    )
    .await?);
    wait_for_lock(&locking, &c1_new_file, |status| status.legal_hold).await?;
    assert!(store.delete(&c1_new_file).await.is_err());
    ok(run(
        ACME_HOLD_TOKEN,
        &["hold", "release", "--tenant", "acme", "--id", "h2"],
    )
    .await?);
    wait_for_lock(&locking, &c1_new_file, |status| !status.legal_hold).await?;
    assert!(locking.lock_of(&c3_file).await?.legal_hold);

    // Erasure of u-ann: her C2 event is in a file S3 keeps until 2034. The plan says so and offers the shred
    // of the key scope's month; applying takes her event out of every restore, writes the rest of the file
    // anew (locked as before), and reports the original as left in storage.
    let planned = ok(run(
        ACME_POLICY_TOKEN,
        &[
            "erase",
            "plan",
            "--tenant",
            "acme",
            "--subject",
            "u-ann",
            "--json",
            "--reason",
            "DSR-7",
        ],
    )
    .await?);
    let erasure: Plan = serde_json::from_slice(&planned.stdout)?;
    assert_eq!(erasure.totals.rows_removed, 1, "{erasure:?}");
    assert_eq!(erasure.files[0].locked_until_micros, Some(c2_until));
    assert_eq!(erasure.shred_offers.len(), 1, "{erasure:?}");
    assert_eq!(
        erasure.shred_offers[0].command,
        "chatvault keys shred --tenant acme --period 2024-10"
    );
    let readable = text(&ok(run(
        ACME_POLICY_TOKEN,
        &["erase", "plan", "--tenant", "acme", "--subject", "u-ann"],
    )
    .await?));
    assert!(
        readable.contains("kept by S3 Object Lock")
            && readable.contains("chatvault keys shred --tenant acme --period 2024-10"),
        "{readable}"
    );
    let erasure_id = erasure.plan_id.to_string();
    // A second plan exists now; the first is still exact (no governance change since).
    let applied = ok(run(
        ACME_POLICY_TOKEN,
        &[
            "erase",
            "apply",
            "--tenant",
            "acme",
            "--plan",
            &erasure_id,
            "--json",
        ],
    )
    .await?);
    let report: DispositionReport = serde_json::from_slice(&applied.stdout)?;
    assert_eq!(report.objects_left.len(), 1, "{report:?}");
    assert_eq!(report.objects_left[0].path, c2_file.to_string());
    assert!(
        report.objects_left[0]
            .error
            .contains("retained by S3 Object Lock"),
        "{report:?}"
    );
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C2").await?,
        ["c2-bob".to_string()].into()
    );
    let replacement = object_under(store.as_ref(), events_prefix, ".r").await?;
    assert_eq!(
        locking.lock_of(&replacement).await?.retain_until_micros,
        Some(c2_until)
    );

    // Both reports verify; so does the archive (the original C2 file is reported as superseded but present).
    let documents = DispositionLog::new(store.clone())
        .documents(&[verifier])
        .await?;
    let reports: Vec<&DispositionReport> = documents
        .iter()
        .filter_map(|stored| match &stored.document {
            Document::Report(report) => Some(report.as_ref()),
            Document::Plan(_) => None,
        })
        .collect();
    assert_eq!(reports.len(), 2);
    for report in reports {
        check_report(store.clone(), TOPIC, report).await?;
    }
    let verified = common::run_chatvault(&["verify", "-c", &config_arg], &[]).await?;
    assert!(verified.status.success(), "{}", text(&verified));

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}
