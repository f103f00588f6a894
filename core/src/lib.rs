//! The shared core of chatvault. It links neither librdkafka nor Parquet: the archive format and the keys are
//! `chatvault-archive`, the Kafka client settings `chatvault-kafka`, so each service links only what it uses.
//!
//! Layering rule (see `docs/ARCHITECTURE.md`): this crate depends on no service crate. The services
//! (`chatvault-ingest-gateway`, `chatvault-archiver`, `chatvault-restorer`) depend on it and never on each other;
//! only the `chatvault` CLI crate wires them together.
//!
//! - [`event`]: validation, stable event ids and Kafka keys of the canonical `ChatEvent`.
//! - [`auth`]: per-tenant bearer tokens and roles.
//! - [`config`]: the configuration file, environment overrides and validation; [`duration`]: durations with
//!   units in it (`"10s"`).
//! - [`grpc`]: health and reflection, served by every gRPC role.
//! - [`shutdown`]: the shutdown signal and [`shutdown::drain`], the one way a role bounds its shutdown.
//! - [`storage`]: object stores from URLs (`file://`, `s3://`, `memory://`).
//! - [`telemetry`], [`metrics`]: logs, OpenTelemetry traces, and the fixed metric names (OTLP and Prometheus).

pub mod audit;
pub mod auth;
pub mod config;
pub mod duration;
pub mod error;
pub mod event;
pub mod grpc;
pub mod metrics;
pub mod object_lock;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
pub mod time;

pub use error::{Error, ErrorCode, Result};

/// `bytes` random bytes from the system's secure generator, in lower-case hex: the ids of batches, audit
/// records and log entries.
pub fn random_hex(bytes: usize) -> error::Result<String> {
    use ring::rand::SecureRandom;
    let mut buffer = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| error::Error::internal("system random generator failed"))?;
    Ok(hex::encode(buffer))
}

/// Names this process in manifests and audit records: `<HOSTNAME>-<pid>` (the pod name on Kubernetes).
pub fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "chatvault".into());
    format!("{host}-{}", std::process::id())
}
