//! Bad input and unavailable Kafka at the gRPC gateway: every rejection has its code and a message naming the
//! problem, and nothing reaches Kafka for a rejected request.

use std::time::{Duration, Instant};

use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, IngestRequest, Sender};
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    ACME_INGEST_TOKEN, INGEST_TOKEN, TOPIC, authorized, ingest_client, start_gateway, test_config,
};
use chatvault_testkit::s3::S3Server;
use tonic::Code;

fn valid_event() -> ChatEvent {
    ChatEvent {
        tenant_id: "acme".into(),
        conversation_id: "C1".into(),
        message_id: "m1".into(),
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: "U1".into(),
            ..Default::default()
        }),
        occurred_at_micros: 1_764_000_000_000_000,
        text: "hello".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_with_the_field_named_and_nothing_is_produced()
-> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    let mut client = ingest_client(&gateway.endpoint()).await?;

    type Mutation = Box<dyn Fn(&mut ChatEvent)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("tenant_id is required", Box::new(|e| e.tenant_id.clear())),
        (
            "conversation_id is required",
            Box::new(|e| e.conversation_id.clear()),
        ),
        ("message_id is required", Box::new(|e| e.message_id.clear())),
        ("sender.id is required", Box::new(|e| e.sender = None)),
        ("kind 0 is not a known event kind", Box::new(|e| e.kind = 0)),
        (
            "kind 77 is not a known event kind",
            Box::new(|e| e.kind = 77),
        ),
        (
            "text is 70000 bytes, over the limit",
            Box::new(|e| e.text = "x".repeat(70_000)),
        ),
        (
            "raw_payload is 300000 bytes, over the limit",
            Box::new(|e| e.raw_payload = vec![b'x'; 300_000]),
        ),
        (
            "occurred_at_micros is required",
            Box::new(|e| e.occurred_at_micros = 0),
        ),
        (
            "reaction is required",
            Box::new(|e| e.kind = EventKind::ReactionAdded as i32),
        ),
    ];
    for (expected, mutate) in &cases {
        let mut event = valid_event();
        mutate(&mut event);
        let status = client
            .ingest(authorized(
                IngestRequest { event: Some(event) },
                INGEST_TOKEN,
            ))
            .await
            .expect_err(expected);
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}");
        assert!(
            status.message().contains(expected),
            "{expected}: got {:?}",
            status.message()
        );
    }
    let status = client
        .ingest(authorized(IngestRequest { event: None }, INGEST_TOKEN))
        .await
        .expect_err("missing event");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "event is required")
    );

    // A batch is validated as a whole: one bad event rejects it and names its index.
    let mut events = vec![valid_event(); 5];
    events[3].conversation_id.clear();
    let status = client
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await
        .expect_err("bad batch");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "events[3].conversation_id is required");

    // Authentication and authorization.
    let status = client
        .ingest(tonic::Request::new(IngestRequest {
            event: Some(valid_event()),
        }))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .ingest(authorized(
            IngestRequest {
                event: Some(valid_event()),
            },
            "not-a-token",
        ))
        .await
        .expect_err("unknown token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let other_tenant = ChatEvent {
        tenant_id: "globex".into(),
        ..valid_event()
    };
    let status = client
        .ingest(authorized(
            IngestRequest {
                event: Some(other_tenant),
            },
            ACME_INGEST_TOKEN,
        ))
        .await
        .expect_err("wrong tenant");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("ingest role for tenant globex"),
        "{}",
        status.message()
    );

    assert_eq!(
        record_count(&kafka.brokers, TOPIC)?,
        0,
        "a rejected request produced a record"
    );

    // The valid event goes through and is the only record.
    let response = client
        .ingest(authorized(
            IngestRequest {
                event: Some(valid_event()),
            },
            INGEST_TOKEN,
        ))
        .await?
        .into_inner();
    assert!(response.event_id.starts_with("cv1-"));
    assert_eq!(record_count(&kafka.brokers, TOPIC)?, 1);
    gateway.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_is_unavailable_and_a_full_queue_is_resource_exhausted()
-> anyhow::Result<()> {
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    // Nothing listens on the discard port: every produce waits out the delivery timeout.
    let mut config = test_config(
        "127.0.0.1:9",
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.gateway.delivery_timeout_ms = 1_500;
    config.gateway.max_queued_events = 3;
    config.gateway.drain_timeout_ms = 1_000;
    let gateway = start_gateway(&config).await?;
    let mut client = ingest_client(&gateway.endpoint()).await?;

    let started = Instant::now();
    let status = client
        .ingest(authorized(
            IngestRequest {
                event: Some(valid_event()),
            },
            INGEST_TOKEN,
        ))
        .await
        .expect_err("no broker");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("delivery timeout"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the wait is bounded by the delivery timeout"
    );

    let events: Vec<ChatEvent> = (0..10)
        .map(|i| ChatEvent {
            message_id: format!("m{i}"),
            ..valid_event()
        })
        .collect();
    let status = client
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await
        .expect_err("queue full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("queue is full"),
        "{}",
        status.message()
    );
    gateway.stop().await?;
    Ok(())
}
