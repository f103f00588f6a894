//! Signed Slack webhooks per second through the gateway's HTTP endpoint into Kafka (librdkafka's mock cluster),
//! over keep-alive connections. Each request is verified (HMAC-SHA256, replay window), normalized, produced and
//! answered 200 only after Kafka acknowledged it. Requests are signed before the clock starts.
//!
//! `cargo bench -p chatvault-benches --bench webhook_throughput`. Median of 3 runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatvault_benches::{machine, median, mock_cluster_config};
use chatvault_core::shutdown;
use chatvault_core::time::now_micros;
use chatvault_ingest_gateway::EventProducer;
use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_ingest_gateway::webhooks::Integration;
use chatvault_ingest_gateway::webhooks::server::{WebhookService, serve_http};
use rdkafka::mocking::MockCluster;
use ring::hmac;
use tokio::net::TcpListener;

const SECRET: &str = "bench-signing-secret";
const REQUESTS: usize = 30_000;
/// Concurrent keep-alive connections: each request waits for its own Kafka acknowledgement (linger.ms=5 plus
/// the broker round trip), so throughput is latency × concurrency bound; both levels are reported.
const CONNECTION_LEVELS: [usize; 2] = [64, 256];
const RUNS: usize = 3;

fn signed_requests(run: usize, now_secs: i64) -> Vec<(String, String, String)> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    (0..REQUESTS)
        .map(|index| {
            let body = serde_json::json!({
                "token": "x", "team_id": "T061EG9R6", "api_app_id": "A0PNCHHK2", "type": "event_callback",
                "event_id": format!("Ev{run}-{index}"), "event_time": now_secs,
                "event": {"type": "message", "channel": format!("C{}", index % 200), "user": format!("U{}", index % 50),
                          "text": "The quarterly numbers look fine but the forecast needs another pass before Friday, see <@U0001>.",
                          "ts": format!("{}.{:06}", now_secs - 60, run * REQUESTS + index), "channel_type": "channel"}
            })
            .to_string();
            let signature = hmac::sign(&key, format!("v0:{now_secs}:{body}").as_bytes());
            (body, now_secs.to_string(), format!("v0={}", hex::encode(signature.as_ref())))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let config = mock_cluster_config(&cluster, "bench-webhooks")?;
    let webhook = WebhookConfig {
        name: "slack".into(),
        platform: Some(WebhookPlatform::Slack),
        tenant: "acme".into(),
        secrets: vec![SECRET.into()],
        ..Default::default()
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let producer = EventProducer::new(&config.shared.kafka, &config.gateway)?;
        let service = Arc::new(WebhookService::new(
            vec![Integration::from_config(&webhook)?],
            producer,
            config.gateway.limits.clone(),
            config.gateway.max_webhook_body_bytes,
            config.gateway.webhook_replay_window_secs,
            // Deliveries are audited as in production: one record per request on the Kafka audit topic.
            chatvault_core::audit::Auditor::new(
                "gateway",
                Arc::new(chatvault_kafka::audit::KafkaAuditSink::connect(&config.shared.kafka)?),
            ),
        ));
        let (trigger, shutdown_signal) = shutdown::channel();
        let server = tokio::spawn(serve_http(listener, service, shutdown_signal, Duration::from_secs(5)));
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
        let url = format!("http://{address}/webhooks/slack");
        let mut run = 0;
        for connections in CONNECTION_LEVELS {
        let mut rates = Vec::new();
        for _ in 0..RUNS {
            run += 1;
            let requests = Arc::new(signed_requests(run, now_micros() / 1_000_000));
            let started = Instant::now();
            let mut workers = Vec::new();
            for worker in 0..connections {
                let client = client.clone();
                let url = url.clone();
                let requests = requests.clone();
                workers.push(tokio::spawn(async move {
                    for index in (worker..REQUESTS).step_by(connections) {
                        let (body, timestamp, signature) = &requests[index];
                        let response = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .header("x-slack-request-timestamp", timestamp)
                            .header("x-slack-signature", signature)
                            .body(body.clone())
                            .send()
                            .await?;
                        anyhow::ensure!(response.status().as_u16() == 200, "status {}", response.status());
                    }
                    Ok::<(), anyhow::Error>(())
                }));
            }
            for worker in workers {
                worker.await??;
            }
            let rate = REQUESTS as f64 / started.elapsed().as_secs_f64();
            println!("run {run} ({connections} connections): {REQUESTS} signed Slack webhooks acknowledged in {:.2} s: {rate:.0} requests/s", started.elapsed().as_secs_f64());
            rates.push(rate);
        }
        println!(
            "webhooks: median {:.0} signed Slack requests/s with {connections} keep-alive connections",
            median(&mut rates)
        );
        }
        println!("machine: {} (client, gateway and mock broker share it)", machine());
        trigger.trigger();
        server.await??;
        Ok::<(), anyhow::Error>(())
    })
}
