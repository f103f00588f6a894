//! OpenID Connect issuers: JWT access tokens (RFC 9068) from the company's identity provider, mapped to
//! chatvault roles per tenant by configuration (`[[oidc]]`).
//!
//! Keys come from the issuer's discovery document (`<issuer>/.well-known/openid-configuration`, whose `issuer`
//! must be the configured one) and its `jwks_uri`. They are cached; a token signed with a `kid` the cache does
//! not hold makes the issuer's keys be read again, at most once per `jwks_min_refresh_interval`, so a rotated
//! signing key is picked up without a restart while a flood of made-up `kid`s cannot make chatvault hammer
//! the provider. The keys are also re-read every `jwks_refresh_interval`, so a removed key stops working.
//!
//! A token is accepted only when: its `alg` is one of the issuer's pinned `algorithms`; its `typ` is the
//! configured `token_type` (`at+jwt` by default, which keeps ID tokens out); its signature verifies with the
//! issuer's key of its `kid`; `iss` is the issuer exactly; `aud` names the configured audience; `exp` has not
//! passed and `nbf`/`iat` are not in the future (both within `clock_skew`); and it has a `sub`. The roles are
//! then what the `roles` rules grant for the claims the token carries; a token matching no rule authenticates
//! but is allowed nothing (deny by default).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::jwt::{Algorithm, JwkSet, UnverifiedToken, VerifyError, refused};
use super::{Credential, Principal, Role};
use crate::config::OidcIssuerConfig;
use crate::error::{Error, ErrorCode, Result};

/// Largest discovery document or key set read from a provider.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// How long one request to the provider may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One configured issuer with its cached keys.
pub struct OidcIssuer {
    config: OidcIssuerConfig,
    http: reqwest::Client,
    keys: RwLock<JwkSet>,
    /// When the keys were last asked for (successfully or not), for the refresh rate limit.
    last_fetch: Mutex<Option<Instant>>,
    /// Serializes refreshes: concurrent requests with an unknown `kid` wait for one fetch.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for OidcIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcIssuer")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

impl OidcIssuer {
    /// An issuer as configured; its keys are fetched on first use.
    pub fn new(config: OidcIssuerConfig) -> Result<OidcIssuer> {
        crate::storage::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| {
                Error::caused_by(
                    ErrorCode::Internal,
                    format!("oidc issuer {}: building the HTTP client", config.issuer),
                    error,
                )
            })?;
        Ok(OidcIssuer {
            config,
            http,
            keys: RwLock::new(JwkSet::default()),
            last_fetch: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Authenticates a token already parsed, whose `iss` is this issuer.
    pub async fn authenticate(
        &self,
        token: &UnverifiedToken<'_>,
        now_secs: i64,
    ) -> Result<Principal> {
        if !self.config.token_type.is_empty() {
            let typ = token
                .typ
                .as_deref()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let wanted = self.config.token_type.to_ascii_lowercase();
            if typ != wanted && typ != format!("application/{wanted}") {
                return Err(refused(format!(
                    "the token's typ {:?} is not {:?} (is it an ID token?)",
                    token.typ.as_deref().unwrap_or(""),
                    self.config.token_type
                )));
            }
        }
        self.ensure_keys().await?;
        let verify_with_cached_keys = || -> Result<std::result::Result<(), VerifyError>> {
            let keys = self
                .keys
                .read()
                .map_err(|_| Error::internal("oidc key cache poisoned"))?;
            Ok(token.verify(&self.config.algorithms, &keys))
        };
        let verified = match verify_with_cached_keys()? {
            // The issuer may have rotated its keys: read them again (rate-limited) and retry once.
            Err(VerifyError::UnknownKey(_)) => {
                self.refresh_if_due().await;
                verify_with_cached_keys()?
            }
            other => other,
        };
        verified.map_err(|error| match error {
            VerifyError::UnknownKey(kid) => refused(format!(
                "the token's signing key {kid:?} is not among the keys of issuer {}",
                self.config.issuer
            )),
            VerifyError::Refused(error) => error,
        })?;
        if token.claim_str("iss") != Some(self.config.issuer.as_str()) {
            return Err(refused("the token's iss is not the issuer"));
        }
        if !token.has_audience(&self.config.audience) {
            return Err(refused(format!(
                "the token is not for audience {:?} (aud)",
                self.config.audience
            )));
        }
        token.check_times(now_secs, self.config.clock_skew.as_secs() as i64)?;
        let subject = token
            .claim_str("sub")
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| refused("the token has no sub claim"))?;
        Ok(Principal {
            name: subject.to_string(),
            credential: Credential::Oidc {
                issuer: self.config.issuer.clone(),
                client_id: token.claim_str("client_id").map(str::to_string),
            },
            grants: self.grants(&token.claims),
        })
    }

    /// The roles per tenant the issuer's `roles` rules grant for `claims`.
    fn grants(&self, claims: &serde_json::Map<String, Value>) -> HashMap<String, BTreeSet<Role>> {
        let mut grants: HashMap<String, BTreeSet<Role>> = HashMap::new();
        for rule in &self.config.roles {
            if claim_values(claims, &rule.claim).any(|value| value == rule.value) {
                grants
                    .entry(rule.tenant.clone())
                    .or_default()
                    .extend(rule.roles.iter().copied());
            }
        }
        grants
    }

    /// Fetches the keys when none are cached (waiting for them, since no token can verify without them, and
    /// failing with the fetch's error), or when they are older than `jwks_refresh_interval`.
    async fn ensure_keys(&self) -> Result<()> {
        let empty = self.keys.read().map(|keys| keys.is_empty()).unwrap_or(true);
        if empty {
            return self.refresh_if_due().await.map_or(Ok(()), Err);
        }
        let stale = self
            .last_fetch
            .lock()
            .map_err(|_| Error::internal("oidc clock poisoned"))?
            .is_none_or(|at| at.elapsed() >= self.config.jwks_refresh_interval);
        if stale {
            self.refresh_if_due().await;
        }
        Ok(())
    }

    /// Reads the issuer's keys again unless that was tried within `jwks_min_refresh_interval`. Returns the
    /// error of a failed fetch (the previous keys are kept).
    async fn refresh_if_due(&self) -> Option<Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        {
            let mut last = self.last_fetch.lock().ok()?;
            if last.is_some_and(|at| at.elapsed() < self.config.jwks_min_refresh_interval) {
                return None;
            }
            *last = Some(Instant::now());
        }
        match self.fetch_keys().await {
            Ok(keys) => {
                tracing::info!(issuer = %self.config.issuer, keys = keys.len(), "read the OIDC issuer's signing keys");
                if let Ok(mut cached) = self.keys.write() {
                    *cached = keys;
                }
                None
            }
            Err(error) => {
                tracing::warn!(issuer = %self.config.issuer, %error, "reading the OIDC issuer's signing keys failed; keeping the previous ones");
                Some(error)
            }
        }
    }

    async fn fetch_keys(&self) -> Result<JwkSet> {
        let jwks_uri = match &self.config.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let document: Value = serde_json::from_slice(&self.get(&discovery).await?)
                    .map_err(|error| {
                        Error::unavailable(format!(
                            "{discovery}: not a discovery document: {error}"
                        ))
                    })?;
                if document["issuer"].as_str() != Some(self.config.issuer.as_str()) {
                    return Err(Error::unavailable(format!(
                        "{discovery}: names issuer {}, not {} (oidc.issuer must be the provider's exact issuer)",
                        document["issuer"], self.config.issuer
                    )));
                }
                document["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| Error::unavailable(format!("{discovery}: has no jwks_uri")))?
                    .to_string()
            }
        };
        let body = self.get(&jwks_uri).await?;
        JwkSet::parse(&body)
            .map_err(|error| Error::unavailable(format!("{jwks_uri}: {}", error.message())))
    }

    /// GETs `url` (https, or http when `allow_http`), reading at most [`MAX_DOCUMENT_BYTES`].
    async fn get(&self, url: &str) -> Result<Vec<u8>> {
        let allowed =
            url.starts_with("https://") || (self.config.allow_http && url.starts_with("http://"));
        if !allowed {
            return Err(Error::unavailable(format!(
                "{url}: the provider must be reached over https (oidc.allow_http is for local test providers)"
            )));
        }
        let unreachable = |error: reqwest::Error| {
            Error::caused_by(ErrorCode::Unavailable, format!("{url}: {error}"), error)
        };
        let mut response = self.http.get(url).send().await.map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(Error::unavailable(format!(
                "{url}: answered {}",
                response.status()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(Error::unavailable(format!(
                    "{url}: larger than {MAX_DOCUMENT_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The string values at a dotted claim path (`groups`, `realm_access.roles`): a string, or the strings of
/// an array.
fn claim_values<'a>(
    claims: &'a serde_json::Map<String, Value>,
    path: &str,
) -> impl Iterator<Item = &'a str> {
    let mut segments = path.split('.');
    let first = segments.next().and_then(|name| claims.get(name));
    let value = segments.fold(first, |value, name| value.and_then(|value| value.get(name)));
    let values: Vec<&str> = match value {
        Some(Value::String(text)) => vec![text.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    values.into_iter()
}

/// Default algorithms of an issuer: the asymmetric ones providers sign access tokens with.
pub fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OidcRoleRule;

    #[test]
    fn rules_grant_roles_for_matching_claims_only() {
        let config = OidcIssuerConfig {
            issuer: "https://idp.example".into(),
            audience: "chatvault".into(),
            roles: vec![
                OidcRoleRule {
                    claim: "groups".into(),
                    value: "chatvault-acme-legal".into(),
                    tenant: "acme".into(),
                    roles: vec![Role::Restore, Role::Search],
                },
                OidcRoleRule {
                    claim: "realm_access.roles".into(),
                    value: "auditor".into(),
                    tenant: "globex".into(),
                    roles: vec![Role::Audit],
                },
            ],
            ..OidcIssuerConfig::default()
        };
        let issuer = OidcIssuer::new(config).expect("issuer");
        let claims = |value: Value| value.as_object().expect("object").clone();
        let grants = issuer.grants(&claims(serde_json::json!({
            "groups": ["other", "chatvault-acme-legal"],
            "realm_access": {"roles": ["auditor"]}
        })));
        assert_eq!(
            grants["acme"],
            BTreeSet::from([Role::Restore, Role::Search])
        );
        assert_eq!(grants["globex"], BTreeSet::from([Role::Audit]));
        let none = issuer.grants(&claims(
            serde_json::json!({"groups": "chatvault-acme-legalx"}),
        ));
        assert!(none.is_empty(), "deny by default: {none:?}");
        let single = issuer.grants(&claims(
            serde_json::json!({"groups": "chatvault-acme-legal"}),
        ));
        assert!(single.contains_key("acme"), "a single string claim counts");
    }
}
