//! Microsoft Teams through Microsoft Graph's export API (`../shared/reference/backfill.md` §2):
//! `GET /users/{id}/chats/getAllMessages` (1:1, group and meeting chats of a user) and
//! `GET /teams/{id}/channels/getAllMessages` (every channel of a team, replies included), for a time window
//! (`$filter=lastModifiedDateTime gt <from> and lastModifiedDateTime lt <to>`).
//!
//! - **Units**: one per user or team for the window; a unit's pages follow `@odata.nextLink`, and each
//!   acknowledged page stores the next link in the checkpoint, so a stopped import resumes at the page it was
//!   on.
//! - **Authentication**: the OAuth 2.0 client-credentials grant at the Microsoft identity platform's token
//!   endpoint, with a client secret or a certificate (a `client_assertion` JWT signed RS256 with the
//!   certificate's key, `x5t` its SHA-1 thumbprint). The token is renewed five minutes before it expires, and
//!   once more when Graph answers 401 (a token revoked or expired early).
//! - **Throttling**: requests are spaced to at most `max_requests_per_second` (Graph allows 200 per app and
//!   tenant, 4 per team and channel for channel messages); a 429 or 503 waits `Retry-After` (else an
//!   exponential backoff) before the same request is sent again, and holds back every other request too;
//!   other 5xx answers and connection failures back off the same way, until `max_retry_time` has passed.
//! - **Duplicates**: a chat's messages come once per participant whose chats are exported; the driver sends
//!   each derived event id once per run and the archive collapses the rest.
//! - **Errors**: 403 (the app lacks `Chat.Read.All` / `ChannelMessage.Read.All`, or protected-API access) stops
//!   the import naming the permission; 404 (no such user or team, or no Teams licence) rejects that unit
//!   with Graph's message and goes on.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_ingest_gateway::webhooks::teams::exported_message_events;
use serde_json::{Value, json};

use crate::{Part, PartFuture, Rejection, Source, Unit};

/// Messages per page asked for (`$top`).
const PAGE_SIZE: u32 = 50;
/// A token is renewed when it has less than this left.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// How the app proves who it is.
pub enum Credential {
    Secret(String),
    /// A certificate registered for the app (PEM) and its private key (PKCS#8 PEM).
    Certificate {
        certificate_pem: String,
        key_pem: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Secret(_) => "Secret(<redacted>)",
            Credential::Certificate { .. } => "Certificate { key: <redacted> }",
        })
    }
}

/// What to export and how to reach Graph.
#[derive(Debug)]
pub struct Options {
    /// The chatvault tenant the history belongs to.
    pub tenant: String,
    /// The Microsoft Entra tenant (directory) id.
    pub directory: String,
    pub client_id: String,
    pub credential: Credential,
    /// Users whose chats are exported.
    pub users: Vec<String>,
    /// Teams whose channels are exported.
    pub teams: Vec<String>,
    /// The window, RFC 3339: messages last modified after `from` and before `to`.
    pub from: String,
    pub to: String,
    /// `A` or `B` (Graph's payment models), or empty for evaluation mode.
    pub model: String,
    /// `https://login.microsoftonline.com`, or a national cloud's.
    pub authority: String,
    /// `https://graph.microsoft.com`.
    pub graph: String,
    pub max_requests_per_second: f64,
    pub max_retry_time: Duration,
}

struct Token {
    value: String,
    expires: Instant,
}

/// The Graph export as a [`Source`].
pub struct TeamsExport {
    options: Options,
    fingerprint: String,
    http: reqwest::Client,
    token: Option<Token>,
    /// No request leaves before this (request spacing, and a `Retry-After` holds every request back).
    next_request: Instant,
    /// Calls repeated after throttling or a failure.
    pub retries: u64,
    /// Tokens obtained (the first, renewals, and after a 401).
    pub tokens_obtained: u64,
}

impl TeamsExport {
    pub fn new(options: Options) -> Result<TeamsExport> {
        if options.users.is_empty() && options.teams.is_empty() {
            return Err(Error::invalid_argument(
                "name at least one --user (chats) or --team (channels) to export",
            ));
        }
        for (name, value) in [("--from", &options.from), ("--to", &options.to)] {
            if chatvault_core::time::parse_rfc3339_micros(value).is_none() {
                return Err(Error::invalid_argument(format!(
                    "{name} {value:?} is not an RFC 3339 time (2024-01-01T00:00:00Z)"
                )));
            }
        }
        if !matches!(options.model.as_str(), "" | "A" | "B") {
            return Err(Error::invalid_argument(
                "--model is A or B (Graph's payment models), or absent for evaluation mode",
            ));
        }
        let parameters =
            json!([options.directory, options.from, options.to, options.model]).to_string();
        let fingerprint = hex::encode(
            ring::digest::digest(&ring::digest::SHA256, parameters.as_bytes()).as_ref(),
        );
        chatvault_core::storage::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|error| Error::internal(format!("an HTTP client: {error}")))?;
        Ok(TeamsExport {
            options,
            fingerprint,
            http,
            token: None,
            next_request: Instant::now(),
            retries: 0,
            tokens_obtained: 0,
        })
    }

    /// The first page of a unit.
    fn first_page(&self, unit: &str) -> Result<String> {
        let (path, id) = unit
            .split_once('/')
            .ok_or_else(|| Error::internal(format!("not a unit of this import: {unit}")))?;
        let resource = match path {
            "users" => format!("users/{}/chats/getAllMessages", encode(id)),
            "teams" => format!("teams/{}/channels/getAllMessages", encode(id)),
            _ => {
                return Err(Error::internal(format!(
                    "not a unit of this import: {unit}"
                )));
            }
        };
        let filter = format!(
            "lastModifiedDateTime gt {} and lastModifiedDateTime lt {}",
            self.options.from, self.options.to
        );
        let mut url = format!(
            "{}/v1.0/{resource}?$top={PAGE_SIZE}&$filter={}",
            self.options.graph.trim_end_matches('/'),
            encode(&filter)
        );
        if !self.options.model.is_empty() {
            url.push_str("&model=");
            url.push_str(&self.options.model);
        }
        Ok(url)
    }

    async fn token(&mut self) -> Result<String> {
        if let Some(token) = &self.token
            && token.expires > Instant::now() + TOKEN_MARGIN
        {
            return Ok(token.value.clone());
        }
        let endpoint = format!(
            "{}/{}/oauth2/v2.0/token",
            self.options.authority.trim_end_matches('/'),
            encode(&self.options.directory)
        );
        let mut form = vec![
            ("client_id", self.options.client_id.clone()),
            ("scope", "https://graph.microsoft.com/.default".to_string()),
            ("grant_type", "client_credentials".to_string()),
        ];
        match &self.options.credential {
            Credential::Secret(secret) => form.push(("client_secret", secret.clone())),
            Credential::Certificate {
                certificate_pem,
                key_pem,
            } => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    client_assertion(&self.options.client_id, &endpoint, certificate_pem, key_pem)?,
                ));
            }
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let response = loop {
            let sent = self.http.post(&endpoint).form(&form).send().await;
            match sent {
                Ok(response)
                    if !response.status().is_server_error() && response.status() != 429 =>
                {
                    break response;
                }
                outcome => {
                    if started.elapsed() >= self.options.max_retry_time {
                        return Err(Error::unavailable(format!(
                            "the token endpoint {endpoint} kept failing: {}",
                            match outcome {
                                Ok(response) => response.status().to_string(),
                                Err(error) => error.to_string(),
                            }
                        )));
                    }
                    let wait = outcome
                        .as_ref()
                        .ok()
                        .and_then(retry_after)
                        .unwrap_or(backoff);
                    self.retries += 1;
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        let status = response.status();
        let body: Value = response.json_value().await?;
        if !status.is_success() {
            // The identity platform names the problem in `error` and `error_description`; neither holds the secret.
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                format!(
                    "the Microsoft identity platform refused the app's credentials ({status}): {} {}",
                    body["error"].as_str().unwrap_or_default(),
                    body["error_description"].as_str().unwrap_or_default()
                ),
            ));
        }
        let value = body["access_token"]
            .as_str()
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Error::unavailable("the token endpoint answered without an access_token")
            })?
            .to_string();
        let lifetime = body["expires_in"].as_u64().unwrap_or(3600);
        self.token = Some(Token {
            value: value.clone(),
            expires: Instant::now() + Duration::from_secs(lifetime),
        });
        self.tokens_obtained += 1;
        Ok(value)
    }

    /// GETs `url` from Graph, handling throttling, failures and expired tokens; `Ok(Err(message))` is a 404.
    async fn get(&mut self, url: &str) -> Result<std::result::Result<Value, String>> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut renewed = false;
        loop {
            let wait = self.next_request.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.next_request = Instant::now()
                + Duration::from_secs_f64(1.0 / self.options.max_requests_per_second.max(0.01));
            let token = self.token().await?;
            let sent = self.http.get(url).bearer_auth(&token).send().await;
            let retry_wait = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match status {
                        200..=299 => return Ok(Ok(response.json_value().await?)),
                        401 if !renewed => {
                            // Expired or revoked early: one more token, then the same request.
                            self.token = None;
                            renewed = true;
                            continue;
                        }
                        404 => {
                            let body = response.json_value().await.unwrap_or(Value::Null);
                            return Ok(Err(graph_message(&body, status)));
                        }
                        403 => {
                            let body = response.json_value().await.unwrap_or(Value::Null);
                            return Err(Error::new(
                                ErrorCode::PermissionDenied,
                                format!(
                                    "Microsoft Graph refused {url}: {}; the app needs the application permissions \
                                     Chat.Read.All and ChannelMessage.Read.All (admin consent) and access to the \
                                     protected Teams export APIs",
                                    graph_message(&body, status)
                                ),
                            ));
                        }
                        429 | 500..=599 => retry_after(&response),
                        _ => {
                            let body = response.json_value().await.unwrap_or(Value::Null);
                            return Err(Error::unavailable(format!(
                                "Microsoft Graph answered {url}: {}",
                                graph_message(&body, status)
                            )));
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "a Graph request failed");
                    None
                }
            };
            if started.elapsed() >= self.options.max_retry_time {
                return Err(Error::unavailable(format!(
                    "Microsoft Graph kept throttling or failing {url} for {:?}",
                    self.options.max_retry_time
                )));
            }
            let wait = retry_wait.unwrap_or(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(60));
            self.retries += 1;
            // A Retry-After holds back every request, not only this one.
            self.next_request = self.next_request.max(Instant::now() + wait);
        }
    }

    async fn page(&mut self, unit: &str, cursor: Option<String>) -> Result<Part> {
        let url = match cursor {
            Some(url) => url,
            None => self.first_page(unit)?,
        };
        let mut part = Part {
            unit: Unit {
                name: unit.to_string(),
                ..Unit::default()
            },
            next: None,
        };
        let body = match self.get(&url).await? {
            Ok(body) => body,
            Err(message) => {
                part.unit.rejected.push(Rejection {
                    unit: unit.to_string(),
                    item: "export".into(),
                    reason: message,
                });
                return Ok(part);
            }
        };
        for (position, message) in body["value"].as_array().into_iter().flatten().enumerate() {
            let raw = serde_json::to_vec(message).expect("a JSON value serializes");
            match exported_message_events(&self.options.tenant, message, &raw) {
                Ok((events, skipped)) => {
                    part.unit.events.extend(events);
                    part.unit.skipped.extend(skipped);
                }
                Err(error) => part.unit.rejected.push(Rejection {
                    unit: unit.to_string(),
                    item: format!(
                        "message {}",
                        message["id"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or(position.to_string())
                    ),
                    reason: error.to_string(),
                }),
            }
        }
        part.next = body["@odata.nextLink"]
            .as_str()
            .filter(|next| !next.is_empty())
            .map(str::to_string);
        Ok(part)
    }
}

impl Source for TeamsExport {
    fn kind(&self) -> &'static str {
        "teams"
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn units(&self) -> Vec<String> {
        let users = self
            .options
            .users
            .iter()
            .map(|user| format!("users/{user}"));
        let teams = self
            .options
            .teams
            .iter()
            .map(|team| format!("teams/{team}"));
        users.chain(teams).collect()
    }

    fn read<'a>(&'a mut self, unit: &'a str, cursor: Option<String>) -> PartFuture<'a> {
        Box::pin(self.page(unit, cursor))
    }

    fn retries(&self) -> u64 {
        self.retries
    }
}

/// Reading a response body as JSON, with the failure as an error of ours.
trait JsonBody {
    async fn json_value(self) -> Result<Value>;
}

impl JsonBody for reqwest::Response {
    async fn json_value(self) -> Result<Value> {
        let bytes = self
            .bytes()
            .await
            .map_err(|error| Error::unavailable(format!("reading a response: {error}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|error| Error::unavailable(format!("a response is not JSON: {error}")))
    }
}

/// `Retry-After` in seconds (Graph sends seconds).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|seconds| Duration::from_secs(seconds.min(600)))
}

/// Graph's `error.code: error.message`, else the status.
fn graph_message(body: &Value, status: u16) -> String {
    let error = &body["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!("{status} {code}: {message}"),
        _ => format!("HTTP {status}"),
    }
}

/// Percent-encodes a path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The DER of the first PEM block labelled `label`.
fn pem_der(pem: &str, label: &str) -> Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = pem
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or_else(|| Error::invalid_argument(format!("no {label} PEM block")))?;
    let text: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    BASE64
        .decode(text)
        .map_err(|_| Error::invalid_argument(format!("the {label} PEM block is not base64")))
}

/// The certificate credential: a JWT for the token endpoint `audience`, signed RS256 with the certificate's
/// key, naming the certificate by its SHA-1 thumbprint (`x5t`), valid ten minutes.
fn client_assertion(
    client_id: &str,
    audience: &str,
    certificate_pem: &str,
    key_pem: &str,
) -> Result<String> {
    use sha1::Digest;
    let certificate = pem_der(certificate_pem, "CERTIFICATE")?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(&pem_der(key_pem, "PRIVATE KEY")?).map_err(
        |error| {
            Error::invalid_argument(format!(
                "the certificate's key is not an RSA PKCS#8 key: {error}"
            ))
        },
    )?;
    let thumbprint = sha1::Sha1::digest(&certificate);
    let now = chatvault_core::time::now_micros() / 1_000_000;
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| Error::internal("no randomness for the assertion's jti"))?;
    let header = json!({"alg": "RS256", "typ": "JWT", "x5t": BASE64URL.encode(thumbprint)});
    let claims = json!({"aud": audience, "iss": client_id, "sub": client_id, "jti": hex::encode(jti),
                        "nbf": now, "iat": now, "exp": now + 600});
    let signing_input = format!(
        "{}.{}",
        BASE64URL.encode(header.to_string()),
        BASE64URL.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| Error::internal("signing the client assertion failed"))?;
    Ok(format!("{signing_input}.{}", BASE64URL.encode(signature)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            tenant: "acme".into(),
            directory: "dir-1".into(),
            client_id: "app-1".into(),
            credential: Credential::Secret("s3cret".into()),
            users: vec!["u1".into()],
            teams: vec!["t1".into()],
            from: "2024-01-01T00:00:00Z".into(),
            to: "2024-02-01T00:00:00Z".into(),
            model: "A".into(),
            authority: "https://login.example".into(),
            graph: "https://graph.example/".into(),
            max_requests_per_second: 10.0,
            max_retry_time: Duration::from_secs(1),
        }
    }

    #[test]
    fn units_pages_and_refusals() {
        let export = TeamsExport::new(options()).expect("export");
        assert_eq!(export.units(), vec!["users/u1", "teams/t1"]);
        assert_eq!(
            export.first_page("teams/t1").expect("url"),
            "https://graph.example/v1.0/teams/t1/channels/getAllMessages?$top=50&$filter=\
             lastModifiedDateTime%20gt%202024-01-01T00:00:00Z%20and%20lastModifiedDateTime%20lt%20\
             2024-02-01T00:00:00Z&model=A"
        );
        assert!(!format!("{:?}", options().credential).contains("s3cret"));
        for (change, needle) in [
            (
                Options {
                    users: vec![],
                    teams: vec![],
                    ..options()
                },
                "--user",
            ),
            (
                Options {
                    from: "yesterday".into(),
                    ..options()
                },
                "--from",
            ),
            (
                Options {
                    model: "C".into(),
                    ..options()
                },
                "--model",
            ),
        ] {
            let error = TeamsExport::new(change).err().expect("refused");
            assert!(error.message().contains(needle), "{error}");
        }
    }
}
