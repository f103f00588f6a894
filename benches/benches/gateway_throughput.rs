//! Gateway throughput: gRPC clients → ingest gateway → idempotent producer → librdkafka's mock cluster, all
//! in this process on loopback. Every event is counted only once Kafka acknowledged it (the call returned OK).
//!
//! `cargo bench -p chatvault-benches --bench gateway_throughput` prints events/s for IngestBatch (1000 events
//! per call), IngestStream and unary Ingest. Median of 3 runs each.

use std::time::Instant;

use chatvault_benches::{
    BenchGateway, authorized, batch_run, chat_message, machine, median, mock_cluster_config,
    unary_run,
};
use chatvault_core::time::now_micros;
use chatvault_proto::v1::IngestRequest;
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use rdkafka::mocking::MockCluster;
use tonic::transport::Channel;

const RUNS: usize = 3;

async fn stream_run(
    client: &IngestServiceClient<Channel>,
    events: u64,
    streams: u64,
) -> anyhow::Result<f64> {
    let now = now_micros();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for stream in 0..streams {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let per_stream = events / streams;
            let requests = (0..per_stream).map(move |i| IngestRequest {
                event: Some(chat_message("acme", stream * per_stream + i, now)),
            });
            client
                .ingest_stream(authorized(tokio_stream::iter(requests)))
                .await?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let config = mock_cluster_config(&cluster, "bench-gateway")?;
    runtime.block_on(async move {
        let gateway = BenchGateway::start(&config).await?;
        let client = gateway.client.clone();
        // Warm-up.
        batch_run(&client, 20, 1_000, 4).await?;
        let mut batch = Vec::new();
        let mut stream = Vec::new();
        let mut unary = Vec::new();
        for run in 0..RUNS {
            let b = batch_run(&client, 200, 1_000, 4).await?;
            let s = stream_run(&client, 200_000, 4).await?;
            let u = unary_run(&client, 20_000, 64).await?;
            println!("run {run}: IngestBatch {b:.0} events/s, IngestStream {s:.0} events/s, unary Ingest {u:.0} events/s");
            batch.push(b);
            stream.push(s);
            unary.push(u);
        }
        println!("machine: {}", machine());
        println!("gateway IngestBatch (1000 events/call, 4 concurrent calls): median {:.0} events/s", median(&mut batch));
        println!("gateway IngestStream (4 streams): median {:.0} events/s", median(&mut stream));
        println!("gateway unary Ingest (64 concurrent calls): median {:.0} events/s", median(&mut unary));
        println!("(~500-byte events; each counted after Kafka acks=all; client, gateway and mock broker share the machine)");
        gateway.stop().await?;
        Ok::<(), anyhow::Error>(())
    })
}
