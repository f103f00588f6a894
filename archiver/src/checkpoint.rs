//! The archiver's checkpoint task: every `integrity.checkpoint_interval` it appends what was committed since
//! the last checkpoint to the transparency log and signs a checkpoint over it
//! ([`chatvault_archive::tlog::Committer`]); once more after the archivers stopped, so a shutdown leaves
//! everything it committed covered. Every replica runs one; the log's commit protocol lets one win each
//! round. A failing round (storage, or a log that does not verify) is logged and counted and retried on the
//! next tick: it never stops archiving.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use chatvault_archive::tlog::note::VerifierKey;
use chatvault_archive::tlog::{Committer, Round, signer_from_config};
use chatvault_core::config::SharedConfig;
use chatvault_core::error::{Error, Result};
use chatvault_core::metrics::{metrics, outcome_label};
use chatvault_core::shutdown::Shutdown;
use chatvault_core::storage::object_store_from_config;

/// The committer `shared` configures (`integrity`, and `keys.pkcs11` for a key on an HSM), if it names a
/// signing key.
pub fn committer_from_config(
    shared: &SharedConfig,
    store: Arc<dyn ObjectStore>,
    writer_id: &str,
) -> Result<Option<Committer>> {
    let integrity = &shared.integrity;
    let Some(key) = signer_from_config(integrity, &shared.keys.pkcs11)? else {
        return Ok(None);
    };
    let trusted = VerifierKey::parse_all("integrity.trusted_keys", &integrity.trusted_keys)?;
    let verifier = VerifierKey::parse(&key.verifier_key())?;
    if !trusted.is_empty() && !trusted.contains(&verifier) {
        // Restorers and auditors would reject every checkpoint this key signs.
        return Err(Error::invalid_argument(format!(
            "integrity.trusted_keys does not hold the verifier key of the signing key ({}): add it",
            key.verifier_key()
        )));
    }
    let witness = match integrity.witness.url.as_str() {
        "" => None,
        _ => Some(object_store_from_config(&integrity.witness)?),
    };
    Committer::new(store, key, writer_id, witness).map(Some)
}

/// One round, counted and logged.
pub async fn checkpoint_round(committer: &Committer) -> Result<Round> {
    let round = committer.run_once().await;
    let outcome = match &round {
        Ok(Round::Signed {
            tree_size,
            appended,
            ..
        }) => {
            metrics().log_leaves.add(*appended, &[]);
            tracing::info!(
                tree_size,
                appended,
                origin = committer.origin(),
                "signed a checkpoint"
            );
            "signed"
        }
        Ok(Round::UpToDate { .. }) => "up_to_date",
        Ok(Round::Lost) => "lost",
        Err(error) => {
            tracing::error!(%error, "checkpoint round failed; retrying next interval");
            "failed"
        }
    };
    metrics().checkpoint_rounds.add(1, &outcome_label(outcome));
    round
}

/// Runs rounds every `interval` until `shutdown`.
pub async fn run_until(committer: &Committer, interval: Duration, shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {
                let _ = checkpoint_round(committer).await;
            }
        }
    }
}
