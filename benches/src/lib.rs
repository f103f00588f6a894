//! Shared pieces of the benchmarks: chat events of realistic size, process CPU time, and a gRPC gateway on
//! librdkafka's mock cluster with the load generators that drive it.

use std::time::{Duration, Instant};

use chatvault_core::time::now_micros;
use chatvault_ingest_gateway::{EventProducer, IngestGrpc};
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, IngestRequest, Sender};
use tonic::transport::Channel;

/// A ~500-byte chat message (encoded), as the performance anchors assume.
pub fn chat_message(tenant: &str, index: u64, now_micros: i64) -> ChatEvent {
    let filler =
        "The quarterly numbers look fine but the forecast needs another pass before Friday. ";
    ChatEvent {
        tenant_id: tenant.to_string(),
        workspace_id: "W-bench".into(),
        conversation_id: format!("C{:04}", index % 2000),
        message_id: format!("m{index}"),
        thread_id: if index.is_multiple_of(7) {
            format!("m{}", index.saturating_sub(3))
        } else {
            String::new()
        },
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: format!("U{:03}", index % 97),
            display_name: format!("user {}", index % 97),
            is_bot: false,
        }),
        occurred_at_micros: now_micros - 3_600_000_000 + (index as i64 % 3_600_000) * 1_000,
        text: format!("{index}: {}", &filler.repeat(5)[..380]),
        mentions: if index.is_multiple_of(5) {
            vec!["U001".into()]
        } else {
            vec![]
        },
        ..Default::default()
    }
}

/// CPU time (user + system) this process has used, in seconds, from /proc (Linux); `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user_ticks: f64 = fields.get(11)?.parse().ok()?;
    let system_ticks: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((user_ticks + system_ticks) / 100.0)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

/// The bearer token of the benchmarks' ingest tenant `acme`.
pub const INGEST_TOKEN: &str = "bench-token";

/// Settings for a gateway on librdkafka's mock cluster: the topic (created with 4 partitions), a producer
/// queue deep enough for the load, and tenant `acme` with [`INGEST_TOKEN`].
pub fn mock_cluster_config(
    cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
) -> anyhow::Result<chatvault_config::Config> {
    use chatvault_config::Config;
    use chatvault_core::auth::Role;
    use chatvault_core::config::{TenantConfig, TokenConfig};
    cluster.create_topic(topic, 4, 1)?;
    cluster.create_topic(&format!("{topic}.audit"), 1, 1)?;
    let mut config = Config::default();
    config.shared.kafka.brokers = cluster.bootstrap_servers();
    config.shared.kafka.topic = topic.into();
    config.gateway.max_queued_events = 1_000_000;
    config.shared.tenants = vec![TenantConfig {
        id: "acme".into(),
        tokens: vec![TokenConfig {
            name: "bench".into(),
            token: Some(INGEST_TOKEN.into()),
            roles: vec![Role::Ingest],
            ..Default::default()
        }],
    }];
    Ok(config)
}

/// `message` with the ingest tenant's bearer token.
pub fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {INGEST_TOKEN}").parse().expect("ascii"),
    );
    request
}

/// The gRPC gateway (IngestService on an ephemeral loopback port) and a client of it.
pub struct BenchGateway {
    pub client: IngestServiceClient<Channel>,
    trigger: chatvault_core::shutdown::ShutdownTrigger,
    server: tokio::task::JoinHandle<chatvault_core::Result<()>>,
}

impl BenchGateway {
    pub async fn start(config: &chatvault_config::Config) -> anyhow::Result<BenchGateway> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let producer = EventProducer::new(&config.shared.kafka, &config.gateway)?;
        // Calls are audited as in production: one record per call on the Kafka audit topic.
        let audit = std::sync::Arc::new(chatvault_kafka::audit::KafkaAuditSink::connect(
            &config.shared.kafka,
        )?);
        let service = IngestGrpc::new(
            producer.clone(),
            config.shared.authenticator()?,
            config.gateway.clone(),
            chatvault_core::audit::Auditor::new("gateway", audit),
        );
        let (trigger, shutdown) = chatvault_core::shutdown::channel();
        let server = tokio::spawn(chatvault_ingest_gateway::serve(
            listener,
            service,
            producer,
            shutdown,
            Duration::from_secs(5),
        ));
        let channel = Channel::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        Ok(BenchGateway {
            client: IngestServiceClient::new(channel).max_encoding_message_size(64 << 20),
            trigger,
            server,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        self.server.await??;
        Ok(())
    }
}

/// `calls` IngestBatch calls of `batch` events from `concurrency` callers; events/s.
pub async fn batch_run(
    client: &IngestServiceClient<Channel>,
    calls: u64,
    batch: u64,
    concurrency: u64,
) -> anyhow::Result<f64> {
    let now = now_micros();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for call in (worker..calls).step_by(concurrency as usize) {
                let events = (0..batch)
                    .map(|i| chat_message("acme", call * batch + i, now))
                    .collect();
                client
                    .ingest_batch(authorized(IngestBatchRequest { events }))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((calls * batch) as f64 / started.elapsed().as_secs_f64())
}

/// `events` unary Ingest calls from `concurrency` callers; events/s.
pub async fn unary_run(
    client: &IngestServiceClient<Channel>,
    events: u64,
    concurrency: u64,
) -> anyhow::Result<f64> {
    let now = now_micros();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for index in (worker..events).step_by(concurrency as usize) {
                client
                    .ingest(authorized(IngestRequest {
                        event: Some(chat_message("acme", index, now)),
                    }))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}
