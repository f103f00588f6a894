//! Sign-in with the company's identity provider: the gateway and the restorer accept JWT access tokens of a
//! configured OIDC issuer, checked against a real OpenID provider (node-oidc-provider, started by the test),
//! and map the token's claims to roles per tenant.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chatvault_core::auth::Role;
use chatvault_core::config::{OidcIssuerConfig, OidcRoleRule};
use chatvault_proto::v1::{ChatEvent, IngestBatchRequest, ListConversationsRequest};
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::oidc::{OidcClient, OidcProvider, SigningKey};
use chatvault_testkit::pipeline::{
    TOPIC, authorized, ingest_client, restore_client, start_gateway, start_restorer, test_config,
};
use chatvault_testkit::s3::S3Server;
use serde_json::{Value, json};
use tonic::Code;

const AUDIENCE: &str = "urn:chatvault";

fn event(tenant: &str) -> ChatEvent {
    common::message_event(tenant, "m1", "hello")
}

fn claims_of(token: &str) -> anyhow::Result<Value> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("not a JWT"))?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?)
}

fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let signature = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_of_a_real_provider_are_verified_mapped_to_roles_and_followed_through_key_rotation()
-> anyhow::Result<()> {
    let first_key = SigningKey::generate("key-2026-1")?;
    let mut provider = OidcProvider::start(
        &[&first_key],
        AUDIENCE,
        &[
            OidcClient::new("acme-legal", &["chatvault-acme-legal"]),
            OidcClient::new("acme-bot", &["chatvault-acme-ingest"]),
            OidcClient::new("stranger", &["some-other-app"]),
        ],
    )?;
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let rule = |value: &str, roles: Vec<Role>| OidcRoleRule {
        claim: "groups".into(),
        value: value.into(),
        tenant: "acme".into(),
        roles,
    };
    config.shared.oidc = vec![OidcIssuerConfig {
        issuer: provider.issuer(),
        audience: AUDIENCE.into(),
        allow_http: true,
        jwks_min_refresh_interval: Duration::from_millis(500),
        roles: vec![
            rule("chatvault-acme-legal", vec![Role::Restore]),
            rule("chatvault-acme-ingest", vec![Role::Ingest]),
        ],
        ..OidcIssuerConfig::default()
    }];
    config.validate()?;
    let gateway = start_gateway(&config).await?;
    let restorer = start_restorer(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    let mut restore = restore_client(&restorer.endpoint()).await?;
    let list = |tenant: &str| ListConversationsRequest {
        tenant_id: tenant.into(),
    };
    let batch = |tenant: &str| IngestBatchRequest {
        events: vec![event(tenant)],
    };

    // Tokens the provider issued: each allowed exactly what its groups map to.
    let bot = provider.token("acme-bot").await?;
    let legal = provider.token("acme-legal").await?;
    let stranger = provider.token("stranger").await?;
    ingest.ingest_batch(authorized(batch("acme"), &bot)).await?;
    restore
        .list_conversations(authorized(list("acme"), &legal))
        .await?;
    for (denied, wanted) in [
        (
            ingest
                .ingest_batch(authorized(batch("acme"), &legal))
                .await
                .err(),
            "acme-legal does not hold the ingest role for tenant acme",
        ),
        (
            ingest
                .ingest_batch(authorized(batch("globex"), &bot))
                .await
                .err(),
            "acme-bot does not hold the ingest role for tenant globex",
        ),
        (
            restore
                .list_conversations(authorized(list("acme"), &bot))
                .await
                .err(),
            "acme-bot does not hold the restore role for tenant acme",
        ),
        (
            restore
                .list_conversations(authorized(list("acme"), &stranger))
                .await
                .err(),
            "stranger does not hold the restore role for tenant acme",
        ),
    ] {
        let status = denied.ok_or_else(|| anyhow::anyhow!("allowed: {wanted}"))?;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(wanted),
            "{wanted}: {}",
            status.message()
        );
    }

    // Tokens the provider never issued, correctly signed with its key or made to look so.
    let claims = claims_of(&legal)?;
    let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": first_key.kid});
    let with = |changes: Value| {
        let mut changed = claims.clone();
        for (name, value) in changes.as_object().expect("object") {
            changed[name] = value.clone();
        }
        changed
    };
    let now = chatvault_core::time::now_micros() / 1_000_000;
    let stray_key = SigningKey::generate("key-unknown")?;
    let forged = [
        (
            "expired",
            first_key.sign(
                &header,
                &with(json!({"iat": now - 7200, "exp": now - 3600})),
            )?,
            "expired",
        ),
        (
            "wrong audience",
            first_key.sign(&header, &with(json!({"aud": "urn:someone-else"})))?,
            "not for audience",
        ),
        (
            "wrong issuer",
            first_key.sign(
                &header,
                &with(json!({"iss": "https://idp.attacker.example"})),
            )?,
            "not a configured oidc issuer",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(
                    json!({"alg": "none", "typ": "at+jwt", "kid": first_key.kid}).to_string()
                ),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            ),
            "\"none\" is not accepted",
        ),
        (
            "HS256 keyed with the public key",
            hs256(
                &json!({"alg": "HS256", "typ": "at+jwt", "kid": first_key.kid}),
                &claims,
                &first_key.public_key_bytes(),
            ),
            "\"HS256\" is not accepted",
        ),
        (
            "unknown kid",
            stray_key.sign(
                &json!({"alg": "RS256", "typ": "at+jwt", "kid": stray_key.kid}),
                &claims,
            )?,
            "is not among the keys of issuer",
        ),
        (
            "an ID token (typ JWT)",
            first_key.sign(
                &json!({"alg": "RS256", "typ": "JWT", "kid": first_key.kid}),
                &claims,
            )?,
            "is not \"at+jwt\"",
        ),
        (
            "a changed claim",
            {
                let genuine = first_key.sign(&header, &claims)?;
                let signature = genuine.rsplit('.').next().unwrap_or_default().to_string();
                let (head, _) = genuine.split_once('.').expect("dot");
                format!(
                    "{head}.{}.{signature}",
                    URL_SAFE_NO_PAD
                        .encode(with(json!({"groups": ["chatvault-acme-ingest"]})).to_string())
                )
            },
            "signature does not verify",
        ),
    ];
    for (what, token, wanted) in &forged {
        let status = restore
            .list_conversations(authorized(list("acme"), token))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            status.message().contains(wanted),
            "{what}: {}",
            status.message()
        );
        let status = ingest
            .ingest_batch(authorized(batch("acme"), token))
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{what} at the gateway: {status:?}"
        );
    }
    // The same claims correctly signed are accepted: the refusals above are about what was changed.
    restore
        .list_conversations(authorized(list("acme"), &first_key.sign(&header, &claims)?))
        .await?;

    // Key rotation at the provider: its new tokens are signed with a key chatvault has not seen. They are
    // accepted without restarting anything, once the unknown kid made chatvault read the keys again.
    let second_key = SigningKey::generate("key-2026-2")?;
    provider.restart_with(&[&second_key])?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rotated = provider.token("acme-legal").await?;
    let rotated_header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD.decode(rotated.split('.').next().unwrap_or_default())?,
    )?;
    assert_eq!(
        rotated_header["kid"], "key-2026-2",
        "the provider signs with its new key"
    );
    restore
        .list_conversations(authorized(list("acme"), &rotated))
        .await?;
    let rotated_bot = provider.token("acme-bot").await?;
    ingest
        .ingest_batch(authorized(batch("acme"), &rotated_bot))
        .await?;

    gateway.stop().await?;
    restorer.stop().await?;
    Ok(())
}
