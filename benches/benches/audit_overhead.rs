//! The cost of the audit trail on a restore: the same restores (GetConversation of a 200-event conversation,
//! streamed to the end, and ListConversations) with their records kept in memory (no durability: the
//! baseline) and with each record produced to the Kafka audit topic and acknowledged before the call is
//! answered (production). Kafka is librdkafka's mock cluster over loopback TCP, so the figure is the
//! producer's round trip, not a replicated cluster's. The modes alternate, 5 rounds each; medians of the
//! per-call latencies and the ratio against the baseline are printed.
//! `cargo bench -p chatvault-benches --bench audit_overhead`.

use std::sync::Arc;
use std::time::Instant;

use chatvault_benches::{machine, median};
use chatvault_core::audit::{AuditSink, Auditor, MemorySink};
use chatvault_core::auth::{Authenticator, Role, token_digest};
use chatvault_kafka::audit::KafkaAuditSink;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use chatvault_proto::v1::{GetConversationRequest, ListConversationsRequest};
use chatvault_restorer::testing::{Fixture, event};
use chatvault_restorer::{RestoreApi, Restorer, serve_api};
use rdkafka::mocking::MockCluster;
use tonic::transport::Channel;

const ROUNDS: usize = 5;
const CALLS_PER_ROUND: usize = 200;
const TOKEN: &str = "bench-restore";

fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// A restorer over `fixture` recording into `sink`, and a client of it.
async fn serve(
    fixture: &Fixture,
    sink: Arc<dyn AuditSink>,
) -> anyhow::Result<RestoreServiceClient<Channel>> {
    let restorer = Arc::new(Restorer::new(
        fixture.store.clone(),
        fixture.data_keys.clone(),
        &fixture.topic,
        2,
    ));
    let mut authenticator = Authenticator::default();
    authenticator.add_token_digest(token_digest(TOKEN), "bench", "acme", &[Role::Restore]);
    let api = RestoreApi::new(restorer, authenticator, Auditor::new("restorer", sink));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (trigger, shutdown) = chatvault_core::shutdown::channel();
    tokio::spawn(serve_api(
        listener,
        api,
        chatvault_restorer::MoreApis::default(),
        shutdown,
    ));
    // The server lives as long as the benchmark.
    std::mem::forget(trigger);
    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    Ok(RestoreServiceClient::new(channel))
}

/// Per-call latencies (ms) of `CALLS_PER_ROUND` restores, alternating the two calls.
async fn round(client: &mut RestoreServiceClient<Channel>) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(CALLS_PER_ROUND);
    for call in 0..CALLS_PER_ROUND {
        let started = Instant::now();
        if call % 2 == 0 {
            let mut stream = client
                .get_conversation(with_token(GetConversationRequest {
                    tenant_id: "acme".into(),
                    conversation_id: "C1".into(),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            let mut items = 0;
            while stream.message().await?.is_some() {
                items += 1;
            }
            anyhow::ensure!(items == 200, "restored {items} items");
        } else {
            client
                .list_conversations(with_token(ListConversationsRequest {
                    tenant_id: "acme".into(),
                }))
                .await?;
        }
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(latencies)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let fixture = Fixture::new().await;
        for batch in 0..4 {
            let events: Vec<_> = (0..50)
                .map(|i| {
                    let n = batch * 50 + i;
                    event("acme", "C1", &format!("m{n:03}"), 1_000 + n * 10)
                })
                .collect();
            fixture.commit_batch(batch as i32, &events).await;
        }
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("bench.audit", 1, 1)?;
        let mut kafka = chatvault_core::config::KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic: "bench".into(),
            ..Default::default()
        };
        kafka.audit_topic = "bench.audit".into();
        let memory = Arc::new(MemorySink::default());
        let mut in_memory = serve(&fixture, memory.clone()).await?;
        let mut on_kafka = serve(&fixture, Arc::new(KafkaAuditSink::connect(&kafka)?)).await?;
        // Warm-up: connections, the restorer's index, the producer's connection.
        round(&mut in_memory).await?;
        round(&mut on_kafka).await?;
        let (mut baseline, mut audited) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            baseline.extend(round(&mut in_memory).await?);
            audited.extend(round(&mut on_kafka).await?);
        }
        let recorded = memory.take().len();
        let (base, kafka_p50) = (median(&mut baseline), median(&mut audited));
        println!(
            "audit overhead on a restore ({}), {} calls per mode, GetConversation (200 items) and ListConversations alternating:",
            machine(),
            ROUNDS * CALLS_PER_ROUND
        );
        println!("  records in memory (baseline)        p50 {base:>7.3} ms");
        println!(
            "  records on the Kafka audit topic    p50 {kafka_p50:>7.3} ms   ({:.2}x, +{:.3} ms)",
            kafka_p50 / base,
            kafka_p50 - base
        );
        anyhow::ensure!(recorded >= ROUNDS * CALLS_PER_ROUND, "every call recorded");
        Ok(())
    })
}
