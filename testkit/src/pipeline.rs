//! The pipeline roles in-process on ephemeral loopback ports, each with its own shutdown trigger, plus the
//! test configuration (tenants, tokens) and authorized gRPC clients.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chatvault_archive::keys::DataKeys;
use chatvault_archiver::OnShutdown;
use chatvault_archiver::RoleStats;
use chatvault_config::Config;
use chatvault_core::auth::Role;
use chatvault_core::config::{StorageConfig, TenantConfig, TokenConfig};
use chatvault_core::shutdown::{self, ShutdownTrigger};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::audit_service_client::AuditServiceClient;
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Request;
use tonic::transport::Channel;

pub const TOPIC: &str = "chatvault.events";
pub const TENANTS: &[&str] = &["acme", "globex", "initech"];
/// Holds `ingest` for every test tenant.
pub const INGEST_TOKEN: &str = "test-ingest-all";
/// Holds `restore` for every test tenant.
pub const RESTORE_TOKEN: &str = "test-restore-all";
/// Holds `ingest` for `acme` only.
pub const ACME_INGEST_TOKEN: &str = "test-ingest-acme";
/// Holds `audit` for `acme` only.
pub const ACME_AUDIT_TOKEN: &str = "test-audit-acme";
/// Holds `key_export` for `acme` only.
pub const ACME_KEY_EXPORT_TOKEN: &str = "test-key-export-acme";
/// Holds `policy` for `acme` only.
pub const ACME_POLICY_TOKEN: &str = "test-policy-acme";
/// Holds `hold` for `acme` only.
pub const ACME_HOLD_TOKEN: &str = "test-hold-acme";

/// A configuration for the test tenants, pointing at `brokers` and `storage`, with fast batching.
pub fn test_config(brokers: &str, storage: StorageConfig, keyring_path: &Path) -> Config {
    // Logs go to the test's captured output (shown on failure); RUST_LOG selects levels.
    chatvault_core::telemetry::init_logging();
    let mut config = Config::default();
    config.shared.kafka.brokers = brokers.to_string();
    config.shared.kafka.topic = TOPIC.to_string();
    config.shared.storage = storage;
    config.shared.keys.keyring_path = keyring_path.to_path_buf();
    config.archiver.max_batch_age = Duration::from_millis(500);
    config.archiver.max_batch_events = 2_000;
    config.archiver.session_timeout = Duration::from_millis(6_000);
    config.archiver.group_id = "chatvault-archiver-test".into();
    config.gateway.delivery_timeout = Duration::from_millis(10_000);
    // No load balancer to wait for: in-process gateways stop accepting as soon as they are stopped.
    config.gateway.shutdown_delay = Duration::from_millis(0);
    config.shared.tenants = TENANTS
        .iter()
        .map(|tenant| {
            let mut tokens = vec![
                TokenConfig {
                    name: "ingest-all".into(),
                    token: Some(INGEST_TOKEN.into()),
                    roles: vec![Role::Ingest],
                    ..Default::default()
                },
                TokenConfig {
                    name: "restore-all".into(),
                    token: Some(RESTORE_TOKEN.into()),
                    roles: vec![Role::Restore],
                    ..Default::default()
                },
            ];
            if *tenant == "acme" {
                tokens.push(TokenConfig {
                    name: "ingest-acme".into(),
                    token: Some(ACME_INGEST_TOKEN.into()),
                    roles: vec![Role::Ingest],
                    ..Default::default()
                });
                tokens.push(TokenConfig {
                    name: "key-export-acme".into(),
                    token: Some(ACME_KEY_EXPORT_TOKEN.into()),
                    roles: vec![Role::KeyExport],
                    ..Default::default()
                });
                tokens.push(TokenConfig {
                    name: "audit-acme".into(),
                    token: Some(ACME_AUDIT_TOKEN.into()),
                    roles: vec![Role::Audit],
                    ..Default::default()
                });
                tokens.push(TokenConfig {
                    name: "policy-acme".into(),
                    token: Some(ACME_POLICY_TOKEN.into()),
                    roles: vec![Role::Policy],
                    ..Default::default()
                });
                tokens.push(TokenConfig {
                    name: "hold-acme".into(),
                    token: Some(ACME_HOLD_TOKEN.into()),
                    roles: vec![Role::Hold],
                    ..Default::default()
                });
            }
            TenantConfig {
                id: tenant.to_string(),
                tokens,
            }
        })
        .collect();
    config
}

/// A running role: trigger its shutdown and await its task.
pub struct RunningRole {
    pub address: Option<SocketAddr>,
    /// The gateway's webhook HTTP address.
    pub http_address: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningRole {
    /// Graceful stop: triggers shutdown and waits for the role to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        self.task.await?
    }

    /// Abrupt stop, as close to a crash as in-process allows: the task is dropped where it is.
    pub fn abort(self) {
        self.task.abort();
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address.expect("role has an address"))
    }

    /// `http://<webhook address>` of a gateway.
    pub fn http_endpoint(&self) -> String {
        format!(
            "http://{}",
            self.http_address.expect("gateway has an HTTP address")
        )
    }
}

pub async fn start_gateway(config: &Config) -> anyhow::Result<RunningRole> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let http_listener = TcpListener::bind("127.0.0.1:0").await?;
    let http_address = http_listener.local_addr()?;
    let (trigger, shutdown) = shutdown::channel();
    let config = config.clone();
    let task = tokio::spawn(async move {
        chatvault_ingest_gateway::run(
            &config.shared,
            &config.gateway,
            listener,
            http_listener,
            None,
            shutdown,
        )
        .await?;
        Ok(())
    });
    Ok(RunningRole {
        address: Some(address),
        http_address: Some(http_address),
        trigger,
        task,
    })
}

pub async fn data_keys(config: &Config) -> anyhow::Result<DataKeys> {
    let store = object_store_from_config(&config.shared.storage)?;
    Ok(DataKeys::from_config(store, &config.shared.keys).await?)
}

/// The archiver role (the chat events' archiver and the audit trail's) on `config`.
pub async fn start_archiver(
    config: &Config,
    writer_id: &str,
) -> anyhow::Result<(RunningRole, RoleStats)> {
    let stats = RoleStats::default();
    let (trigger, shutdown) = shutdown::channel();
    let (config, writer_id, task_stats) = (config.clone(), writer_id.to_string(), stats.clone());
    let task = tokio::spawn(async move {
        chatvault_archiver::run(
            &config.shared,
            &config.archiver,
            &writer_id,
            OnShutdown::StopConsuming,
            task_stats,
            shutdown,
        )
        .await?;
        Ok(())
    });
    Ok((
        RunningRole {
            address: None,
            http_address: None,
            trigger,
            task,
        },
        stats,
    ))
}

pub async fn start_restorer(config: &Config) -> anyhow::Result<RunningRole> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (trigger, shutdown) = shutdown::channel();
    let config = config.clone();
    let task = tokio::spawn(async move {
        let audit = Arc::new(chatvault_kafka::audit::KafkaAuditSink::connect(
            &config.shared.kafka,
        )?);
        chatvault_restorer::run(&config.shared, &config.restorer, listener, audit, shutdown)
            .await?;
        Ok(())
    });
    Ok(RunningRole {
        address: Some(address),
        http_address: None,
        trigger,
        task,
    })
}

pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

pub async fn ingest_client(endpoint: &str) -> anyhow::Result<IngestServiceClient<Channel>> {
    Ok(IngestServiceClient::new(channel(endpoint).await?).max_encoding_message_size(64 << 20))
}

pub async fn audit_client(endpoint: &str) -> anyhow::Result<AuditServiceClient<Channel>> {
    Ok(AuditServiceClient::new(channel(endpoint).await?))
}

pub async fn restore_client(endpoint: &str) -> anyhow::Result<RestoreServiceClient<Channel>> {
    Ok(RestoreServiceClient::new(channel(endpoint).await?).max_decoding_message_size(64 << 20))
}

/// `message` with `authorization: Bearer <token>`.
pub fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    condition()
}
