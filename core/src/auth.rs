//! Per-tenant bearer tokens and roles.
//!
//! Tokens are never kept in memory in clear: each is reduced to its SHA-256 when the configuration is loaded
//! (the file may hold `token` or, better, `token_sha256`), and a presented token is hashed and looked up by
//! digest, so timing reveals nothing about stored tokens. This is the seam where OIDC JWTs plug in later: the
//! services ask an [`Authenticator`] for a [`Principal`] and check [`Principal::require`].

use std::collections::{BTreeSet, HashMap};

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};

/// What a principal may do within a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Send events (gRPC ingest).
    Ingest,
    /// Read archived conversations.
    Restore,
    /// Read the audit trail.
    Audit,
    /// Everything, including key export for standard readers.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Restore => "restore",
            Role::Audit => "audit",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller: its display name (never the token) and its roles per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
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

/// Resolves bearer tokens to principals.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_token_digest: HashMap<[u8; 32], Principal>,
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
                grants: HashMap::new(),
            });
        principal
            .grants
            .entry(tenant.to_string())
            .or_default()
            .extend(roles.iter().copied());
    }

    pub fn is_empty(&self) -> bool {
        self.by_token_digest.is_empty()
    }

    /// Resolves the value of an `authorization` header (`Bearer <token>`). UNAUTHENTICATED when it is
    /// missing, malformed or unknown; the message never echoes the token.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal> {
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
        self.by_token_digest
            .get(&token_digest(token))
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::Unauthenticated, "unknown bearer token"))
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
        let principal = auth
            .authenticate(Some("Bearer s3cret"))
            .expect("known token");
        principal.require("acme", Role::Ingest).expect("granted");
        principal.require("globex", Role::Restore).expect("granted");
        let denied = principal
            .require("acme", Role::Restore)
            .expect_err("not granted");
        assert_eq!(denied.code(), ErrorCode::PermissionDenied);
        for header in [None, Some("s3cret"), Some("Bearer "), Some("Bearer other")] {
            let error = auth.authenticate(header).expect_err("rejected");
            assert_eq!(error.code(), ErrorCode::Unauthenticated);
            assert!(!error.message().contains("s3cret"));
        }
    }
}
