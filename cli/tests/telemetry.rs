//! Telemetry of a real `chatvault standalone` process: traces exported over OTLP/gRPC to a collector the test
//! starts, following one event from the gRPC call through the Kafka produce to archiving and upload; the
//! documented metric names on `/metrics` and over OTLP; health endpoints; the standard `OTEL_*` switches; and
//! an unreachable collector that changes nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chatvault_proto::v1::{
    ChatEvent, EventKind, GetConversationRequest, IngestBatchRequest, Sender,
};
use chatvault_testkit::otlp::{OtlpCollector, ReceivedSpan};
use chatvault_testkit::pipeline::{authorized, ingest_client, restore_client};
use chatvault_testkit::process::free_port;

/// The trace the test's "caller" starts; the gateway must continue it.
const CALLER_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The Prometheus names `docs/OPERATIONS.md` documents, each expected once the pipeline has done a round trip.
const PROMETHEUS_NAMES: [&str; 13] = [
    "chatvault_ingest_events_accepted_total",
    "chatvault_ingest_requests_rejected_total",
    "chatvault_gateway_produce_duration_seconds_bucket",
    "chatvault_archiver_events_archived_total",
    "chatvault_archiver_batch_events_bucket",
    "chatvault_archiver_file_size_bytes_bucket",
    "chatvault_archiver_upload_duration_seconds_bucket",
    "chatvault_archiver_commit_duration_seconds_bucket",
    "chatvault_archiver_consumer_lag",
    "chatvault_archiver_partitions_halted",
    "chatvault_keys_provider_duration_seconds_bucket",
    "chatvault_restorer_request_duration_seconds_bucket",
    "target_info",
];

struct Standalone {
    child: Child,
    gateway: String,
    restorer: String,
    metrics: String,
    token: String,
}

impl Standalone {
    async fn start(data_dir: &Path, otel_env: &[(&str, &str)]) -> anyhow::Result<Standalone> {
        chatvault_core::storage::install_crypto_provider();
        let [gateway, restorer, http, metrics] =
            [free_port()?, free_port()?, free_port()?, free_port()?];
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
        command
            .arg("standalone")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--gateway-listen", &format!("127.0.0.1:{gateway}")])
            .args(["--restorer-listen", &format!("127.0.0.1:{restorer}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for variable in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_METRICS_EXPORTER",
            "OTEL_SERVICE_NAME",
            "CHATVAULT_CONFIG",
        ] {
            command.env_remove(variable);
        }
        for (key, value) in otel_env {
            command.env(key, value);
        }
        let mut standalone = Standalone {
            child: command.spawn()?,
            gateway: format!("http://127.0.0.1:{gateway}"),
            restorer: format!("http://127.0.0.1:{restorer}"),
            metrics: format!("http://127.0.0.1:{metrics}"),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/readyz", standalone.metrics))
                .await
                .is_ok_and(|response| response.status() == 200);
            if ready && ingest_client(&standalone.gateway).await.is_ok() {
                break;
            }
            if let Some(status) = standalone.child.try_wait()? {
                anyhow::bail!("standalone exited during start-up: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "standalone did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        standalone.token = std::fs::read_to_string(data_dir.join("standalone-token"))?
            .trim()
            .to_string();
        Ok(standalone)
    }

    /// Sends three messages of `conversation` in one IngestBatch call carrying `traceparent` (if any), and
    /// waits until the restorer returns all three.
    async fn round_trip(
        &self,
        conversation: &str,
        traceparent: Option<&str>,
    ) -> anyhow::Result<()> {
        let events: Vec<ChatEvent> = (0..3)
            .map(|index| ChatEvent {
                tenant_id: "demo".into(),
                conversation_id: conversation.into(),
                message_id: format!("{conversation}-m{index}"),
                kind: EventKind::MessageCreated as i32,
                sender: Some(Sender {
                    id: "U1".into(),
                    ..Default::default()
                }),
                occurred_at_micros: 1_764_000_000_000_000 + index,
                text: format!("message {index}"),
                ..Default::default()
            })
            .collect();
        let mut request = authorized(IngestBatchRequest { events }, &self.token);
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse()?);
        }
        ingest_client(&self.gateway)
            .await?
            .ingest_batch(request)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut restore = restore_client(&self.restorer).await?;
            let request = authorized(
                GetConversationRequest {
                    tenant_id: "demo".into(),
                    conversation_id: conversation.into(),
                    ..Default::default()
                },
                &self.token,
            );
            if let Ok(response) = restore.get_conversation(request).await {
                let mut stream = response.into_inner();
                // The messages (standalone's restores also start with an `integrity` item).
                let mut messages = 0;
                while let Some(item) = stream.message().await? {
                    if matches!(
                        item.item,
                        Some(chatvault_proto::v1::restore_item::Item::Message(_))
                    ) {
                        messages += 1;
                    }
                }
                if messages == 3 {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{conversation} was not archived within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = reqwest::get(format!("{}{path}", self.metrics)).await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// SIGTERM, then the exit status (bounded wait).
    fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                anyhow::bail!("standalone did not exit within 40 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.span.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_event_from_grpc_to_upload_and_metrics_are_served()
-> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let data_dir = tempfile::tempdir()?;
    let standalone = Standalone::start(
        data_dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ],
    )
    .await?;

    // Health endpoints.
    assert_eq!(standalone.get("/healthz").await?.0, 200);
    assert_eq!(standalone.get("/readyz").await?.0, 200);
    assert_eq!(standalone.get("/nope").await?.0, 404);

    standalone
        .round_trip("traced", Some(CALLER_TRACEPARENT))
        .await?;
    // One rejected request, for the rejection counter.
    let invalid = ChatEvent {
        tenant_id: "demo".into(),
        ..Default::default()
    };
    let rejected = ingest_client(&standalone.gateway)
        .await?
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: vec![invalid],
            },
            &standalone.token,
        ))
        .await;
    assert_eq!(rejected.unwrap_err().code(), tonic::Code::InvalidArgument);

    // The trace: the caller's trace id on every span, each stage the child of the one before.
    let wanted = [
        "chatvault.v1.IngestService/IngestBatch",
        "chatvault.events publish",
        "archive.batch",
        "archive.upload",
        "archive.commit",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let trace: Vec<ReceivedSpan> = collector
            .spans()
            .into_iter()
            .filter(|span| span.trace_id() == CALLER_TRACE_ID)
            .collect();
        // Restorer calls have spans of their own, in their own trace; the exporter sends them in
        // batches, so they are waited for like the rest.
        let restorer_span = collector
            .spans()
            .iter()
            .any(|span| span.span.name == "chatvault.v1.RestoreService/GetConversation");
        if restorer_span && wanted.iter().all(|name| find(&trace, name).is_some()) {
            break trace;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "trace incomplete (restorer span seen: {restorer_span}); spans of the caller's trace: {:?}",
            trace.iter().map(|span| &span.span.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ingest = find(&trace, wanted[0]).expect("ingest span");
    let produce = find(&trace, wanted[1]).expect("produce span");
    let batch = find(&trace, wanted[2]).expect("archive span");
    let upload = find(&trace, wanted[3]).expect("upload span");
    let commit = find(&trace, wanted[4]).expect("commit span");
    assert_eq!(
        ingest.parent_span_id(),
        "00f067aa0ba902b7",
        "continues the caller"
    );
    assert_eq!(produce.parent_span_id(), ingest.span_id());
    assert_eq!(
        batch.parent_span_id(),
        produce.span_id(),
        "the archive batch continues the trace carried in the Kafka record's headers"
    );
    assert_eq!(upload.parent_span_id(), batch.span_id());
    assert_eq!(commit.parent_span_id(), batch.span_id());
    assert_eq!(
        ingest.attribute("rpc.method").as_deref(),
        Some("IngestBatch")
    );
    assert_eq!(ingest.attribute("events").as_deref(), Some("3"));
    assert_eq!(
        produce.attribute("messaging.system").as_deref(),
        Some("kafka")
    );
    for span in [ingest, produce, batch, upload, commit] {
        assert_eq!(span.service, "chatvault-standalone");
    }

    // /metrics: every documented name, with the counts this test caused. The consumer lag comes from
    // librdkafka's statistics every 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (status, metrics) = standalone.get("/metrics").await?;
        assert_eq!(status, 200);
        if PROMETHEUS_NAMES.iter().all(|name| metrics.contains(name)) {
            break metrics;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "missing metrics: {:?}\n{metrics}",
            PROMETHEUS_NAMES
                .iter()
                .filter(|name| !metrics.contains(*name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        metrics.lines().any(
            |line| line.starts_with("chatvault_ingest_events_accepted_total")
                && line.contains("source=\"grpc\"")
                && line.ends_with(" 3")
        ),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |line| line.starts_with("chatvault_ingest_requests_rejected_total")
                // The reason is the gateway's IngestError::reason, the same set for gRPC and webhooks.
                && line.contains("reason=\"invalid_event\"")
                && line.ends_with(" 1")
        ),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |line| line.starts_with("chatvault_archiver_events_archived_total")
                && line.ends_with(" 3")
        ),
        "{metrics}"
    );

    // The same instruments over OTLP.
    let otlp_names = [
        "chatvault.ingest.events.accepted",
        "chatvault.gateway.produce.duration",
        "chatvault.archiver.upload.duration",
        "chatvault.archiver.commit.duration",
        "chatvault.restorer.request.duration",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received: BTreeSet<String> = collector.metric_names();
        if otlp_names.iter().all(|name| received.contains(*name)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "OTLP metrics missing; received {received:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let status = standalone.terminate()?;
    assert!(status.success(), "standalone exit status {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_and_a_disabled_sdk_change_nothing() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    // OTEL_SDK_DISABLED wins over a configured endpoint: nothing is exported, and /metrics still works.
    let data_dir = tempfile::tempdir()?;
    let disabled = Standalone::start(
        data_dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ],
    )
    .await?;
    disabled
        .round_trip("untraced", Some(CALLER_TRACEPARENT))
        .await?;
    let (_, metrics) = disabled.get("/metrics").await?;
    assert!(metrics.contains("chatvault_ingest_events_accepted_total"));
    assert!(disabled.terminate()?.success());
    assert!(
        collector.spans().is_empty(),
        "spans exported while disabled"
    );
    assert!(
        collector.metric_names().is_empty(),
        "metrics exported while disabled"
    );

    // A collector that is not there: ingest, archive and restore work, and the process exits 0.
    let closed_port = free_port()?;
    let data_dir = tempfile::tempdir()?;
    let unreachable = Standalone::start(
        data_dir.path(),
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://127.0.0.1:{closed_port}"),
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ],
    )
    .await?;
    unreachable.round_trip("lost-traces", None).await?;
    assert!(unreachable.terminate()?.success());
    Ok(())
}
