//! The cost of telemetry on the gateway's hot path: the same gRPC ingest load with no telemetry installed,
//! with the default role telemetry (logs + metrics, no OTLP export), and with every call traced (100% sampled,
//! exported over OTLP/gRPC to a collector in the same process, so the collector's CPU is part of the cost).
//!
//! Telemetry is process-global (one subscriber, one meter provider), so each mode runs in a child process of
//! this benchmark; the modes alternate, 3 runs each, and the medians and ratios against the baseline are
//! printed. `cargo bench -p chatvault-benches --bench telemetry_overhead`.

use std::process::Command;
use std::time::{Duration, Instant};

use chatvault_benches::{chat_message, machine, median};
use chatvault_core::auth::Role;
use chatvault_core::config::{Config, TenantConfig, TokenConfig};
use chatvault_core::shutdown;
use chatvault_core::telemetry::Telemetry;
use chatvault_core::time::now_micros;
use chatvault_ingest_gateway::{EventProducer, IngestGrpc};
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::{IngestBatchRequest, IngestRequest};
use chatvault_testkit::otlp::OtlpCollector;
use rdkafka::mocking::MockCluster;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::transport::Channel;

const TOKEN: &str = "bench-token";
const RUNS: usize = 3;
const MODE_VARIABLE: &str = "CHATVAULT_BENCH_TELEMETRY_MODE";
const COLLECTOR_VARIABLE: &str = "CHATVAULT_BENCH_COLLECTOR";
const MODES: [&str; 3] = ["none", "metrics", "traces"];

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// Unary calls from 64 concurrent callers (the path with the most spans per event), then 1000-event batches.
async fn load(client: &IngestServiceClient<Channel>) -> anyhow::Result<(f64, f64)> {
    let now = now_micros();
    let events = 20_000u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..64u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for index in (worker..events).step_by(64) {
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
    let unary = events as f64 / started.elapsed().as_secs_f64();

    let (calls, batch) = (200u64, 1_000u64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for call in (worker..calls).step_by(4) {
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
    let batched = (calls * batch) as f64 / started.elapsed().as_secs_f64();
    Ok((unary, batched))
}

/// One measurement in this (child) process: prints `RESULT <unary events/s> <batch events/s>`.
fn child(mode: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let mut config = Config::default();
    config.kafka.brokers = cluster.bootstrap_servers();
    config.kafka.topic = "bench-telemetry".into();
    config.gateway.max_queued_events = 1_000_000;
    config.telemetry.metrics_listen = String::new();
    cluster.create_topic(&config.kafka.topic, 4, 1)?;
    config.tenants = vec![TenantConfig {
        id: "acme".into(),
        tokens: vec![TokenConfig {
            name: "bench".into(),
            token: Some(TOKEN.into()),
            roles: vec![Role::Ingest],
            ..Default::default()
        }],
    }];
    runtime.block_on(async move {
        // The parent chose the collector's address and gave it to the exporter as OTEL_EXPORTER_OTLP_ENDPOINT.
        let collector = match std::env::var(COLLECTOR_VARIABLE) {
            Ok(address) => Some(OtlpCollector::start_at(&address).await?),
            Err(_) => None,
        };
        let telemetry = match mode {
            "none" => None,
            _ => Some(Telemetry::install("chatvault-bench", &config.telemetry)?),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let producer = EventProducer::new(&config.kafka, &config.gateway)?;
        let service = IngestGrpc::new(
            producer.clone(),
            config.authenticator()?,
            config.gateway.clone(),
        );
        let (trigger, shutdown_signal) = shutdown::channel();
        let server = tokio::spawn(chatvault_ingest_gateway::serve(
            listener,
            service,
            producer,
            shutdown_signal,
            Duration::from_secs(5),
        ));
        let channel = Channel::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        let client = IngestServiceClient::new(channel).max_encoding_message_size(64 << 20);
        // Warm-up.
        load(&client).await?;
        let (unary, batched) = load(&client).await?;
        println!("RESULT {unary:.0} {batched:.0}");
        trigger.trigger();
        server.await??;
        if let Some(telemetry) = telemetry {
            telemetry.shutdown();
        }
        if let Some(collector) = collector {
            eprintln!("collector received {} spans", collector.spans().len());
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn main() -> anyhow::Result<()> {
    if let Ok(mode) = std::env::var(MODE_VARIABLE) {
        return child(&mode);
    }
    let exe = std::env::current_exe()?;
    let mut unary: [Vec<f64>; 3] = Default::default();
    let mut batched: [Vec<f64>; 3] = Default::default();
    for run in 0..RUNS {
        for (index, mode) in MODES.iter().enumerate() {
            let mut command = Command::new(&exe);
            command
                .env(MODE_VARIABLE, mode)
                .env("RUST_LOG", "warn")
                .env_remove("OTEL_SDK_DISABLED")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
            if *mode == "traces" {
                let port = chatvault_testkit::process::free_port()?;
                let address = format!("127.0.0.1:{port}");
                command
                    .env(COLLECTOR_VARIABLE, &address)
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}"))
                    .env("OTEL_METRICS_EXPORTER", "none");
            }
            let output = command.output()?;
            anyhow::ensure!(
                output.status.success(),
                "{mode} run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let result = stdout
                .lines()
                .find_map(|line| line.strip_prefix("RESULT "))
                .ok_or_else(|| anyhow::anyhow!("{mode} run printed no result"))?;
            let numbers: Vec<f64> = result
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            println!(
                "run {run} {mode:>7}: unary Ingest {:.0} events/s, IngestBatch {:.0} events/s",
                numbers[0], numbers[1]
            );
            unary[index].push(numbers[0]);
            batched[index].push(numbers[1]);
        }
    }
    println!("machine: {}", machine());
    let base_unary = median(&mut unary[0].clone());
    let base_batch = median(&mut batched[0].clone());
    for (index, mode) in MODES.iter().enumerate() {
        let u = median(&mut unary[index]);
        let b = median(&mut batched[index]);
        println!(
            "telemetry {mode:>7}: unary Ingest median {u:.0} events/s ({:.2}x baseline), IngestBatch median {b:.0} events/s ({:.2}x baseline)",
            u / base_unary,
            b / base_batch
        );
    }
    println!(
        "(64 concurrent unary callers, then 4 concurrent 1000-event batches; traces: every call sampled and exported to an in-process OTLP collector)"
    );
    Ok(())
}
