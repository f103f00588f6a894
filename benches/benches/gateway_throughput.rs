//! Gateway throughput: gRPC clients → ingest gateway → idempotent producer → librdkafka's mock cluster, all
//! in this process on loopback. Every event is counted only once Kafka acknowledged it (the call returned OK).
//!
//! `cargo bench -p chatvault-benches --bench gateway_throughput` prints events/s for IngestBatch (1000 events
//! per call), IngestStream and unary Ingest. Median of 3 runs each.

use std::time::{Duration, Instant};

use chatvault_benches::{chat_message, machine, median};
use chatvault_core::auth::Role;
use chatvault_core::config::{Config, TenantConfig, TokenConfig};
use chatvault_core::shutdown;
use chatvault_core::time::now_micros;
use chatvault_ingest_gateway::{EventProducer, IngestGrpc};
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::{IngestBatchRequest, IngestRequest};
use rdkafka::mocking::MockCluster;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::transport::Channel;

const TOKEN: &str = "bench-token";
const RUNS: usize = 3;

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

async fn batch_run(
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

async fn unary_run(
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

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let mut config = Config::default();
    config.kafka.brokers = cluster.bootstrap_servers();
    config.kafka.topic = "bench-gateway".into();
    config.gateway.max_queued_events = 1_000_000;
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let producer = EventProducer::new(&config.kafka, &config.gateway)?;
        let service = IngestGrpc::new(producer.clone(), config.authenticator()?, config.gateway.clone());
        let (trigger, shutdown_signal) = shutdown::channel();
        let server = tokio::spawn(chatvault_ingest_gateway::serve(listener, service, producer, shutdown_signal, Duration::from_secs(5)));
        let channel = Channel::from_shared(format!("http://{address}"))?.connect().await?;
        let client = IngestServiceClient::new(channel).max_encoding_message_size(64 << 20);
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
        trigger.trigger();
        server.await??;
        Ok::<(), anyhow::Error>(())
    })
}
