//! The chaos suite's peers: the broker in its own process keeps its records across a restart of every broker,
//! and the fault proxy forwards requests exactly, answers injected errors without forwarding, and loses
//! answers only after the server applied the request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chatvault_core::storage::object_store_from_config;
use chatvault_testkit::broker::BrokerProcess;
use chatvault_testkit::fault_proxy::{FaultProxy, Faults};
use chatvault_testkit::kafka::high_watermarks;
use chatvault_testkit::s3::S3Server;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::{ObjectStoreExt, PutMode, PutOptions};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::net::{TcpListener, TcpStream};

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    count: usize,
    tag: &str,
) -> anyhow::Result<()> {
    for index in 0..count {
        let key = format!("key-{index}");
        let value = format!("{tag}-{index}");
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_process_keeps_its_records_across_a_restart_of_every_broker()
-> anyhow::Result<()> {
    let broker = BrokerProcess::start_binary(
        env!("CARGO_BIN_EXE_chatvault-test-broker").as_ref(),
        "peers",
        4,
    )?;
    let watermarks = high_watermarks(&broker.brokers, "peers.dead-letter")?;
    assert_eq!(
        watermarks,
        vec![(0, 0)],
        "the dead-letter topic has one empty partition"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    produce(&producer, "peers", 20, "before").await?;

    broker.all_down()?;
    // Every broker refuses connections: a new client cannot even read metadata.
    let inspector: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .create()?;
    assert!(
        inspector
            .fetch_metadata(Some("peers"), Duration::from_secs(2))
            .is_err(),
        "metadata served while every broker is down"
    );
    broker.all_up()?;

    produce(&producer, "peers", 20, "after").await?;
    let total: i64 = high_watermarks(&broker.brokers, "peers")?
        .iter()
        .map(|(_, high)| high)
        .sum();
    assert_eq!(total, 40, "records before and after the restart");
    assert!(
        broker.command("no_such_command").is_err(),
        "an unknown command is refused"
    );
    Ok(())
}

/// An HTTP server that answers every request with a description of it, and counts them.
async fn echo_server() -> anyhow::Result<(std::net::SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counter = counter.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let mut headers: Vec<String> = parts
                            .headers
                            .iter()
                            .map(|(name, value)| {
                                format!("{name}: {}", value.to_str().unwrap_or("?"))
                            })
                            .collect();
                        headers.sort();
                        let description = format!(
                            "{} {}\n{}\n\n{}",
                            parts.method,
                            parts.uri,
                            headers.join("\n"),
                            String::from_utf8_lossy(&body)
                        );
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(description))))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Ok((address, served))
}

/// One request over a fresh HTTP/1 connection to `address`.
async fn send(
    address: std::net::SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<(u16, String), hyper::Error> {
    let stream = TcpStream::connect(address).await.expect("proxy reachable");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn put_request() -> Request<Full<Bytes>> {
    Request::builder()
        .method("PUT")
        .uri("/bucket/some/key.json?x-id=PutObject")
        .header("host", "storage.example:9000")
        .header("if-none-match", "*")
        .header("x-amz-date", "20251124T160000Z")
        .header("content-length", "5")
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_forwards_exactly_and_injects_its_faults() -> anyhow::Result<()> {
    let (target, served) = echo_server().await?;

    let transparent = FaultProxy::start(target, Faults::none()).await?;
    let (status, description) = send(transparent.address, put_request()).await?;
    assert_eq!(status, 200);
    assert_eq!(
        description,
        "PUT /bucket/some/key.json?x-id=PutObject\ncontent-length: 5\nhost: storage.example:9000\nif-none-match: *\nx-amz-date: 20251124T160000Z\n\nhello",
        "the server sees the request as the client sent it"
    );
    assert_eq!(
        transparent
            .counts
            .conditional_requests
            .load(Ordering::SeqCst),
        1
    );

    let failing = FaultProxy::start(
        target,
        Faults {
            error_probability: 1.0,
            ..Faults::none()
        },
    )
    .await?;
    let before = served.load(Ordering::SeqCst);
    let (status, body) = send(failing.address, put_request()).await?;
    assert!(status == 503 || status == 500, "injected status {status}");
    assert!(
        body.contains("<Code>SlowDown</Code>") || body.contains("<Code>InternalError</Code>"),
        "an S3 error document: {body}"
    );
    assert_eq!(
        served.load(Ordering::SeqCst),
        before,
        "an injected error is not forwarded"
    );

    let losing = FaultProxy::start(
        target,
        Faults {
            drop_response_probability: 1.0,
            max_latency: Duration::from_millis(20),
            ..Faults::none()
        },
    )
    .await?;
    let before = served.load(Ordering::SeqCst);
    let result = send(losing.address, put_request()).await;
    assert!(result.is_err(), "the answer must be lost, got {result:?}");
    assert_eq!(
        served.load(Ordering::SeqCst),
        before + 1,
        "a lost answer's request reached the server"
    );
    assert_eq!(losing.counts.dropped_responses.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_creates_keep_their_meaning_through_the_fault_proxy() -> anyhow::Result<()> {
    let s3 = S3Server::start("archive").await?;
    let proxy = FaultProxy::start(
        s3.address(),
        Faults {
            max_latency: Duration::from_millis(10),
            ..Faults::none()
        },
    )
    .await?;
    let store = object_store_from_config(&s3.storage_config_at(&proxy.endpoint()))?;
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let path = object_store::path::Path::from("manifests/0.json");
    store.put_opts(&path, "first".into(), create()).await?;
    let second = store.put_opts(&path, "second".into(), create()).await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "a second conditional create must fail with AlreadyExists, got {second:?}"
    );
    let stored = store.get(&path).await?.bytes().await?;
    assert_eq!(&stored[..], b"first");
    Ok(())
}
