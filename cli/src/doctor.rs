//! `chatvault doctor`: checks that the configured storage keeps the promises the archive depends on, with
//! probe objects under `_doctor/` that it removes again.
//!
//! - **Storage answers**: a listing succeeds.
//! - **Conditional create**: a second create (`If-None-Match: *`) of one key is refused. The commit protocol
//!   relies on it: without it two archivers could both commit one sequence number.
//! - With `storage.object_lock` on (S3): the bucket has Object Lock enabled and versioning on; it has no
//!   default retention (which would lock key records too, so crypto-shredding could not destroy them); and
//!   it honours a legal hold (a probe under a hold cannot be deleted, and can once the hold is cleared).
//!
//! Exits non-zero when a check fails; warnings do not fail. `--json` prints the checks as one object.

use std::path::PathBuf;

use anyhow::Context;
use chatvault_config::Config;
use chatvault_core::config::LockMode;
use chatvault_core::object_lock::{LockingS3, ObjectLock};
use chatvault_core::storage::{locking_store_from_config, object_store_from_config};
use clap::Args;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Configuration file naming the archive (`storage`); CHATVAULT__STORAGE__* variables override it.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the checks as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    storage: String,
    object_lock: String,
    checks: Vec<Check>,
    ok: bool,
}

impl Report {
    fn check(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            status,
            detail: detail.into(),
        });
    }
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let storage = &config.shared.storage;
    let locking = locking_store_from_config(storage)?;
    let store: std::sync::Arc<dyn ObjectStore> = match &locking {
        Some(locking) => locking.clone(),
        None => object_store_from_config(storage)?,
    };
    let mut report = Report {
        storage: storage.url.clone(),
        object_lock: format!("{:?}", storage.object_lock).to_lowercase(),
        ..Report::default()
    };
    let probe = |what: &str| -> anyhow::Result<Path> {
        Ok(Path::from(format!(
            "_doctor/{what}-{}",
            chatvault_core::random_hex(8)?
        )))
    };

    match store.list(None).next().await.transpose() {
        Ok(_) => report.check("storage answers", Status::Ok, "listing succeeded"),
        Err(error) => report.check("storage answers", Status::Fail, error.to_string()),
    }
    conditional_create(&mut report, store.as_ref(), &probe("conditional-create")?).await;
    match &locking {
        Some(locking) => object_lock(&mut report, locking, &probe("legal-hold")?).await,
        None => report.check(
            "object lock",
            Status::Ok,
            "off (storage.object_lock): files are deletable by anyone with delete access to the storage",
        ),
    }
    report.ok = report
        .checks
        .iter()
        .all(|check| check.status != Status::Fail);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "storage {} (object lock: {})",
            report.storage, report.object_lock
        );
        for check in &report.checks {
            let mark = match check.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("  {mark}  {}: {}", check.name, check.detail);
        }
        let failed = report
            .checks
            .iter()
            .filter(|check| check.status == Status::Fail)
            .count();
        println!(
            "{}",
            if failed == 0 {
                "every check passed".to_string()
            } else {
                format!("{failed} check(s) failed")
            }
        );
    }
    anyhow::ensure!(report.ok, "the storage fails the checks above");
    Ok(())
}

/// Creates `probe` twice with `If-None-Match: *`: the second must be refused.
async fn conditional_create(report: &mut Report, store: &dyn ObjectStore, probe: &Path) {
    const NAME: &str = "conditional create";
    let create = || {
        store.put_opts(
            probe,
            PutPayload::from_static(b"chatvault doctor probe"),
            PutOptions::from(PutMode::Create),
        )
    };
    match create().await {
        Err(error) => report.check(NAME, Status::Fail, format!("creating {probe}: {error}")),
        Ok(_) => match create().await {
            Err(object_store::Error::AlreadyExists { .. }) => report.check(
                NAME,
                Status::Ok,
                "a second create of one key is refused (If-None-Match: *)",
            ),
            Ok(_) => report.check(
                NAME,
                Status::Fail,
                "a second create of one key succeeded: the storage ignores If-None-Match, and two \
                 archivers could commit one sequence number",
            ),
            Err(error) => report.check(
                NAME,
                Status::Fail,
                format!("creating {probe} again: {error}"),
            ),
        },
    }
    if let Err(error) = store.delete(probe).await
        && !matches!(error, object_store::Error::NotFound { .. })
    {
        report.check(
            "probe removed",
            Status::Warn,
            format!("{probe} could not be removed: {error}"),
        );
    }
}

/// The bucket's Object Lock configuration, and a legal hold that S3 must honour.
async fn object_lock(report: &mut Report, locking: &LockingS3, probe: &Path) {
    let bucket = locking.inspect_bucket().await;
    for error in &bucket.errors {
        report.check("bucket settings", Status::Fail, error.clone());
    }
    if bucket.errors.is_empty() {
        report.check(
            "object lock enabled",
            if bucket.object_lock_enabled {
                Status::Ok
            } else {
                Status::Fail
            },
            if bucket.object_lock_enabled {
                format!(
                    "bucket {} has Object Lock; chatvault writes {:?} mode",
                    bucket.bucket,
                    locking.mode()
                )
                .to_lowercase()
            } else {
                format!(
                    "bucket {} does not have Object Lock enabled (it can only be enabled on a versioned bucket)",
                    bucket.bucket
                )
            },
        );
        let versioned = bucket.versioning.as_deref() == Some("Enabled");
        report.check(
            "versioning",
            if versioned { Status::Ok } else { Status::Fail },
            match &bucket.versioning {
                Some(status) => format!("versioning is {status}"),
                None => "versioning was never enabled".into(),
            },
        );
        match &bucket.default_retention {
            Some(rule) => report.check(
                "no default retention",
                Status::Warn,
                format!(
                    "the bucket locks every new object ({rule}), data key records included: crypto-shredding \
                     cannot destroy a locked key record. chatvault sets each object's retention itself"
                ),
            ),
            None => report.check(
                "no default retention",
                Status::Ok,
                "objects are locked only as chatvault asks",
            ),
        }
    }
    if locking.mode() == LockMode::Off {
        return;
    }
    let held = ObjectLock {
        retain_until_micros: None,
        legal_hold: true,
    };
    let result = async {
        locking
            .put_opts(
                probe,
                PutPayload::from_static(b"chatvault doctor probe"),
                held.put_options(PutOptions::from(PutMode::Create)),
            )
            .await?;
        let status = locking.lock_of(probe).await?;
        anyhow::ensure!(
            status.legal_hold,
            "{probe} was written with a legal hold, and S3 reports none"
        );
        anyhow::ensure!(
            locking.delete_versions(probe).await.is_err(),
            "{probe} is under a legal hold, and S3 deleted it anyway"
        );
        locking.set_legal_hold(probe, false).await?;
        locking
            .delete_versions(probe)
            .await
            .with_context(|| format!("deleting {probe} once its legal hold was cleared"))?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => report.check(
            "legal hold honoured",
            Status::Ok,
            "an object under a legal hold could not be deleted, and could once the hold was cleared",
        ),
        Err(error) => {
            report.check("legal hold honoured", Status::Fail, format!("{error:#}"));
            // Leave no probe behind when it can be helped.
            let _ = locking.set_legal_hold(probe, false).await;
            let _ = locking.delete_versions(probe).await;
        }
    }
}
