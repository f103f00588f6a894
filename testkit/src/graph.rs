//! A stand-in for Microsoft Graph's Teams export API and the Microsoft identity platform's token endpoint,
//! which nobody can run here. It serves what the documentation describes (`../shared/reference/backfill.md`
//! §2), and the failures an importer must survive:
//! - `POST /{directory}/oauth2/v2.0/token`: the client-credentials grant with a client secret or a
//!   certificate assertion (RS256 JWT whose `x5t` is the registered certificate's SHA-1 thumbprint, `aud` the
//!   token endpoint, unexpired); refusals are `400`/`401` with `error` and an `AADSTS…` `error_description`;
//! - `GET /v1.0/users/{id}/chats/getAllMessages` and `GET /v1.0/teams/{id}/channels/getAllMessages` with
//!   `$top` (at most 50) and `$filter=lastModifiedDateTime gt X and lastModifiedDateTime lt Y` (the only filter
//!   channels accept; anything else is `400 BadRequest`), paged by `@odata.nextLink` with a `$skiptoken`;
//!   unknown users or teams `404 NotFound`, a missing or unknown token `401 InvalidAuthenticationToken`;
//! - faults: the first request of every page answered `429` with `Retry-After: 1` ([`GraphFaults::throttle_every_first_page`]);
//!   one `503` per listed page; every token revoked after a number of requests (a token expiring mid-run); a
//!   page that fails with `500` while [`Graph::break_page`] holds it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The app registration the token endpoint accepts.
#[derive(Clone, Debug)]
pub struct App {
    pub directory: String,
    pub client_id: String,
    pub secret: Option<String>,
    /// DER of the registered certificate and of its key's public key (`RSAPublicKey`).
    pub certificate: Option<(Vec<u8>, Vec<u8>)>,
}

/// Failures to inject.
#[derive(Clone, Debug, Default)]
pub struct GraphFaults {
    /// The first request for each distinct page is answered 429 with `Retry-After: 1`.
    pub throttle_every_first_page: bool,
    /// `(unit path, page index)` answered 503 once (`users/u1`, 1 is the second page).
    pub unavailable_once: Vec<(String, usize)>,
    /// Every token stops being accepted after this many Graph requests made with it.
    pub revoke_tokens_after: Option<u64>,
}

/// What the stand-in saw.
#[derive(Debug, Default)]
pub struct GraphCounts {
    pub tokens_issued: AtomicU64,
    pub token_refusals: AtomicU64,
    pub throttled: AtomicU64,
    pub unavailable: AtomicU64,
    pub unauthorized: AtomicU64,
    /// Pages served, by `(unit path, page index)`.
    pub pages: Mutex<BTreeMap<(String, usize), u64>>,
}

struct State {
    app: App,
    faults: GraphFaults,
    /// `users/{id}` or `teams/{id}` → messages, in `lastModifiedDateTime` order.
    messages: HashMap<String, Vec<Value>>,
    tokens: Mutex<HashMap<String, u64>>,
    throttled_pages: Mutex<HashSet<(String, usize)>>,
    failed_once: Mutex<HashSet<(String, usize)>>,
    broken: Mutex<Option<(String, usize)>>,
    counts: Arc<GraphCounts>,
    base: String,
}

pub struct Graph {
    pub address: SocketAddr,
    pub counts: Arc<GraphCounts>,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Graph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Graph {
    /// Serves `chats` (user id → the messages of that user's chats) and `channels` (team id → its channel
    /// messages, replies included) to `app`.
    pub async fn start(
        app: App,
        chats: HashMap<String, Vec<Value>>,
        channels: HashMap<String, Vec<Value>>,
        faults: GraphFaults,
    ) -> anyhow::Result<Graph> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let mut messages = HashMap::new();
        for (user, list) in chats {
            messages.insert(format!("users/{user}"), sorted(list));
        }
        for (team, list) in channels {
            messages.insert(format!("teams/{team}"), sorted(list));
        }
        let counts = Arc::new(GraphCounts::default());
        let state = Arc::new(State {
            app,
            faults,
            messages,
            tokens: Mutex::new(HashMap::new()),
            throttled_pages: Mutex::new(HashSet::new()),
            failed_once: Mutex::new(HashSet::new()),
            broken: Mutex::new(None),
            counts: counts.clone(),
            base: format!("http://{address}"),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(request, &state).await) }
                });
                tokio::spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .http1_only()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(Graph {
            address,
            counts,
            state,
            task,
        })
    }

    /// `http://<address>`: both the authority and the Graph base URL.
    pub fn endpoint(&self) -> String {
        self.state.base.clone()
    }

    /// Makes page `page` of `unit` fail with 500 until it is called with `None`.
    pub fn break_page(&self, page: Option<(&str, usize)>) {
        *lock(&self.state.broken) = page.map(|(unit, page)| (unit.to_string(), page));
    }

    /// How often page `page` of `unit` was served.
    pub fn served(&self, unit: &str, page: usize) -> u64 {
        lock(&self.counts.pages)
            .get(&(unit.to_string(), page))
            .copied()
            .unwrap_or(0)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sorted(mut list: Vec<Value>) -> Vec<Value> {
    list.sort_by(|a, b| {
        a["lastModifiedDateTime"]
            .as_str()
            .cmp(&b["lastModifiedDateTime"].as_str())
    });
    list
}

fn answer(status: StatusCode, body: Value, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    answer(
        status,
        json!({"error": {"code": code, "message": message, "innerError": {"request-id": "00000000-0000-0000-0000-000000000000"}}}),
        &[],
    )
}

async fn handle(request: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string);
    if request.method() == hyper::Method::POST && path.ends_with("/oauth2/v2.0/token") {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        return token(state, &path, &body);
    }
    let Some(resource) = path.strip_prefix("/v1.0/") else {
        return graph_error(StatusCode::NOT_FOUND, "UnknownError", "no such resource");
    };
    let unit = match resource.split('/').collect::<Vec<_>>()[..] {
        ["users", id, "chats", "getAllMessages"] => format!("users/{id}"),
        ["teams", id, "channels", "getAllMessages"] => format!("teams/{id}"),
        _ => {
            return graph_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "Resource not found for the segment",
            );
        }
    };
    // Authentication first, as Graph does.
    let accepted = authorization.as_ref().is_some_and(|token| {
        let mut tokens = lock(&state.tokens);
        match tokens.get_mut(token) {
            Some(uses) => {
                *uses += 1;
                state
                    .faults
                    .revoke_tokens_after
                    .is_none_or(|limit| *uses <= limit)
            }
            None => false,
        }
    });
    if !accepted {
        state.counts.unauthorized.fetch_add(1, Ordering::Relaxed);
        return graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        );
    }
    let parameters: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let top = parameters
        .get("$top")
        .and_then(|top| top.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 50);
    let skip = parameters
        .get("$skiptoken")
        .and_then(|skip| skip.parse::<usize>().ok())
        .unwrap_or(0);
    let page = skip / top;
    let Some((from, to)) = parameters.get("$filter").and_then(|filter| window(filter)) else {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Invalid filter clause: only lastModifiedDateTime gt and lt are supported",
        );
    };
    let key = (unit.clone(), page);
    if lock(&state.broken).as_ref() == Some(&key) {
        return graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "Unknown error",
        );
    }
    if state.faults.throttle_every_first_page && lock(&state.throttled_pages).insert(key.clone()) {
        state.counts.throttled.fetch_add(1, Ordering::Relaxed);
        return answer(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": {"code": "TooManyRequests", "message": "Too many requests"}}),
            &[("retry-after", "1".into())],
        );
    }
    if state.faults.unavailable_once.contains(&key) && lock(&state.failed_once).insert(key.clone())
    {
        state.counts.unavailable.fetch_add(1, Ordering::Relaxed);
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"code": "ServiceUnavailable", "message": "Service unavailable"}}),
            &[("retry-after", "1".into())],
        );
    }
    let Some(messages) = state.messages.get(&unit) else {
        return graph_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{unit} was not found"),
        );
    };
    let selected: Vec<&Value> = messages
        .iter()
        .filter(|message| {
            let modified = message["lastModifiedDateTime"].as_str().unwrap_or_default();
            modified > from.as_str() && modified < to.as_str()
        })
        .collect();
    *lock(&state.counts.pages).entry(key).or_default() += 1;
    let value: Vec<&Value> = selected.iter().skip(skip).take(top).copied().collect();
    let mut body = json!({"@odata.context": format!("{}/v1.0/$metadata#Collection(chatMessage)", state.base), "value": value});
    if skip + top < selected.len() {
        let mut next = form_urlencoded::Serializer::new(String::new());
        next.append_pair("$top", &top.to_string());
        next.append_pair("$filter", &parameters["$filter"]);
        next.append_pair("$skiptoken", &(skip + top).to_string());
        body["@odata.nextLink"] = json!(format!("{}{}?{}", state.base, path, next.finish()));
    }
    answer(StatusCode::OK, body, &[])
}

/// `(X, Y)` of `lastModifiedDateTime gt X and lastModifiedDateTime lt Y`.
fn window(filter: &str) -> Option<(String, String)> {
    let rest = filter.strip_prefix("lastModifiedDateTime gt ")?;
    let (from, to) = rest.split_once(" and lastModifiedDateTime lt ")?;
    Some((from.trim().to_string(), to.trim().to_string()))
}

fn token(state: &State, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let refuse = |status: StatusCode, error: &str, description: &str| {
        state.counts.token_refusals.fetch_add(1, Ordering::Relaxed);
        answer(
            status,
            json!({"error": error, "error_description": description, "error_codes": [7000215]}),
            &[],
        )
    };
    let app = &state.app;
    if path != format!("/{}/oauth2/v2.0/token", app.directory) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS90002: Tenant not found.",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("scope").map(String::as_str) != Some("https://graph.microsoft.com/.default")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain grant_type=client_credentials and a .default scope.",
        );
    }
    if form.get("client_id") != Some(&app.client_id) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "AADSTS700016: Application not found in the directory.",
        );
    }
    let proven = match (form.get("client_secret"), form.get("client_assertion")) {
        (Some(secret), None) => app.secret.as_ref() == Some(secret),
        (None, Some(assertion)) => {
            form.get("client_assertion_type").map(String::as_str)
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && verify_assertion(state, path, assertion)
        }
        _ => false,
    };
    if !proven {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "AADSTS7000215: Invalid client secret or assertion provided.",
        );
    }
    let mut random = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).expect("random");
    let token = format!("graph-{}", hex::encode(random));
    lock(&state.tokens).insert(token.clone(), 0);
    state.counts.tokens_issued.fetch_add(1, Ordering::Relaxed);
    answer(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}),
        &[],
    )
}

fn verify_assertion(state: &State, path: &str, assertion: &str) -> bool {
    use sha1::Digest;
    let Some((certificate, public_key)) = &state.app.certificate else {
        return false;
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return false;
    };
    let decode = |part: &str| {
        BASE64URL
            .decode(part)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
    };
    let (Some(header), Some(claims), Ok(signature)) =
        (decode(header), decode(claims), BASE64URL.decode(signature))
    else {
        return false;
    };
    let thumbprint = BASE64URL.encode(sha1::Sha1::digest(certificate));
    let now = chatvault_core::time::now_micros() / 1_000_000;
    let audience = format!("{}{path}", state.base);
    header["alg"] == "RS256"
        && header["x5t"].as_str() == Some(thumbprint.as_str())
        && claims["aud"].as_str() == Some(audience.as_str())
        && claims["iss"].as_str() == Some(state.app.client_id.as_str())
        && claims["sub"].as_str() == Some(state.app.client_id.as_str())
        && claims["exp"].as_i64().is_some_and(|exp| exp > now)
        && ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            public_key,
        )
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .is_ok()
}

/// DER of the first PEM block labelled `label`.
pub fn pem_der(pem: &str, label: &str) -> Vec<u8> {
    let body = pem
        .split(&format!("-----BEGIN {label}-----"))
        .nth(1)
        .and_then(|rest| rest.split(&format!("-----END {label}-----")).next())
        .expect("a PEM block");
    BASE64
        .decode(
            body.chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>(),
        )
        .expect("base64")
}
