//! JSON Web Tokens signed with public keys (RFC 7515 compact form, RFC 7517 key sets, RFC 7518 algorithms):
//! parsing, key selection and signature verification, on `ring`. Shared by OIDC access tokens
//! ([`super::oidc`]) and Microsoft Graph validation tokens (the gateway's Teams integration).
//!
//! The verifier decides the algorithm, never the token: a token is verified only under an algorithm its
//! verifier pinned, with a key whose type fits that algorithm, so `alg: none` and an HMAC keyed with a public
//! key (the classic algorithm-confusion attacks) cannot pass. `jku`, `x5u` and embedded keys in the header are
//! ignored: keys come only from the configured key set.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};

/// The signature algorithms chatvault verifies: public-key ones only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    /// The JOSE name (`RS256`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    fn from_name(name: &str) -> Option<Algorithm> {
        [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ]
        .into_iter()
        .find(|algorithm| algorithm.name() == name)
    }
}

/// A public key of a key set, by type. Private members of a JWK, if any, are never read.
#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (`0x04 || x || y`) on P-256 or P-384.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

/// One key of a key set: its material and the constraints its JWK states (`alg`, `use`).
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    key: PublicKey,
    algorithm: Option<String>,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.key {
            PublicKey::Rsa { .. } => "RSA",
            PublicKey::Ec { .. } => "EC",
            PublicKey::Ed25519 { .. } => "OKP",
        };
        f.debug_struct("Jwk")
            .field("kty", &kind)
            .field("alg", &self.algorithm)
            .finish()
    }
}

/// The signing keys of a JSON Web Key Set, by `kid`. Keys without a `kid`, encryption keys (`use: enc`) and
/// key types chatvault does not verify with are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwkSet {
    keys: HashMap<String, Jwk>,
}

impl JwkSet {
    /// Parses a key set document (`{"keys": [...]}`).
    pub fn parse(bytes: &[u8]) -> Result<JwkSet> {
        let document: Value = serde_json::from_slice(bytes)
            .map_err(|error| Error::invalid_argument(format!("not a JSON Web Key Set: {error}")))?;
        let keys = document["keys"]
            .as_array()
            .ok_or_else(|| Error::invalid_argument("a JSON Web Key Set needs a keys array"))?;
        let mut set = JwkSet::default();
        for key in keys {
            let Some(kid) = key["kid"].as_str() else {
                continue;
            };
            if key["use"].as_str().is_some_and(|usage| usage != "sig") {
                continue;
            }
            let member = |name: &str| key[name].as_str().and_then(decode_base64url);
            let material = match (key["kty"].as_str(), key["crv"].as_str()) {
                (Some("RSA"), _) => member("n")
                    .zip(member("e"))
                    .map(|(n, e)| PublicKey::Rsa { n, e }),
                (Some("EC"), Some(curve @ ("P-256" | "P-384"))) => {
                    let (curve, size) = if curve == "P-256" {
                        (Curve::P256, 32)
                    } else {
                        (Curve::P384, 48)
                    };
                    member("x")
                        .zip(member("y"))
                        .filter(|(x, y)| x.len() == size && y.len() == size)
                        .map(|(x, y)| {
                            let mut point = Vec::with_capacity(1 + 2 * size);
                            point.push(0x04);
                            point.extend_from_slice(&x);
                            point.extend_from_slice(&y);
                            PublicKey::Ec { curve, point }
                        })
                }
                (Some("OKP"), Some("Ed25519")) => member("x")
                    .filter(|x| x.len() == 32)
                    .map(|x| PublicKey::Ed25519 { x }),
                _ => None,
            };
            if let Some(material) = material {
                set.keys.insert(
                    kid.to_string(),
                    Jwk {
                        key: material,
                        algorithm: key["alg"].as_str().map(str::to_string),
                    },
                );
            }
        }
        Ok(set)
    }

    pub fn get(&self, kid: &str) -> Option<&Jwk> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A compact JWS split into its parts, its header and claims decoded but nothing verified yet.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    signing_input: &'a str,
    signature: Vec<u8>,
    /// The header's `alg`, as written.
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
    pub claims: serde_json::Map<String, Value>,
}

/// An UNAUTHENTICATED error whose message says what is wrong with a token (never the token itself).
pub fn refused(why: impl Into<String>) -> Error {
    Error::new(ErrorCode::Unauthenticated, why)
}

impl<'a> UnverifiedToken<'a> {
    /// Splits and decodes `token`. Fails when it is not three base64url parts of which the first two are
    /// JSON objects.
    pub fn parse(token: &'a str) -> Result<UnverifiedToken<'a>> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims_part), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refused(
                "the token is not a JWT (three dot-separated parts)",
            ));
        };
        let object = |part: &str, what: &str| -> Result<serde_json::Map<String, Value>> {
            decode_base64url(part)
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .ok_or_else(|| refused(format!("the token's {what} is not base64url JSON")))
        };
        let header_json = object(header, "header")?;
        let claims = object(claims_part, "claims")?;
        let signature = decode_base64url(signature)
            .ok_or_else(|| refused("the token's signature is not base64url"))?;
        let text = |name: &str| {
            header_json
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Ok(UnverifiedToken {
            signing_input: &token[..header.len() + 1 + claims_part.len()],
            signature,
            alg: text("alg").unwrap_or_default(),
            kid: text("kid"),
            typ: text("typ"),
            claims,
        })
    }

    /// Verifies the signature under one of `allowed` algorithms with the key of the token's `kid` in `keys`.
    /// The error distinguishes an unknown `kid` ([`VerifyError::UnknownKey`], which may mean the issuer
    /// rotated its keys) from every other failure.
    pub fn verify(
        &self,
        allowed: &[Algorithm],
        keys: &JwkSet,
    ) -> std::result::Result<(), VerifyError> {
        let algorithm = Algorithm::from_name(&self.alg)
            .filter(|algorithm| allowed.contains(algorithm))
            .ok_or_else(|| {
                VerifyError::Refused(refused(format!(
                    "the token's algorithm {:?} is not accepted (accepted: {})",
                    self.alg,
                    allowed
                        .iter()
                        .map(|a| a.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            })?;
        let kid = self
            .kid
            .as_deref()
            .ok_or_else(|| VerifyError::Refused(refused("the token's header has no kid")))?;
        let jwk = keys
            .get(kid)
            .ok_or_else(|| VerifyError::UnknownKey(kid.to_string()))?;
        if jwk
            .algorithm
            .as_deref()
            .is_some_and(|stated| stated != algorithm.name())
        {
            return Err(VerifyError::Refused(refused(format!(
                "key {kid:?} is for another algorithm than {}",
                algorithm.name()
            ))));
        }
        let message = self.signing_input.as_bytes();
        let verified = match (&jwk.key, algorithm) {
            (PublicKey::Rsa { n, e }, rsa) => {
                let parameters: &signature::RsaParameters = match rsa {
                    Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(wrong_key(kid, algorithm)),
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(parameters, message, &self.signature)
                    .is_ok()
            }
            (
                PublicKey::Ec {
                    curve: Curve::P256,
                    point,
                },
                Algorithm::ES256,
            ) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, &self.signature)
                .is_ok(),
            (
                PublicKey::Ec {
                    curve: Curve::P384,
                    point,
                },
                Algorithm::ES384,
            ) => UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, &self.signature)
                .is_ok(),
            (PublicKey::Ed25519 { x }, Algorithm::EdDSA) => {
                UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(message, &self.signature)
                    .is_ok()
            }
            _ => return Err(wrong_key(kid, algorithm)),
        };
        if verified {
            Ok(())
        } else {
            Err(VerifyError::Refused(refused(
                "the token's signature does not verify",
            )))
        }
    }

    /// A string claim.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim (seconds since the epoch; fractions dropped).
    pub fn claim_seconds(&self, name: &str) -> Option<i64> {
        self.claims
            .get(name)
            .and_then(Value::as_f64)
            .map(|value| value as i64)
    }

    /// Whether `aud` (a string or an array of strings) names `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => aud == audience,
            Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
            _ => false,
        }
    }

    /// Checks `exp` (required), `nbf` and `iat` (when present) against `now_secs`, allowing `skew_secs`.
    pub fn check_times(&self, now_secs: i64, skew_secs: i64) -> Result<()> {
        let exp = self
            .claim_seconds("exp")
            .ok_or_else(|| refused("the token has no exp claim"))?;
        if exp.saturating_add(skew_secs) < now_secs {
            return Err(refused("the token has expired (exp)"));
        }
        if self
            .claim_seconds("nbf")
            .is_some_and(|nbf| nbf.saturating_sub(skew_secs) > now_secs)
        {
            return Err(refused("the token is not valid yet (nbf)"));
        }
        if self
            .claim_seconds("iat")
            .is_some_and(|iat| iat.saturating_sub(skew_secs) > now_secs)
        {
            return Err(refused("the token was issued in the future (iat)"));
        }
        Ok(())
    }
}

fn wrong_key(kid: &str, algorithm: Algorithm) -> VerifyError {
    VerifyError::Refused(refused(format!(
        "key {kid:?} cannot verify {}",
        algorithm.name()
    )))
}

/// Why a signature was not accepted.
#[derive(Debug)]
pub enum VerifyError {
    /// The key set has no key with this `kid`: re-reading the issuer's keys may help.
    UnknownKey(String),
    /// Anything else; re-reading keys cannot help.
    Refused(Error),
}

impl VerifyError {
    pub fn into_error(self) -> Error {
        match self {
            VerifyError::UnknownKey(kid) => refused(format!(
                "the token's signing key {kid:?} is not among the issuer's keys"
            )),
            VerifyError::Refused(error) => error,
        }
    }
}

pub fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn token(header: Value, claims: Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    fn ec_key() -> (EcdsaKeyPair, JwkSet) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .expect("key");
        let public = pair.public_key().as_ref();
        let set = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "x": b64(&public[1..33]), "y": b64(&public[33..])},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": b64(&public[1..33]), "y": b64(&public[33..])},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}
        ]});
        (
            pair,
            JwkSet::parse(set.to_string().as_bytes()).expect("set"),
        )
    }

    #[test]
    fn only_pinned_algorithms_with_fitting_keys_verify() {
        let (pair, keys) = ec_key();
        assert_eq!(keys.len(), 1, "encryption and symmetric keys are left out");
        let rng = SystemRandom::new();
        let sign = |input: &[u8]| pair.sign(&rng, input).expect("sign").as_ref().to_vec();
        let claims = serde_json::json!({"sub": "alice"});
        let good = token(
            serde_json::json!({"alg": "ES256", "kid": "ec1"}),
            claims.clone(),
            sign,
        );
        let parsed = UnverifiedToken::parse(&good).expect("parses");
        parsed.verify(&[Algorithm::ES256], &keys).expect("verifies");
        assert_eq!(parsed.claim_str("sub"), Some("alice"));

        // Not pinned: refused even though the signature is good.
        assert!(matches!(
            parsed.verify(&[Algorithm::RS256], &keys),
            Err(VerifyError::Refused(_))
        ));
        // alg none with an empty signature.
        let none = token(
            serde_json::json!({"alg": "none", "kid": "ec1"}),
            claims.clone(),
            |_| vec![],
        );
        let error = UnverifiedToken::parse(&none)
            .expect("parses")
            .verify(&[Algorithm::ES256], &keys)
            .expect_err("none");
        assert!(
            error
                .into_error()
                .message()
                .contains("\"none\" is not accepted")
        );
        // HS256 keyed with the public key's bytes.
        let public = pair.public_key().as_ref().to_vec();
        let hs = token(
            serde_json::json!({"alg": "HS256", "kid": "ec1"}),
            claims.clone(),
            |input| {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
                ring::hmac::sign(&key, input).as_ref().to_vec()
            },
        );
        assert!(
            UnverifiedToken::parse(&hs)
                .expect("parses")
                .verify(&[Algorithm::ES256], &keys)
                .is_err()
        );
        // Unknown kid is told apart.
        let unknown = token(
            serde_json::json!({"alg": "ES256", "kid": "other"}),
            claims.clone(),
            sign,
        );
        assert!(matches!(
            UnverifiedToken::parse(&unknown).expect("parses").verify(&[Algorithm::ES256], &keys),
            Err(VerifyError::UnknownKey(kid)) if kid == "other"
        ));
        // A changed claim breaks the signature.
        let (head, rest) = good.split_once('.').expect("dot");
        let (_, signature) = rest.split_once('.').expect("dot");
        let tampered = format!("{head}.{}.{signature}", b64(br#"{"sub":"mallory"}"#));
        assert!(
            UnverifiedToken::parse(&tampered)
                .expect("parses")
                .verify(&[Algorithm::ES256], &keys)
                .is_err()
        );
    }

    #[test]
    fn ed25519_keys_verify_eddsa() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let set = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
            "x": b64(pair.public_key().as_ref())}]});
        let keys = JwkSet::parse(set.to_string().as_bytes()).expect("set");
        let signed = token(
            serde_json::json!({"alg": "EdDSA", "kid": "ed"}),
            serde_json::json!({}),
            |input| pair.sign(input).as_ref().to_vec(),
        );
        UnverifiedToken::parse(&signed)
            .expect("parses")
            .verify(&[Algorithm::EdDSA, Algorithm::ES256], &keys)
            .expect("verifies");
    }

    #[test]
    fn times_are_checked_with_skew() {
        let at = |claims: Value| {
            let text = token(serde_json::json!({"alg": "ES256"}), claims, |_| vec![1]);
            let parsed = UnverifiedToken::parse(&text).expect("parses");
            parsed
                .check_times(1_000, 60)
                .map_err(|error| error.message().to_string())
        };
        assert!(at(serde_json::json!({"exp": 1_000})).is_ok());
        assert!(
            at(serde_json::json!({"exp": 950})).is_ok(),
            "within the skew"
        );
        assert_eq!(
            at(serde_json::json!({"exp": 900})).unwrap_err(),
            "the token has expired (exp)"
        );
        assert_eq!(
            at(serde_json::json!({})).unwrap_err(),
            "the token has no exp claim"
        );
        assert!(at(serde_json::json!({"exp": 2_000, "nbf": 1_200})).is_err());
        assert!(at(serde_json::json!({"exp": 2_000, "iat": 1_200})).is_err());
        assert!(UnverifiedToken::parse("a.b").is_err());
        assert!(UnverifiedToken::parse("not.json.x").is_err());
    }
}
