//! Who is calling, and what they may do: bearer credentials resolved to a [`Principal`] with roles per
//! tenant.
//!
//! Two kinds of credential, side by side: static tokens for machines (`[[tenants.tokens]]`), and JWT access
//! tokens from the company's OpenID Connect provider for people and services signed in there (`[[oidc]]`,
//! see [`oidc`]). Static tokens are never kept in memory in clear: each is reduced to its SHA-256 when the
//! configuration is loaded (the file may hold `token` or, better, `token_sha256`), and a presented token is
//! hashed and looked up by digest, so timing reveals nothing about stored tokens. Services ask an
//! [`Authenticator`] for a [`Principal`] and check [`Principal::require`] for the role the call needs.

pub mod jwt;
pub mod oidc;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};

/// What a principal may do within a tenant. Least privilege: each role allows one kind of call, and only
/// `admin` implies the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Send events (gRPC ingest).
    Ingest,
    /// Read archived conversations (restore, list).
    Restore,
    /// Search the archive.
    Search,
    /// Export conversations for legal review.
    Export,
    /// Receive data keys for reading the archive with standard tools (`chatvault keys export`).
    #[serde(alias = "key-export")]
    KeyExport,
    /// Read the audit trail.
    Audit,
    /// Place and release legal holds.
    Hold,
    /// Set retention policies.
    Policy,
    /// Everything.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Restore => "restore",
            Role::Search => "search",
            Role::Export => "export",
            Role::KeyExport => "key_export",
            Role::Audit => "audit",
            Role::Hold => "hold",
            Role::Policy => "policy",
            Role::Admin => "admin",
        }
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A static bearer token from the configuration; the principal's name is the token's name.
    StaticToken,
    /// A JWT access token of an OIDC issuer; the principal's name is the token's `sub`.
    Oidc {
        issuer: String,
        client_id: Option<String>,
    },
}

/// The authenticated caller: its name (a token's name or a JWT's subject, never a secret), how it
/// authenticated, and its roles per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub credential: Credential,
    pub grants: HashMap<String, BTreeSet<Role>>,
}

impl Principal {
    /// Succeeds when the principal holds `role` (or `admin`) for `tenant`; PERMISSION_DENIED otherwise.
    pub fn require(&self, tenant: &str, role: Role) -> Result<()> {
        let allowed = self
            .grants
            .get(tenant)
            .is_some_and(|roles| roles.contains(&role) || roles.contains(&Role::Admin));
        if allowed {
            Ok(())
        } else {
            Err(Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "{} does not hold the {} role for tenant {tenant}",
                    self.name,
                    role.name()
                ),
            ))
        }
    }
}

/// Resolves bearer tokens to principals: static tokens by digest, JWTs by their configured issuer.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_token_digest: HashMap<[u8; 32], Principal>,
    issuers: Vec<Arc<oidc::OidcIssuer>>,
}

impl Authenticator {
    /// Registers a token (given by its SHA-256) granting `roles` for `tenant` under the name `name`. A token
    /// registered for several tenants accumulates the grants.
    pub fn add_token_digest(
        &mut self,
        token_sha256: [u8; 32],
        name: &str,
        tenant: &str,
        roles: &[Role],
    ) {
        let principal = self
            .by_token_digest
            .entry(token_sha256)
            .or_insert_with(|| Principal {
                name: name.to_string(),
                credential: Credential::StaticToken,
                grants: HashMap::new(),
            });
        principal
            .grants
            .entry(tenant.to_string())
            .or_default()
            .extend(roles.iter().copied());
    }

    /// Accepts JWT access tokens of `issuer` as well.
    pub fn add_issuer(&mut self, issuer: oidc::OidcIssuer) {
        self.issuers.push(Arc::new(issuer));
    }

    pub fn issuers(&self) -> &[Arc<oidc::OidcIssuer>] {
        &self.issuers
    }

    pub fn is_empty(&self) -> bool {
        self.by_token_digest.is_empty() && self.issuers.is_empty()
    }

    /// Resolves the value of an `authorization` header (`Bearer <token>`). UNAUTHENTICATED when it is
    /// missing, malformed, unknown or (a JWT) not valid, with a message that says why and never echoes the
    /// token. Only a JWT of a configured issuer can wait here: for that issuer's keys, when its signing key
    /// is not cached yet.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal> {
        let header = authorization.ok_or_else(|| {
            Error::new(
                ErrorCode::Unauthenticated,
                "missing authorization: send `authorization: Bearer <token>`",
            )
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::Unauthenticated,
                    "malformed authorization: expected `Bearer <token>`",
                )
            })?;
        if let Some(principal) = self.by_token_digest.get(&token_digest(token)) {
            return Ok(principal.clone());
        }
        if self.issuers.is_empty() || token.split('.').count() != 3 {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "unknown bearer token",
            ));
        }
        let parsed = jwt::UnverifiedToken::parse(token)?;
        // Read before anything is verified, only to choose the configured issuer that verifies the token.
        let named = parsed.claim_str("iss").unwrap_or_default();
        let issuer = self
            .issuers
            .iter()
            .find(|issuer| issuer.issuer() == named)
            .ok_or_else(|| {
                jwt::refused(format!(
                    "the token's issuer (iss) {:?} is not a configured oidc issuer",
                    named.chars().take(200).collect::<String>()
                ))
            })?;
        issuer
            .authenticate(&parsed, crate::time::now_micros() / 1_000_000)
            .await
            .map_err(|error| error.context(format!("oidc issuer {}", issuer.issuer())))
    }
}

/// Compares two secrets in time independent of their content: both are reduced to SHA-256 digests and the
/// digests compared with a full-length XOR fold (no early exit).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let left = digest::digest(&digest::SHA256, a);
    let right = digest::digest(&digest::SHA256, b);
    left.as_ref()
        .iter()
        .zip(right.as_ref())
        .fold(0u8, |difference, (x, y)| difference | (x ^ y))
        == 0
}

/// SHA-256 of a token, the form in which tokens are stored and compared.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn tokens_resolve_to_grants() {
        let mut auth = Authenticator::default();
        auth.add_token_digest(
            token_digest("s3cret"),
            "acme-ingest",
            "acme",
            &[Role::Ingest],
        );
        auth.add_token_digest(
            token_digest("s3cret"),
            "acme-ingest",
            "globex",
            &[Role::Restore],
        );
        let principal = block_on(auth.authenticate(Some("Bearer s3cret"))).expect("known token");
        principal.require("acme", Role::Ingest).expect("granted");
        principal.require("globex", Role::Restore).expect("granted");
        let denied = principal
            .require("acme", Role::Restore)
            .expect_err("not granted");
        assert_eq!(denied.code(), ErrorCode::PermissionDenied);
        for header in [None, Some("s3cret"), Some("Bearer "), Some("Bearer other")] {
            let error = block_on(auth.authenticate(header)).expect_err("rejected");
            assert_eq!(error.code(), ErrorCode::Unauthenticated);
            assert!(!error.message().contains("s3cret"));
        }
    }
}
