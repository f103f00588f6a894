//! The cost of telemetry on the gateway's hot path: the same gRPC ingest load with no telemetry installed,
//! with the default role telemetry (logs + metrics, no OTLP export), and with every call traced (100% sampled,
//! exported over OTLP/gRPC to a collector in the same process, so the collector's CPU is part of the cost).
//!
//! Telemetry is process-global (one subscriber, one meter provider), so each mode runs in a child process of
//! this benchmark; the modes alternate, 3 runs each, and the medians and ratios against the baseline are
//! printed. `cargo bench -p chatvault-benches --bench telemetry_overhead`.

use std::process::Command;

use chatvault_benches::{BenchGateway, batch_run, machine, median, mock_cluster_config, unary_run};
use chatvault_core::telemetry::Telemetry;
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_testkit::otlp::OtlpCollector;
use rdkafka::mocking::MockCluster;
use tonic::transport::Channel;

const RUNS: usize = 3;
const MODE_VARIABLE: &str = "CHATVAULT_BENCH_TELEMETRY_MODE";
const COLLECTOR_VARIABLE: &str = "CHATVAULT_BENCH_COLLECTOR";
const MODES: [&str; 3] = ["none", "metrics", "traces"];

/// Unary calls from 64 concurrent callers (the path with the most spans per event), then 1000-event batches.
async fn load(client: &IngestServiceClient<Channel>) -> anyhow::Result<(f64, f64)> {
    let unary = unary_run(client, 20_000, 64).await?;
    let batched = batch_run(client, 200, 1_000, 4).await?;
    Ok((unary, batched))
}

/// One measurement in this (child) process: prints `RESULT <unary events/s> <batch events/s>`.
fn child(mode: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let mut config = mock_cluster_config(&cluster, "bench-telemetry")?;
    config.shared.telemetry.metrics_listen = String::new();
    runtime.block_on(async move {
        // The parent chose the collector's address and gave it to the exporter as OTEL_EXPORTER_OTLP_ENDPOINT.
        let collector = match std::env::var(COLLECTOR_VARIABLE) {
            Ok(address) => Some(OtlpCollector::start_at(&address).await?),
            Err(_) => None,
        };
        let telemetry = match mode {
            "none" => None,
            _ => Some(Telemetry::install(
                "chatvault-bench",
                &config.shared.telemetry,
            )?),
        };
        let gateway = BenchGateway::start(&config).await?;
        let client = gateway.client.clone();
        // Warm-up.
        load(&client).await?;
        let (unary, batched) = load(&client).await?;
        println!("RESULT {unary:.0} {batched:.0}");
        gateway.stop().await?;
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
