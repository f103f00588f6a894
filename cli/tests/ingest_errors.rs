//! Bad input and unavailable Kafka at the gRPC gateway: every rejection has its code and a message naming the
//! problem, and nothing reaches Kafka for a rejected request.

mod common;

use std::time::{Duration, Instant};

use chatvault_proto::v1::{ChatEvent, EventKind, IngestBatchRequest, IngestRequest};
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    ACME_INGEST_TOKEN, INGEST_TOKEN, TOPIC, authorized, ingest_client, start_gateway, test_config,
};
use chatvault_testkit::s3::S3Server;
use tonic::Code;

fn valid_event() -> ChatEvent {
    common::message_event("acme", "m1", "hello")
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
    config.gateway.delivery_timeout = Duration::from_millis(1_500);
    config.gateway.max_queued_events = 3;
    config.gateway.drain_timeout = Duration::from_millis(1_000);
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

/// Issue 8, point 7: the gateway used to decode up to 64 MiB of a message before it looked at the token, and
/// served any number of calls. Now the token is checked from the headers before the message is read, messages
/// are decoded only up to `gateway.max_grpc_message_bytes`, and at most `gateway.max_grpc_calls` calls are in
/// flight (RESOURCE_EXHAUSTED beyond, before their messages are read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_admitted_by_token_and_bounded_before_their_message_is_read()
-> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.gateway.max_grpc_message_bytes = 1024 * 1024;
    config.gateway.max_grpc_calls = 2;
    config.validate()?;
    let gateway = start_gateway(&config).await?;
    let mut client = ingest_client(&gateway.endpoint()).await?;

    // A 2.2 MB batch: over the message limit.
    let events: Vec<ChatEvent> = (0..2_000)
        .map(|i| ChatEvent {
            message_id: format!("m{i}"),
            text: "x".repeat(1_000),
            ..valid_event()
        })
        .collect();
    let oversized = IngestBatchRequest { events };
    // Without a known token it is refused as unauthenticated: the message was never decoded (decoding it
    // would have failed on its size first).
    let status = client
        .ingest_batch(authorized(oversized.clone(), "not-a-token"))
        .await
        .expect_err("unknown token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = client
        .ingest_batch(tonic::Request::new(oversized.clone()))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // With a token, decoding stops at the limit, which the error names.
    let status = client
        .ingest_batch(authorized(oversized, INGEST_TOKEN))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1048576"), "{}", status.message());
    assert_eq!(record_count(&kafka.brokers, TOPIC)?, 0);

    // Two streams held open take both call slots: a third call is refused at once, before its message is
    // read, and admitted again once a slot is free.
    let mut open_streams = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..2 {
        let (sender, receiver) = tokio::sync::mpsc::channel::<IngestRequest>(1);
        let mut stream_client = client.clone();
        let call = tokio::spawn(async move {
            stream_client
                .ingest_stream(authorized(
                    tokio_stream::wrappers::ReceiverStream::new(receiver),
                    INGEST_TOKEN,
                ))
                .await
        });
        senders.push(sender);
        open_streams.push(call);
    }
    for (index, sender) in senders.iter().enumerate() {
        sender
            .send(IngestRequest {
                event: Some(ChatEvent {
                    message_id: format!("stream-{index}"),
                    ..valid_event()
                }),
            })
            .await?;
    }
    // Both streams are under way (each holding its slot until it ends) once their first events are in Kafka.
    let deadline = Instant::now() + Duration::from_secs(10);
    while record_count(&kafka.brokers, TOPIC)? < 2 {
        assert!(
            Instant::now() < deadline,
            "the streams' first events never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = client
        .ingest(authorized(
            IngestRequest {
                event: Some(valid_event()),
            },
            INGEST_TOKEN,
        ))
        .await
        .expect_err("a third call is refused while two are in flight");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("gateway.max_grpc_calls"),
        "{}",
        refused.message()
    );
    drop(senders);
    for call in open_streams {
        let response = call.await??.into_inner();
        assert_eq!(response.event_ids.len(), 1);
    }
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
    gateway.stop().await?;
    Ok(())
}
