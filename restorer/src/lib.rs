//! The restorer: authorized reads that rehydrate archived conversations.
//!
//! - [`index`]: the in-memory index of committed files, built from (and verifying) the manifest chains.
//! - [`reader`]: [`Restorer`], which fetches, verifies, decrypts and decodes archive files and collapses
//!   duplicate events.
//! - [`rehydrate`](mod@rehydrate): from events to the conversation as people saw it (pure).
//! - [`render`]: a plain-text transcript of restored items.
//! - [`stream`]: the streaming restore of one conversation with bounded memory (plan, then emit).
//! - [`service`]: the `chatvault.v1.RestoreService` gRPC API with health and reflection; every call is
//!   recorded in the audit trail (`chatvault_core::audit`).
//! - [`audit_trail`]: the `chatvault.v1.AuditService`: the archived audit trail, verified and queried.
//! - [`key_export`]: the `chatvault.v1.KeyService`: data keys for standard readers, authorized and recorded.

pub mod audit_trail;
pub mod config;
pub mod evidence;
pub mod governance;
pub mod index;
pub mod key_export;
pub mod reader;
pub mod rehydrate;
pub mod render;
pub mod service;
pub mod stream;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use audit_trail::{AuditApi, AuditTrailReader};
pub use index::{ArchiveIndex, TimeRange};
pub use key_export::KeyExportApi;
pub use reader::Restorer;
pub use rehydrate::{rehydrate, restore_items};
pub use render::render_text;
pub use service::{MoreApis, RestoreApi, serve, serve_api};
pub use stream::{BufferLimits, ConversationPlan};

use std::sync::Arc;

use chatvault_archive::keys::DataKeys;
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_core::audit::{AuditSink, Auditor};
use chatvault_core::config::SharedConfig;

use crate::config::RestorerConfig;
use chatvault_core::shutdown::Shutdown;
use chatvault_core::storage::{locking_store_from_config, object_store_from_config};
use object_store::ObjectStore;

/// The restorer role on the shared settings and its `[restorer]` section, serving the RestoreService, the
/// AuditService, the KeyService and the GovernanceService on `listener` until
/// `shutdown` (then draining for `restorer.drain_timeout`), recording every call in `audit` (the Kafka audit
/// topic in production: the caller provides the sink, so this crate does not link a Kafka client). The one
/// assembly of the role: the binary, the test kit and the benchmarks all start it here.
pub async fn run(
    shared: &SharedConfig,
    settings: &RestorerConfig,
    listener: tokio::net::TcpListener,
    audit: Arc<dyn AuditSink>,
    shutdown: Shutdown,
) -> chatvault_core::Result<()> {
    // With Object Lock on, one store serves reads and the lock calls of disposition.
    let locking = locking_store_from_config(&shared.storage)?;
    let store: Arc<dyn ObjectStore> = match &locking {
        Some(locking) => locking.clone(),
        None => object_store_from_config(&shared.storage)?,
    };
    let keys = DataKeys::from_config(store.clone(), &shared.keys).await?;
    let trusted_keys =
        VerifierKey::parse_all("integrity.trusted_keys", &shared.integrity.trusted_keys)?;
    let audit_trail =
        AuditTrailReader::new(store.clone(), keys.clone(), &shared.kafka.audit_topic())
            .with_trusted_keys(trusted_keys.clone());
    let auditor = Auditor::new("restorer", audit);
    let key_export = KeyExportApi::new(keys.clone(), shared.authenticator()?, auditor.clone());
    // The signing key signs disposition reports; without it (or when this role cannot load it) disposition
    // plans are still served and applying is refused with a message naming the setting.
    let signer = match chatvault_archive::tlog::signer_from_config(
        &shared.integrity,
        &shared.keys.pkcs11,
    ) {
        Ok(signer) => signer,
        Err(error) => {
            tracing::warn!(%error, "the integrity signing key cannot be loaded: disposition plans are \
                    served, applying them is refused");
            None
        }
    };
    let governance =
        governance::GovernanceApi::new(store.clone(), shared.authenticator()?, auditor.clone())
            .with_disposition(store.clone(), keys.clone(), &shared.kafka.topic, signer)
            .with_object_lock(locking, settings.lock_sync_delay);
    if !trusted_keys.is_empty() {
        tokio::spawn(watch_drills(
            store.clone(),
            trusted_keys.clone(),
            shutdown.clone(),
        ));
    }
    let restorer = Restorer::new(store, keys, &shared.kafka.topic, settings.read_concurrency)
        .with_buffer_limits(BufferLimits {
            events: settings.max_buffered_events,
            bytes: settings.max_buffered_bytes,
        })
        .with_trusted_keys(trusted_keys);
    let api = RestoreApi::new(Arc::new(restorer), shared.authenticator()?, auditor.clone())
        .with_max_concurrent_requests(settings.max_concurrent_requests);
    let more = MoreApis {
        audit_trail: Some(AuditApi::new(
            Arc::new(audit_trail),
            shared.authenticator()?,
            auditor,
        )),
        key_export: Some(key_export),
        governance: Some(governance),
    };
    serve(listener, api, more, shutdown, settings.drain_timeout).await
}

/// How often the restorer looks for a new restore drill report.
const DRILL_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the `chatvault.drill.last.*` gauges on the newest signed drill report in the archive, so an alert
/// can fire when drills stop running or fail (the drill itself is a short-lived job with no metrics port).
async fn watch_drills(
    store: Arc<dyn object_store::ObjectStore>,
    trusted_keys: Vec<VerifierKey>,
    shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(DRILL_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut reported = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {
                match chatvault_archive::drill::newest_report(store.clone(), &trusted_keys).await {
                    Ok(Some(stored)) if reported != Some(stored.seq) => {
                        chatvault_core::metrics::metrics()
                            .set_last_drill(stored.report.finished_at_micros, stored.report.passed);
                        reported = Some(stored.seq);
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "reading the newest restore drill report"),
                }
            }
        }
    }
}
