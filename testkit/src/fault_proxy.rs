//! An HTTP/1 proxy that injects the faults object storage shows in production, in front of a real S3 server:
//! per request, with configurable probabilities,
//! - an S3 error (`503 SlowDown` or `500 InternalError`, as S3 XML) without forwarding the request;
//! - added latency before forwarding;
//! - a lost answer: the request is forwarded and applied by the server, then the client's connection is
//!   closed without a response, so the client cannot know whether its write landed.
//!
//! Requests are forwarded exactly as received (method, target, every header including `Host`, which SigV4
//! signs, and the body), conditional ones (`If-None-Match`, `If-Match`) included, and responses come back
//! exactly as the server sent them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to requests. Probabilities are in `[0, 1]` and drawn independently per request, in
/// this order: error (the request goes no further), then latency, then forwarding with a lost answer.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Answer with `503 SlowDown` or `500 InternalError` instead of forwarding.
    pub error_probability: f64,
    /// Each forwarded request waits a uniformly random time in `[0, max_latency]` first.
    pub max_latency: Duration,
    /// Forward, let the server apply the request, then close the connection without answering.
    pub drop_response_probability: f64,
    /// Seed of the proxy's pseudo-random choices.
    pub seed: u64,
}

impl Faults {
    /// No faults: a transparent proxy.
    pub fn none() -> Faults {
        Faults {
            error_probability: 0.0,
            max_latency: Duration::ZERO,
            drop_response_probability: 0.0,
            seed: 1,
        }
    }
}

/// What the proxy did, counted since it started.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub requests: AtomicU64,
    /// Answered with an injected S3 error, not forwarded.
    pub errors: AtomicU64,
    /// Forwarded and applied, answer dropped.
    pub dropped_responses: AtomicU64,
    /// Forwarded requests that carried `If-None-Match` or `If-Match`.
    pub conditional_requests: AtomicU64,
    /// Requests the server could not be reached for (the client's connection is closed).
    pub upstream_failures: AtomicU64,
}

impl FaultCounts {
    /// `requests=… errors=… dropped_responses=… conditional=… upstream_failures=…`.
    pub fn summary(&self) -> String {
        format!(
            "requests={} errors={} dropped_responses={} conditional={} upstream_failures={}",
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.dropped_responses.load(Ordering::Relaxed),
            self.conditional_requests.load(Ordering::Relaxed),
            self.upstream_failures.load(Ordering::Relaxed),
        )
    }
}

pub struct FaultProxy {
    pub address: SocketAddr,
    pub counts: Arc<FaultCounts>,
    task: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    faults: Faults,
    random: Mutex<u64>,
    counts: Arc<FaultCounts>,
    /// Idle connections to the server, reused so a long test does not exhaust loopback ports.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Shared {
    /// Uniform in `[0, 1)` (SplitMix64).
    fn uniform(&self) -> f64 {
        let mut state = self
            .random
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn connection(&self) -> std::io::Result<SendRequest<Full<Bytes>>> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop();
            match idle {
                Some(mut sender) => {
                    if !sender.is_closed() && sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => break,
            }
        }
        let stream = TcpStream::connect(self.target).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn release(&self, sender: SendRequest<Full<Bytes>>) {
        if !sender.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(sender);
        }
    }

    /// Sends `request` to the server and reads the whole answer.
    async fn forward(
        &self,
        request: Request<Full<Bytes>>,
    ) -> std::io::Result<Response<Full<Bytes>>> {
        let mut sender = self.connection().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        self.release(sender);
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}

/// Why the proxy closed a client's connection instead of answering.
#[derive(Debug)]
enum NoAnswer {
    /// The injected fault: the server applied the request, its answer is thrown away.
    Dropped,
    /// The request or the server failed.
    Failed(String),
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Dropped => write!(f, "answer dropped by the fault proxy"),
            NoAnswer::Failed(reason) => write!(f, "fault proxy: {reason}"),
        }
    }
}

impl std::error::Error for NoAnswer {}

fn s3_error(status: StatusCode, code: &str, message: &str, id: u64) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>chatvault-fault-{id}</RequestId></Error>"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, NoAnswer> {
    let id = shared.counts.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|error| NoAnswer::Failed(format!("reading the request body: {error}")))?
        .to_bytes();

    if shared.uniform() < shared.faults.error_probability {
        shared.counts.errors.fetch_add(1, Ordering::Relaxed);
        return Ok(if shared.uniform() < 0.5 {
            s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate.",
                id,
            )
        } else {
            s3_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "We encountered an internal error. Please try again.",
                id,
            )
        });
    }
    if !shared.faults.max_latency.is_zero() {
        tokio::time::sleep(shared.faults.max_latency.mul_f64(shared.uniform())).await;
    }
    let drop_answer = shared.uniform() < shared.faults.drop_response_probability;

    // The same request, rebuilt for the client connection: origin-form target, every header as received.
    let mut forwarded = Request::new(Full::new(body));
    *forwarded.method_mut() = parts.method;
    *forwarded.uri_mut() = parts.uri;
    *forwarded.headers_mut() = parts.headers;
    if forwarded
        .headers()
        .contains_key(hyper::header::IF_NONE_MATCH)
        || forwarded.headers().contains_key(hyper::header::IF_MATCH)
    {
        shared
            .counts
            .conditional_requests
            .fetch_add(1, Ordering::Relaxed);
    }
    let response = match shared.forward(forwarded).await {
        Ok(response) => response,
        Err(error) => {
            shared
                .counts
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(NoAnswer::Failed(format!("forwarding: {error}")));
        }
    };
    if drop_answer {
        shared
            .counts
            .dropped_responses
            .fetch_add(1, Ordering::Relaxed);
        // An error from the service makes hyper close the connection without writing a response.
        return Err(NoAnswer::Dropped);
    }
    Ok(response)
}

impl FaultProxy {
    /// Proxies a loopback port to the HTTP server at `target`, injecting `faults`.
    pub async fn start(target: SocketAddr, faults: Faults) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let counts = Arc::new(FaultCounts::default());
        let shared = Arc::new(Shared {
            target,
            random: Mutex::new(faults.seed),
            faults,
            counts: counts.clone(),
            idle: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let shared = shared.clone();
                let service =
                    hyper::service::service_fn(move |request| handle(request, shared.clone()));
                connections.spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .http1_only()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
                // Forget finished connections as we go.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(FaultProxy {
            address,
            counts,
            task,
        })
    }

    /// `http://<address>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops the JoinSet, which aborts every connection.
        self.task.abort();
    }
}
