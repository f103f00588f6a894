//! `chatvault login` and `chatvault logout`: a person signs in at the company's OpenID provider with the
//! OAuth 2.0 device authorization grant (RFC 8628), which needs no browser on the machine that runs the
//! command (a terminal, an SSH session): the person opens the provider's page anywhere and types a code.
//!
//! The flow: read the provider's discovery document (its `issuer` must be the one asked for, and it must name
//! a `device_authorization_endpoint`); ask that endpoint for a device code as a public client, with `scope`
//! and, when given, the API's `resource` indicator (RFC 8707); show the verification URI and the user code;
//! poll the token endpoint every `interval` seconds (5 when the provider does not say, 5 more after each
//! `slow_down`) until the person signed in and consented, declined (`access_denied`), or the code expired
//! (`expired_token`); keep the tokens in the [`CredentialStore`].
//!
//! Client commands then take the access token from there ([`signed_in_token`]), renewed with the refresh
//! token when it expires within [`RENEW_MARGIN_SECS`]. Every URL involved must be https, except on a loopback
//! host (a provider on the same machine, as in tests).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value};

use crate::credentials::{CredentialStore, Credentials, Secret};

const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// The polling interval when the provider names none (RFC 8628 section 3.2).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How much longer to wait after each `slow_down` (RFC 8628 section 3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// A stored access token expiring within this many seconds is renewed before use, so it does not expire on
/// the way to the server (or during a long restore's stream setup).
pub const RENEW_MARGIN_SECS: i64 = 60;
/// How long one request to the provider may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from the provider.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The OpenID provider's issuer identifier, exactly as its discovery document names it (the `issuer` of
    /// the servers' `[[oidc]]` entry).
    #[arg(long, env = "CHATVAULT_OIDC_ISSUER")]
    issuer: String,
    /// The provider's public client for chatvault's command line (device authorization grant, no secret).
    #[arg(long, env = "CHATVAULT_OIDC_CLIENT_ID")]
    client_id: String,
    /// Scopes to ask for, separated by spaces; `offline_access` asks for a refresh token, so the sign-in
    /// outlives one access token.
    #[arg(
        long,
        env = "CHATVAULT_OIDC_SCOPE",
        default_value = "openid offline_access"
    )]
    scope: String,
    /// The chatvault API at the provider (an RFC 8707 resource indicator, usually the `audience` of the
    /// servers' `[[oidc]]` entry). Without it the provider's default resource applies.
    #[arg(long, env = "CHATVAULT_OIDC_RESOURCE")]
    resource: Option<String>,
}

/// Signs in with the device authorization grant and stores the sign-in for client commands.
pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let store = CredentialStore::of_current_user()?;
    let http = Http::new()?;
    let endpoints = discover(&http, &args.issuer).await?;
    let mut form = vec![
        ("client_id", args.client_id.as_str()),
        ("scope", args.scope.as_str()),
    ];
    if let Some(resource) = &args.resource {
        form.push(("resource", resource));
    }
    let authorization = match http
        .post_form(&endpoints.device_authorization, &form)
        .await?
    {
        Answer::Success(body) => DeviceAuthorization::parse(&body).with_context(|| {
            format!(
                "{}: not a device authorization response",
                endpoints.device_authorization
            )
        })?,
        Answer::Refused(error) => bail!(
            "the provider refused to start a device sign-in for client {}: {error}",
            args.client_id
        ),
    };
    eprintln!(
        "To sign in, open {} in a browser and enter the code {}",
        printable(&authorization.verification_uri),
        printable(&authorization.user_code)
    );
    if let Some(complete) = &authorization.verification_uri_complete {
        eprintln!("(or open {}, which fills in the code)", printable(complete));
    }
    eprintln!(
        "Waiting for the sign-in to be completed (the code expires in {} min)...",
        authorization.expires_in.as_secs().div_ceil(60)
    );
    let tokens = poll_for_tokens(&http, &endpoints, &args, &authorization).await?;
    let issued = IssuedTokens::parse(&tokens, now_secs())?;
    let credentials = Credentials {
        issuer: args.issuer.clone(),
        client_id: args.client_id.clone(),
        resource: args.resource.clone(),
        scope: args.scope.clone(),
        token_endpoint: endpoints.token,
        access_token: issued.access_token,
        refresh_token: issued.refresh_token,
        expires_at: issued.expires_at,
    };
    if credentials.refresh_token.is_none() {
        tracing::warn!(
            "the provider issued no refresh token (is offline_access among the scopes?): sign in again when the access token expires"
        );
    }
    {
        // A client command renewing the previous sign-in at this moment must not write it back over this one.
        let _renewing = store.lock().await?;
        store.save(&credentials)?;
    }
    eprintln!(
        "Signed in at {}. Client commands use this sign-in (kept in {}) until `chatvault logout`.",
        args.issuer,
        store.path().display()
    );
    Ok(())
}

/// Forgets the stored sign-in. The tokens are not revoked at the provider; they expire there.
pub async fn logout() -> anyhow::Result<()> {
    let store = CredentialStore::of_current_user()?;
    // Not while a client command renews the sign-in, which would write it back.
    let _renewing = match store.path().exists() {
        true => Some(store.lock().await?),
        false => None,
    };
    if store.remove()? {
        eprintln!("Signed out: removed {}", store.path().display());
    } else {
        eprintln!("Not signed in ({} does not exist)", store.path().display());
    }
    Ok(())
}

/// The access token of the stored sign-in, or `None` when nobody signed in. A token expiring within
/// [`RENEW_MARGIN_SECS`] is renewed with the refresh token first and the stored sign-in rewritten; when that
/// fails, the error tells the person to sign in again.
pub async fn signed_in_token() -> anyhow::Result<Option<Secret>> {
    let Ok(store) = CredentialStore::of_current_user() else {
        return Ok(None);
    };
    let Some(credentials) = store.load()? else {
        return Ok(None);
    };
    if !expiring(&credentials, now_secs()) {
        return Ok(Some(credentials.access_token));
    }
    let _renewing = store.lock().await?;
    // Another command may have renewed the sign-in (or signed out) while this one waited for the lock.
    let Some(credentials) = store.load()? else {
        return Ok(None);
    };
    let now = now_secs();
    if !expiring(&credentials, now) {
        return Ok(Some(credentials.access_token));
    }
    let Some(refresh_token) = credentials.refresh_token.clone() else {
        if credentials.expires_at.is_some_and(|at| at > now) {
            return Ok(Some(credentials.access_token));
        }
        bail!(
            "the sign-in at {} expired and holds no refresh token; run `chatvault login` again",
            credentials.issuer
        );
    };
    let renewed = renew(&Http::new()?, &credentials, &refresh_token)
        .await
        .with_context(|| {
            format!(
                "the sign-in at {} expired and could not be renewed; run `chatvault login` again",
                credentials.issuer
            )
        })?;
    store.save(&renewed)?;
    tracing::debug!(issuer = %renewed.issuer, "renewed the sign-in with its refresh token");
    Ok(Some(renewed.access_token))
}

fn expiring(credentials: &Credentials, now_secs: i64) -> bool {
    credentials
        .expires_at
        .is_some_and(|at| at - now_secs <= RENEW_MARGIN_SECS)
}

/// Redeems the refresh token (RFC 6749 section 6). A provider that rotates refresh tokens sends a new one;
/// otherwise the old one stays.
async fn renew(
    http: &Http,
    credentials: &Credentials,
    refresh_token: &Secret,
) -> anyhow::Result<Credentials> {
    require_secure(&credentials.token_endpoint, "the token endpoint")?;
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.expose()),
        ("client_id", credentials.client_id.as_str()),
    ];
    if let Some(resource) = &credentials.resource {
        form.push(("resource", resource));
    }
    let tokens = match http.post_form(&credentials.token_endpoint, &form).await? {
        Answer::Success(tokens) => tokens,
        Answer::Refused(error) => bail!("the provider refused the refresh token: {error}"),
    };
    let issued = IssuedTokens::parse(&tokens, now_secs())?;
    Ok(Credentials {
        access_token: issued.access_token,
        refresh_token: issued.refresh_token.or(credentials.refresh_token.clone()),
        expires_at: issued.expires_at,
        ..credentials.clone()
    })
}

/// The provider's endpoints the device grant uses.
struct Endpoints {
    device_authorization: String,
    token: String,
}

/// Reads the discovery document of `issuer` (OpenID Connect Discovery 1.0, which also serves OAuth clients:
/// RFC 8414 names the same fields).
async fn discover(http: &Http, issuer: &str) -> anyhow::Result<Endpoints> {
    require_secure(issuer, "the issuer")?;
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let document = http.get_json(&url).await?;
    let named = document.get("issuer").and_then(Value::as_str);
    if named != Some(issuer) {
        bail!(
            "{url} names issuer {}, not {issuer} (--issuer must be the provider's exact issuer identifier)",
            named.map_or("none".to_string(), printable)
        );
    }
    let lists_device_grant = document
        .get("grant_types_supported")
        .and_then(Value::as_array)
        .is_none_or(|grants| {
            grants
                .iter()
                .any(|grant| grant.as_str() == Some(DEVICE_CODE_GRANT))
        });
    let device_authorization = document
        .get("device_authorization_endpoint")
        .and_then(Value::as_str);
    let device_authorization = match (device_authorization, lists_device_grant) {
        (Some(endpoint), true) => endpoint.to_string(),
        (None, _) => bail!(
            "the provider {issuer} does not support the device authorization grant (RFC 8628): its discovery document names no device_authorization_endpoint"
        ),
        (Some(_), false) => bail!(
            "the provider {issuer} does not support the device authorization grant (RFC 8628): {DEVICE_CODE_GRANT} is not among its grant_types_supported"
        ),
    };
    let token = document
        .get("token_endpoint")
        .and_then(Value::as_str)
        .with_context(|| format!("{url} names no token_endpoint"))?
        .to_string();
    require_secure(&device_authorization, "the device authorization endpoint")?;
    require_secure(&token, "the token endpoint")?;
    Ok(Endpoints {
        device_authorization,
        token,
    })
}

/// A device authorization response (RFC 8628 section 3.2).
struct DeviceAuthorization {
    device_code: Secret,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Duration,
    interval: Duration,
}

impl DeviceAuthorization {
    fn parse(body: &Map<String, Value>) -> anyhow::Result<DeviceAuthorization> {
        let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_string);
        let required = |name: &str| text(name).with_context(|| format!("it has no {name}"));
        Ok(DeviceAuthorization {
            device_code: Secret::new(required("device_code")?),
            user_code: required("user_code")?,
            // `verification_url` is what providers that predate the RFC's final name (Google) send.
            verification_uri: text("verification_uri")
                .or_else(|| text("verification_url"))
                .context("it has no verification_uri")?,
            verification_uri_complete: text("verification_uri_complete"),
            expires_in: seconds(body.get("expires_in"))
                .map(Duration::from_secs)
                .context("it has no expires_in")?,
            // At least a second between polls, whatever the provider says.
            interval: seconds(body.get("interval")).map_or(DEFAULT_INTERVAL, |interval| {
                Duration::from_secs(interval.max(1))
            }),
        })
    }
}

/// Polls the token endpoint until the person completed, declined or let expire the sign-in.
async fn poll_for_tokens(
    http: &Http,
    endpoints: &Endpoints,
    args: &LoginArgs,
    authorization: &DeviceAuthorization,
) -> anyhow::Result<Map<String, Value>> {
    let deadline = tokio::time::Instant::now() + authorization.expires_in;
    let mut interval = authorization.interval;
    let mut form = vec![
        ("grant_type", DEVICE_CODE_GRANT),
        ("device_code", authorization.device_code.expose()),
        ("client_id", args.client_id.as_str()),
    ];
    if let Some(resource) = &args.resource {
        form.push(("resource", resource));
    }
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            bail!(EXPIRED);
        }
        match http.post_form(&endpoints.token, &form).await? {
            Answer::Success(tokens) => return Ok(tokens),
            Answer::Refused(error) => interval = next_interval(&error, interval)?,
        }
    }
}

const EXPIRED: &str =
    "the code expired before the sign-in was completed in the browser; run `chatvault login` again";

/// What a refused poll means (RFC 8628 section 3.5): poll again after the returned interval, or stop.
fn next_interval(error: &OAuthError, interval: Duration) -> anyhow::Result<Duration> {
    match error.error.as_str() {
        "authorization_pending" => Ok(interval),
        "slow_down" => Ok(interval + SLOW_DOWN_STEP),
        "expired_token" => bail!(EXPIRED),
        "access_denied" => {
            bail!("the sign-in was declined at the provider ({error}); nothing was stored")
        }
        _ => bail!("the provider refused the sign-in: {error}"),
    }
}

/// The tokens of a successful token response (RFC 6749 section 5.1).
struct IssuedTokens {
    access_token: Secret,
    refresh_token: Option<Secret>,
    expires_at: Option<i64>,
}

impl IssuedTokens {
    fn parse(body: &Map<String, Value>, now_secs: i64) -> anyhow::Result<IssuedTokens> {
        let secret = |name: &str| {
            body.get(name)
                .and_then(Value::as_str)
                .filter(|value| !value.is_empty())
                .map(Secret::new)
        };
        let access_token =
            secret("access_token").context("the token response has no access_token")?;
        // chatvault sends the token as `Authorization: Bearer`; a sender-constrained token (DPoP) would be
        // refused by the servers, so say so here.
        if let Some(kind) = body.get("token_type").and_then(Value::as_str)
            && !kind.eq_ignore_ascii_case("bearer")
        {
            bail!(
                "the provider issued a {} token; chatvault uses bearer tokens",
                printable(kind)
            );
        }
        Ok(IssuedTokens {
            access_token,
            refresh_token: secret("refresh_token"),
            expires_at: seconds(body.get("expires_in"))
                .map(|lifetime| now_secs.saturating_add(lifetime as i64)),
        })
    }
}

/// A whole number of seconds, as a JSON number or (as some providers send it) a string.
fn seconds(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// An OAuth error response (RFC 6749 section 5.2): `error` and its optional description.
#[derive(Debug)]
struct OAuthError {
    error: String,
    description: Option<String>,
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&printable(&self.error))?;
        if let Some(description) = &self.description {
            write!(f, ": {}", printable(description))?;
        }
        Ok(())
    }
}

/// What an OAuth endpoint answered.
enum Answer {
    Success(Map<String, Value>),
    Refused(OAuthError),
}

/// The HTTP client for the provider: no redirects (an OAuth endpoint that redirects a POST is misconfigured,
/// and following it could send a device code or refresh token elsewhere), bounded time and answer size.
struct Http(reqwest::Client);

impl Http {
    fn new() -> anyhow::Result<Http> {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("chatvault/", env!("CARGO_PKG_VERSION")))
            .build()
            .map(Http)
            .context("building the HTTP client")
    }

    async fn get_json(&self, url: &str) -> anyhow::Result<Map<String, Value>> {
        let response = self
            .0
            .get(url)
            .send()
            .await
            .with_context(|| format!("reading {url}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
        read_object(url, response)
            .await?
            .with_context(|| format!("{url} did not answer a JSON object"))
    }

    /// POSTs `form` (`application/x-www-form-urlencoded`). Secrets go in the body, never in the URL, so the
    /// URL in an error message shows none.
    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> anyhow::Result<Answer> {
        let response = self
            .0
            .post(url)
            .header(http::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            .with_context(|| format!("sending to {url}"))?;
        let status = response.status();
        let body = read_object(url, response).await?;
        if status.is_success() {
            return body
                .map(Answer::Success)
                .with_context(|| format!("{url} did not answer a JSON object"));
        }
        let error = body.as_ref().and_then(|body| {
            let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_string);
            Some(OAuthError {
                error: text("error")?,
                description: text("error_description"),
            })
        });
        error
            .map(Answer::Refused)
            .with_context(|| format!("{url} answered {status}"))
    }
}

/// The answer's body as a JSON object, `None` when it is not one; at most [`MAX_RESPONSE_BYTES`].
async fn read_object(
    url: &str,
    mut response: reqwest::Response,
) -> anyhow::Result<Option<Map<String, Value>>> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading the answer of {url}"))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            bail!("{url} answered more than {MAX_RESPONSE_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(match serde_json::from_slice(&body) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    })
}

/// Refuses plain http except on a loopback host: tokens and device codes must not cross a network in clear.
fn require_secure(url: &str, what: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("{what} {url} is not a URL"))?;
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => bail!("{what} {url} must be an https URL (plain http only on a loopback host)"),
    }
}

/// `text` without control characters, so a provider's answer cannot drive the terminal.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

fn now_secs() -> i64 {
    chatvault_core::time::now_micros() / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(error: &str) -> OAuthError {
        OAuthError {
            error: error.into(),
            description: Some("because".into()),
        }
    }

    #[test]
    fn polling_follows_pending_and_slow_down_and_stops_on_denial_and_expiry() {
        let interval = Duration::from_secs(5);
        assert_eq!(
            next_interval(&refused("authorization_pending"), interval).unwrap(),
            interval
        );
        let slower = next_interval(&refused("slow_down"), interval).unwrap();
        assert_eq!(slower, Duration::from_secs(10));
        assert_eq!(
            next_interval(&refused("slow_down"), slower).unwrap(),
            Duration::from_secs(15),
            "each slow_down adds 5 s"
        );
        for (error, wanted) in [
            ("access_denied", "declined at the provider"),
            ("expired_token", "the code expired"),
            (
                "invalid_client",
                "refused the sign-in: invalid_client: because",
            ),
        ] {
            let message = next_interval(&refused(error), interval)
                .unwrap_err()
                .to_string();
            assert!(message.contains(wanted), "{error}: {message}");
        }
    }

    #[test]
    fn device_authorization_defaults_to_a_five_second_interval() {
        let body = |value: Value| value.as_object().unwrap().clone();
        let parsed = DeviceAuthorization::parse(&body(serde_json::json!({
            "device_code": "d", "user_code": "ABCD-EFGH",
            "verification_uri": "https://idp.example/device", "expires_in": 600
        })))
        .unwrap();
        assert_eq!(parsed.interval, DEFAULT_INTERVAL);
        assert_eq!(parsed.expires_in, Duration::from_secs(600));
        let parsed = DeviceAuthorization::parse(&body(serde_json::json!({
            "device_code": "d", "user_code": "u", "verification_url": "https://idp.example/device",
            "expires_in": "1800", "interval": 0
        })))
        .unwrap();
        assert_eq!(parsed.interval, Duration::from_secs(1));
        assert_eq!(parsed.verification_uri, "https://idp.example/device");
        assert_eq!(parsed.expires_in, Duration::from_secs(1800));
    }

    #[test]
    fn token_responses_give_bearer_tokens_with_their_expiry() {
        let body = |value: Value| value.as_object().unwrap().clone();
        let issued = IssuedTokens::parse(
            &body(serde_json::json!({"access_token": "a", "token_type": "Bearer", "expires_in": 3600})),
            1_000,
        )
        .unwrap();
        assert_eq!(issued.access_token.expose(), "a");
        assert_eq!(issued.expires_at, Some(4_600));
        assert!(issued.refresh_token.is_none());
        let dpop = IssuedTokens::parse(
            &body(serde_json::json!({"access_token": "a", "token_type": "DPoP"})),
            1_000,
        );
        assert!(dpop.is_err());
    }

    #[test]
    fn only_https_or_loopback_http_is_accepted() {
        for url in [
            "https://idp.example",
            "http://127.0.0.1:8080",
            "http://localhost/realms/x",
            "http://[::1]:9000",
        ] {
            assert!(require_secure(url, "the issuer").is_ok(), "{url}");
        }
        for url in ["http://idp.example", "ftp://127.0.0.1", "not a url"] {
            assert!(require_secure(url, "the issuer").is_err(), "{url}");
        }
    }

    #[test]
    fn a_token_is_renewed_within_the_margin_only() {
        let credentials = |expires_at| Credentials {
            issuer: "https://idp.example".into(),
            client_id: "cli".into(),
            resource: None,
            scope: "openid".into(),
            token_endpoint: "https://idp.example/token".into(),
            access_token: Secret::new("a"),
            refresh_token: None,
            expires_at,
        };
        assert!(!expiring(&credentials(None), 1_000));
        assert!(!expiring(
            &credentials(Some(1_000 + RENEW_MARGIN_SECS + 1)),
            1_000
        ));
        assert!(expiring(
            &credentials(Some(1_000 + RENEW_MARGIN_SECS)),
            1_000
        ));
        assert!(expiring(&credentials(Some(900)), 1_000));
    }
}
