//! The restorer's section of the configuration file, `[restorer]` (the loader and the shared sections are
//! in `chatvault_core::config`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use chatvault_core::config::Section;
use chatvault_core::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RestorerConfig {
    /// gRPC listen address. Default `0.0.0.0:50052`.
    pub grpc_listen: String,
    /// Files fetched and decoded at once for one request. Default 4.
    pub read_concurrency: usize,
    /// Restore calls served at once by one restorer; beyond it callers get RESOURCE_EXHAUSTED (retryable).
    /// Default 16.
    pub max_concurrent_requests: usize,
    /// Events one streamed restore gathers in memory at most before sending them (with
    /// `max_buffered_bytes`, the per-request memory bound besides the files in flight). Default 4096.
    pub max_buffered_events: usize,
    /// Bytes of encoded events one streamed restore gathers at most. Default 16 MiB.
    pub max_buffered_bytes: usize,
    /// At shutdown, how long in-flight calls (restore streams) may run after the restorer stopped accepting;
    /// calls still running after it are cut off. Default `20s`.
    #[serde(with = "chatvault_core::duration")]
    pub drain_timeout: Duration,
    /// With `storage.object_lock` on: how long after a governance change the restorer syncs the locks of the
    /// objects already written with it. Archivers read the governance state every 30 s
    /// (`LOCK_RULES_REFRESH`), so this must exceed that plus a batch's commit. Default `1m`.
    #[serde(with = "chatvault_core::duration")]
    pub lock_sync_delay: Duration,
}

impl Default for RestorerConfig {
    fn default() -> Self {
        RestorerConfig {
            grpc_listen: "0.0.0.0:50052".into(),
            read_concurrency: 4,
            max_concurrent_requests: 16,
            max_buffered_events: 4_096,
            max_buffered_bytes: 16 * 1024 * 1024,
            drain_timeout: Duration::from_secs(20),
            lock_sync_delay: Duration::from_secs(60),
        }
    }
}

impl Section for RestorerConfig {
    const NAME: &'static str = "restorer";
    const MILLISECOND_SETTINGS: &'static [&'static str] = &["drain_timeout"];

    fn validate(&self) -> Result<()> {
        let invalid = |setting: &str, message: &str| {
            Err(Error::invalid_argument(format!("{setting}: {message}")))
        };
        if self.read_concurrency == 0 {
            return invalid("restorer.read_concurrency", "must be positive");
        }
        if self.max_concurrent_requests == 0 {
            return invalid("restorer.max_concurrent_requests", "must be positive");
        }
        if self.max_buffered_events == 0 {
            return invalid("restorer.max_buffered_events", "must be positive");
        }
        if self.max_buffered_bytes < 64 * 1024 {
            return invalid("restorer.max_buffered_bytes", "must be at least 64 KiB");
        }
        Ok(())
    }
}
