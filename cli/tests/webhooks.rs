//! Webhook ingest over real HTTP into the mock Kafka cluster: each platform's handshake, signed deliveries
//! built from the shapes of the platforms' documented examples (signed here with test secrets), retries that
//! collapse, every rejection with its status and nothing produced, and a Slack conversation restored afterwards
//! with its thread, edit and deletion. Also: signed 2,500-item deliveries to a gateway process stay within a
//! stated memory bound; the listener's connection limit and header/body read timeouts; the stats endpoint
//! behind an audit token.

mod common;

use common::slack_headers;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chatvault_core::auth::Role;
use chatvault_core::config::{StorageConfig, TokenConfig};
use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_proto::v1::GetConversationRequest;
use chatvault_proto::v1::restore_item::Item;
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    RESTORE_TOKEN, TOPIC, authorized, restore_client, start_archiver, start_gateway,
    start_restorer, test_config, wait_until,
};
use chatvault_testkit::process::{ChildRole, free_address, write_config};
use chatvault_testkit::s3::S3Server;
use ring::hmac;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const MATTERMOST_TOKEN: &str = "xbxk6pcs3tgibmcqrdfp4eqh4a";
/// Holds `audit` for every test tenant: reads `GET /webhooks/stats`.
const AUDIT_TOKEN: &str = "test-audit-all";

/// Holds `audit` for `globex` only.
const GLOBEX_AUDIT_TOKEN: &str = "test-audit-globex";

/// Gives every tenant of `config` the [`AUDIT_TOKEN`], and `globex` the [`GLOBEX_AUDIT_TOKEN`].
fn add_audit_token(config: &mut chatvault_config::Config) {
    for tenant in &mut config.shared.tenants {
        tenant.tokens.push(TokenConfig {
            name: "audit-all".into(),
            token: Some(AUDIT_TOKEN.into()),
            roles: vec![Role::Audit],
            ..Default::default()
        });
        if tenant.id == "globex" {
            tenant.tokens.push(TokenConfig {
                name: "audit-globex".into(),
                token: Some(GLOBEX_AUDIT_TOKEN.into()),
                roles: vec![Role::Audit],
                ..Default::default()
            });
        }
    }
}

/// Standard Webhooks headers for `body` under `secret` (`whsec_...`).
fn sign_standard(
    id: &str,
    timestamp: i64,
    body: &str,
    secret: &str,
) -> Vec<(&'static str, String)> {
    let key = BASE64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret");
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        format!("{id}.{timestamp}.{body}").as_bytes(),
    );
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            format!("v1,{}", BASE64.encode(tag.as_ref())),
        ),
        ("content-type", "application/json".into()),
    ]
}

fn now() -> i64 {
    chatvault_core::time::now_micros() / 1_000_000
}

fn slack_event(event_id: &str, event: serde_json::Value) -> String {
    json!({
        "token": "deprecated-verification-token",
        "team_id": "T061EG9R6",
        "api_app_id": "A0PNCHHK2",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_764_000_000,
        "authed_users": ["U061F7AUR"]
    })
    .to_string()
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn post(
        &self,
        integration: &str,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> (u16, String) {
        let mut request = self
            .http
            .post(format!("{}/webhooks/{integration}", self.base))
            .body(body.into());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_verify_normalize_and_archive() -> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let whsec_old = format!("whsec_{}", BASE64.encode([1u8; 32]));
    let whsec_new = format!("whsec_{}", BASE64.encode([2u8; 32]));
    let discord_keys = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32])
        .map_err(|_| anyhow::anyhow!("ed25519 key"))?;
    config.gateway.max_webhook_body_bytes = 64 * 1024;
    add_audit_token(&mut config);
    config.gateway.webhooks = vec![
        WebhookConfig {
            name: "slack".into(),
            platform: Some(WebhookPlatform::Slack),
            tenant: "acme".into(),
            secrets: vec!["old-secret".into(), SLACK_SECRET.into()],
            ..Default::default()
        },
        WebhookConfig {
            name: "generic".into(),
            platform: Some(WebhookPlatform::StandardWebhooks),
            tenant: "acme".into(),
            secrets: vec![whsec_old.clone(), whsec_new.clone()],
            ..Default::default()
        },
        WebhookConfig {
            name: "mattermost".into(),
            platform: Some(WebhookPlatform::Mattermost),
            tenant: "globex".into(),
            secrets: vec![MATTERMOST_TOKEN.into()],
            ..Default::default()
        },
        WebhookConfig {
            name: "discord".into(),
            platform: Some(WebhookPlatform::Discord),
            tenant: "initech".into(),
            secrets: vec![hex::encode(discord_keys.public_key().as_ref())],
            ..Default::default()
        },
    ];
    let gateway = start_gateway(&config).await?;
    let client = Client {
        http: reqwest::Client::new(),
        base: gateway.http_endpoint(),
    };
    let records = || record_count(&kafka.brokers, TOPIC).expect("watermarks");

    // Slack: the url_verification handshake (signed like every Slack request).
    let challenge = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}).to_string();
    let (status, body) = client
        .post(
            "slack",
            challenge.clone(),
            &slack_headers(&challenge, now(), SLACK_SECRET),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );
    assert_eq!(records(), 0);

    // Slack events: a message, delivered three times (Slack's retries carry the same event_id).
    let message = slack_event(
        "Ev0PV52K21",
        json!({"type": "message", "channel": "C2147483705", "user": "U2147483697", "text": "Hello world <@U061F7AUR>", "ts": "1764000000.000200", "event_ts": "1764000000.000200", "channel_type": "channel"}),
    );
    for retry in 0..3 {
        let mut headers = slack_headers(&message, now(), SLACK_SECRET);
        if retry > 0 {
            headers.push(("x-slack-retry-num", retry.to_string()));
            headers.push(("x-slack-retry-reason", "http_timeout".into()));
        }
        assert_eq!(client.post("slack", message.clone(), &headers).await.0, 200);
    }
    assert_eq!(
        records(),
        1,
        "three deliveries of one Slack event are one record"
    );
    let follow_ups = [
        slack_event(
            "Ev0PV52K22",
            json!({"type": "message", "channel": "C2147483705", "user": "U0G9QF9C6", "text": "A reply in the thread", "ts": "1764000010.000300", "thread_ts": "1764000000.000200", "event_ts": "1764000010.000300"}),
        ),
        slack_event(
            "Ev0PV52K23",
            json!({"type": "message", "subtype": "message_changed", "hidden": true, "channel": "C2147483705", "ts": "1764000020.000400", "event_ts": "1764000020.000400", "message": {"type": "message", "user": "U2147483697", "text": "Hello world, edited", "ts": "1764000000.000200", "edited": {"user": "U2147483697", "ts": "1764000020.000000"}}}),
        ),
        slack_event(
            "Ev0PV52K24",
            json!({"type": "message", "channel": "C2147483705", "user": "U0G9QF9C6", "text": "Oops", "ts": "1764000030.000500", "event_ts": "1764000030.000500", "files": [{"id": "F0S43PZDF", "name": "budget.xlsx", "mimetype": "application/vnd.ms-excel", "size": 1024, "url_private": "https://files.slack.com/budget.xlsx"}], "subtype": "file_share"}),
        ),
        slack_event(
            "Ev0PV52K25",
            json!({"type": "message", "subtype": "message_deleted", "hidden": true, "channel": "C2147483705", "ts": "1764000040.000600", "deleted_ts": "1764000030.000500", "event_ts": "1764000040.000600", "previous_message": {"type": "message", "user": "U0G9QF9C6", "text": "Oops", "ts": "1764000030.000500"}}),
        ),
        slack_event(
            "Ev0PV52K26",
            json!({"type": "reaction_added", "user": "U0G9QF9C6", "reaction": "thumbsup", "item_user": "U2147483697", "item": {"type": "message", "channel": "C2147483705", "ts": "1764000000.000200"}, "event_ts": "1764000050.000700"}),
        ),
        slack_event(
            "Ev0PV52K27",
            json!({"type": "member_joined_channel", "user": "W06GH7XHN", "channel": "C2147483705", "channel_type": "C", "team": "T061EG9R6", "event_ts": "1764000060.000800"}),
        ),
        slack_event(
            "Ev0PV52K28",
            json!({"type": "channel_rename", "channel": {"id": "C2147483705", "name": "budget-2026", "created": 1_360_782_804}, "event_ts": "1764000070.000900"}),
        ),
    ];
    for event in &follow_ups {
        assert_eq!(
            client
                .post(
                    "slack",
                    event.clone(),
                    &slack_headers(event, now(), SLACK_SECRET)
                )
                .await
                .0,
            200,
            "{event}"
        );
    }
    assert_eq!(records(), 8);

    // Slack rejections: nothing produced for any of them.
    let fresh = slack_event(
        "Ev0PV52K99",
        json!({"type": "message", "channel": "C1", "user": "U1", "text": "x", "ts": "1764000099.000100"}),
    );
    type Headers = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Headers, String, u16)> = vec![
        (
            "wrong secret",
            slack_headers(&fresh, now(), "not-the-secret"),
            fresh.clone(),
            401,
        ),
        (
            "stale timestamp",
            slack_headers(&fresh, now() - 600, SLACK_SECRET),
            fresh.clone(),
            401,
        ),
        (
            "tampered body",
            slack_headers(&fresh, now(), SLACK_SECRET),
            fresh.replace("\"x\"", "\"y\""),
            401,
        ),
        (
            "no signature",
            vec![("x-slack-request-timestamp", now().to_string())],
            fresh.clone(),
            401,
        ),
        (
            "malformed JSON",
            slack_headers("{not json", now(), SLACK_SECRET),
            "{not json".into(),
            400,
        ),
    ];
    for (what, headers, body, expected) in cases {
        let (status, text) = client.post("slack", body, &headers).await;
        assert_eq!(status, expected, "{what}: {text}");
    }
    let oversized = "x".repeat(70 * 1024);
    assert_eq!(
        client
            .post(
                "slack",
                oversized.clone(),
                &slack_headers(&oversized, now(), SLACK_SECRET)
            )
            .await
            .0,
        413
    );
    assert_eq!(
        client
            .post(
                "nope",
                fresh.clone(),
                &slack_headers(&fresh, now(), SLACK_SECRET)
            )
            .await
            .0,
        404
    );
    assert_eq!(records(), 8, "rejected requests produced records");

    // Standard Webhooks: signatures under the old and the new secret both pass (rotation); a redelivery of the
    // same webhook-id is one record.
    let generic = json!({"type": "chat.event", "timestamp": "2025-11-24T16:00:00Z", "data": {"conversation_id": "support-42", "kind": "message_created", "message_id": "msg-1", "occurred_at": "2025-11-24T16:00:00Z", "sender": {"id": "agent-7", "display_name": "Agent Seven"}, "text": "How can I help?"}}).to_string();
    let sign_generic =
        |id: &str, timestamp: i64, body: &str, secrets: &[&str]| -> Vec<(&'static str, String)> {
            let signatures: Vec<String> = secrets
                .iter()
                .map(|secret| {
                    let key = BASE64
                        .decode(secret.trim_start_matches("whsec_"))
                        .expect("secret");
                    let tag = hmac::sign(
                        &hmac::Key::new(hmac::HMAC_SHA256, &key),
                        format!("{id}.{timestamp}.{body}").as_bytes(),
                    );
                    format!("v1,{}", BASE64.encode(tag.as_ref()))
                })
                .collect();
            vec![
                ("webhook-id", id.to_string()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signatures.join(" ")),
                ("content-type", "application/json".into()),
            ]
        };
    let unrelated = format!("whsec_{}", BASE64.encode([3u8; 32]));
    assert_eq!(
        client
            .post(
                "generic",
                generic.clone(),
                &sign_generic(
                    "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                    now(),
                    &generic,
                    &[&unrelated, &whsec_old]
                )
            )
            .await
            .0,
        204
    );
    assert_eq!(
        client
            .post(
                "generic",
                generic.clone(),
                &sign_generic(
                    "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                    now(),
                    &generic,
                    &[&whsec_new]
                )
            )
            .await
            .0,
        204
    );
    assert_eq!(records(), 9, "the same webhook-id twice is one record");
    assert_eq!(
        client
            .post(
                "generic",
                generic.clone(),
                &sign_generic("msg_other", now(), &generic, &[&unrelated])
            )
            .await
            .0,
        401
    );
    assert_eq!(
        client
            .post(
                "generic",
                generic.clone(),
                &sign_generic("msg_other", now() - 301, &generic, &[&whsec_new])
            )
            .await
            .0,
        401
    );
    let bad_kind = generic.replace("message_created", "message_exploded");
    let (status, text) = client
        .post(
            "generic",
            bad_kind.clone(),
            &sign_generic("msg_bad", now(), &bad_kind, &[&whsec_new]),
        )
        .await;
    assert_eq!(status, 400);
    assert!(text.contains("data[0].kind"), "{text}");
    assert_eq!(records(), 9);

    // Mattermost: form and JSON bodies with the shared token; an empty 200 so nothing is posted back.
    let form = format!(
        "token={MATTERMOST_TOKEN}&team_id=fdi6kk5qkbfp8kc3ji4ytkxfha&team_domain=acme&channel_id=c5tdtfmkajbh5nhx8rmmnz8ndo&channel_name=town-square&timestamp=1764000000123&user_id=rnina9994bde8mua79zqcg5hmo&user_name=alice&post_id=atwr1aewc3n9zf6jrfq6tkz6zc&text=some+text+here&trigger_word=some"
    );
    let (status, body) = client
        .post(
            "mattermost",
            form.clone(),
            &[("content-type", "application/x-www-form-urlencoded".into())],
        )
        .await;
    assert_eq!((status, body.as_str()), (200, ""));
    let json_body = json!({"token": MATTERMOST_TOKEN, "channel_id": "c5tdtfmkajbh5nhx8rmmnz8ndo", "timestamp": 1_764_000_001_000i64, "user_id": "u2", "user_name": "bob", "post_id": "p2", "text": "json text"}).to_string();
    assert_eq!(
        client
            .post(
                "mattermost",
                json_body,
                &[("content-type", "application/json".into())]
            )
            .await
            .0,
        200
    );
    assert_eq!(
        client
            .post(
                "mattermost",
                form.replace(MATTERMOST_TOKEN, "wrong-token-value-123456"),
                &[("content-type", "application/x-www-form-urlencoded".into())]
            )
            .await
            .0,
        401
    );
    let (status, text) = client
        .post(
            "mattermost",
            form.replace("&channel_id=c5tdtfmkajbh5nhx8rmmnz8ndo", ""),
            &[("content-type", "application/x-www-form-urlencoded".into())],
        )
        .await;
    assert_eq!((status, text.trim()), (400, "channel_id is required"));
    assert_eq!(records(), 11);

    // Discord: PING answered with PONG, bad signatures refused with 401, a message event archived.
    let sign_discord = |timestamp: &str, body: &str| -> Vec<(&'static str, String)> {
        let signature = discord_keys.sign(format!("{timestamp}{body}").as_bytes());
        vec![
            ("x-signature-ed25519", hex::encode(signature.as_ref())),
            ("x-signature-timestamp", timestamp.to_string()),
            ("content-type", "application/json".into()),
        ]
    };
    let ping = json!({"type": 1, "id": "816029373512532030", "application_id": "774281279254978560", "version": 1}).to_string();
    let (status, body) = client
        .post(
            "discord",
            ping.clone(),
            &sign_discord(&now().to_string(), &ping),
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"type":1}"#));
    let mut forged = sign_discord(&now().to_string(), &ping);
    forged[1].1 = (now() + 1).to_string();
    assert_eq!(client.post("discord", ping.clone(), &forged).await.0, 401);
    // A captured request (valid signature) replayed later than the replay window is refused, naming why.
    let captured = (now() - 600).to_string();
    let (status, text) = client
        .post("discord", ping.clone(), &sign_discord(&captured, &ping))
        .await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains("X-Signature-Timestamp") && text.contains("stale"),
        "{text}"
    );
    let event = json!({"version": 1, "application_id": "774281279254978560", "type": 1, "event": {"type": "MESSAGE_CREATE", "timestamp": "2025-11-24T16:01:00.000000+00:00", "data": {"id": "1234567890", "channel_id": "41771983423143937", "guild_id": "41771983423143936", "author": {"id": "80351110224678912", "username": "nelly"}, "content": "Supa Hot", "timestamp": "2025-11-24T16:01:00.000000+00:00", "mentions": [], "attachments": []}}}).to_string();
    assert_eq!(
        client
            .post(
                "discord",
                event.clone(),
                &sign_discord(&now().to_string(), &event)
            )
            .await
            .0,
        204
    );
    assert_eq!(records(), 12);

    // Per-integration counts: accepted events, answered redeliveries, rejections by reason. The listener faces
    // the internet: the counts need a token holding audit (or admin).
    let stats_url = format!("{}/webhooks/stats", client.base);
    let anonymous = client.http.get(&stats_url).send().await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    let ingest_only = client
        .http
        .get(&stats_url)
        .bearer_auth(chatvault_testkit::pipeline::INGEST_TOKEN)
        .send()
        .await?;
    assert_eq!(ingest_only.status().as_u16(), 403);
    let globex_only: serde_json::Value = serde_json::from_str(
        &client
            .http
            .get(&stats_url)
            .bearer_auth(GLOBEX_AUDIT_TOKEN)
            .send()
            .await?
            .text()
            .await?,
    )?;
    let visible: Vec<&String> = globex_only["integrations"]
        .as_object()
        .map(|integrations| integrations.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        visible,
        ["mattermost"],
        "a token sees its tenants' integrations only"
    );
    let stats_text = client
        .http
        .get(&stats_url)
        .bearer_auth(AUDIT_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let stats: serde_json::Value = serde_json::from_str(&stats_text)?;
    assert_eq!(
        stats["integrations"]["discord"]["rejected"]["stale_timestamp"],
        1
    );
    let slack = &stats["integrations"]["slack"];
    assert_eq!(slack["accepted_events"], 8);
    assert_eq!(slack["duplicate_deliveries"], 2);
    assert_eq!(slack["rejected"]["signature"], 3, "{slack}");
    assert_eq!(slack["rejected"]["stale_timestamp"], 1);
    assert_eq!(slack["rejected"]["malformed"], 1);
    assert_eq!(slack["rejected"]["too_large"], 1);
    assert_eq!(stats["integrations"]["generic"]["duplicate_deliveries"], 1);
    assert_eq!(stats["integrations"]["mattermost"]["rejected"]["token"], 1);
    assert!(
        !stats.to_string().contains(SLACK_SECRET) && !stats.to_string().contains(MATTERMOST_TOKEN)
    );

    // Archive and restore the Slack channel: the edit is applied, the deletion is a tombstone, the reply sits
    // under its root.
    let (archiver, stats) = start_archiver(&config, "webhook-archiver").await?;
    let restorer = start_restorer(&config).await?;
    assert!(
        wait_until(Duration::from_secs(60), || stats
            .events
            .committed_records
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 12)
        .await
    );
    let mut restore = restore_client(&restorer.endpoint()).await?;
    let mut stream = restore
        .get_conversation(authorized(
            GetConversationRequest {
                tenant_id: "acme".into(),
                conversation_id: "C2147483705".into(),
                ..Default::default()
            },
            RESTORE_TOKEN,
        ))
        .await?
        .into_inner();
    let mut messages = Vec::new();
    let mut other_events = Vec::new();
    while let Some(item) = stream.message().await? {
        match item.item {
            Some(Item::Message(message)) => messages.push(message),
            Some(Item::Event(event)) => {
                other_events.push(chatvault_core::event::kind_name(event.kind))
            }
            _ => {}
        }
    }
    let summary: Vec<(String, String, String, bool, bool)> = messages
        .iter()
        .map(|m| {
            (
                m.message_id.clone(),
                m.thread_id.clone(),
                m.text.clone(),
                m.edited,
                m.deleted,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "1764000000.000200".into(),
                String::new(),
                "Hello world, edited".into(),
                true,
                false
            ),
            (
                "1764000010.000300".into(),
                "1764000000.000200".into(),
                "A reply in the thread".into(),
                false,
                false
            ),
            (
                "1764000030.000500".into(),
                String::new(),
                String::new(),
                false,
                true
            ),
        ]
    );
    assert_eq!(messages[0].reactions.len(), 1);
    assert_eq!(messages[0].mentions, vec!["U061F7AUR".to_string()]);
    assert_eq!(messages[2].attachments[0].name, "budget.xlsx");
    assert_eq!(other_events, vec!["member_joined", "conversation_renamed"]);

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_503_with_retry_after_when_kafka_is_unreachable() -> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        "127.0.0.1:9",
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.gateway.delivery_timeout = Duration::from_millis(1_500);
    config.gateway.drain_timeout = Duration::from_millis(1_000);
    config.gateway.webhooks = vec![WebhookConfig {
        name: "slack".into(),
        platform: Some(WebhookPlatform::Slack),
        tenant: "acme".into(),
        secrets: vec![SLACK_SECRET.into()],
        ..Default::default()
    }];
    let gateway = start_gateway(&config).await?;
    let message = slack_event(
        "Ev1",
        json!({"type": "message", "channel": "C1", "user": "U1", "text": "x", "ts": "1764000000.000100"}),
    );
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/slack", gateway.http_endpoint()))
        .body(message.clone());
    let mut request = response;
    for (name, value) in slack_headers(&message, now(), SLACK_SECRET) {
        request = request.header(name, value);
    }
    let response = request.send().await?;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    gateway.stop().await?;
    Ok(())
}

/// The 324 KB, 2,500-item `chat.events` delivery of issue 8, as a Standard Webhooks sender would send it.
/// (Events get distinct ids through each delivery's `webhook-id`.)
fn chat_events_body(items: usize) -> String {
    let data: Vec<serde_json::Value> = (0..items)
        .map(|n| {
            json!({"conversation_id": format!("room-{}", n % 16), "kind": "message_created",
                   "message_id": n.to_string(), "occurred_at": "2026-11-30T12:00:00Z",
                   "sender": {"id": format!("u{}", n % 97)}})
        })
        .collect();
    json!({"type": "chat.events", "timestamp": "2026-11-30T12:00:00Z", "data": data}).to_string()
}

/// `VmHWM` (peak resident set) and `VmRSS` of process `pid`, bytes.
fn memory_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("{name} not in /proc/{pid}/status"))?;
        let kib: u64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Issue 8, point 3: every event of a multi-item delivery used to carry the whole body, so this 324 KB,
/// 2,500-item delivery took a gateway from 52 MB to 846 MB (and was then refused). Now each event carries its
/// own item and the body is kept once: four such deliveries at once, to a gateway in its own process, raise its
/// peak RSS (`VmHWM`) by less than `MEMORY_BOUND` (64 MiB; measured: about 10 MiB) and are all acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_2500_item_delivery_stays_within_a_memory_bound() -> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    const MEMORY_BOUND: u64 = 64 * 1024 * 1024;
    const ITEMS: usize = 2_500;
    const CONCURRENT: usize = 4;
    let kafka = TestKafka::start(TOPIC, 2)?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        StorageConfig {
            url: "memory://".into(),
            ..Default::default()
        },
        &dir.path().join("keyring.json"),
    );
    config.gateway.grpc_listen = free_address()?;
    config.gateway.http_listen = free_address()?;
    config.shared.telemetry.metrics_listen = "127.0.0.1:0".into();
    let secret = format!("whsec_{}", BASE64.encode([5u8; 32]));
    config.gateway.webhooks = vec![WebhookConfig {
        name: "generic".into(),
        platform: Some(WebhookPlatform::StandardWebhooks),
        tenant: "acme".into(),
        secrets: vec![secret.clone()],
        ..Default::default()
    }];
    let config_path = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let gateway = ChildRole::spawn_role(
        "gateway",
        std::path::Path::new(env!("CARGO_BIN_EXE_chatvault")),
        "gateway",
        &config_path,
    )?;
    let base = format!("http://{}", config.gateway.http_listen);
    let http = reqwest::Client::new();
    let records = || record_count(&kafka.brokers, TOPIC).expect("watermarks");

    // Warm up (connections to Kafka, the first allocations) with a small delivery, then take the baseline.
    let warm_up = chat_events_body(10);
    let mut answered = false;
    for _ in 0..100 {
        let mut request = http
            .post(format!("{base}/webhooks/generic"))
            .body(warm_up.clone());
        for (name, value) in sign_standard("msg_warm", now(), &warm_up, &secret) {
            request = request.header(name, value);
        }
        if let Ok(response) = request.send().await {
            assert_eq!(response.status().as_u16(), 204, "warm-up");
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the gateway never answered");
    let (peak_before, rss_before) = memory_of(gateway.id())?;

    let bodies: Vec<String> = (0..CONCURRENT).map(|_| chat_events_body(ITEMS)).collect();
    let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
    let sends = bodies.iter().enumerate().map(|(n, body)| {
        let mut request = http
            .post(format!("{base}/webhooks/generic"))
            .body(body.clone());
        for (name, value) in sign_standard(&format!("msg_burst_{n}"), now(), body, &secret) {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
    });
    for (status, text) in futures::future::join_all(sends).await {
        assert_eq!(status, 204, "{text}");
    }
    let (peak_after, rss_after) = memory_of(gateway.id())?;
    let growth = peak_after.saturating_sub(peak_before);
    eprintln!(
        "{CONCURRENT} deliveries of {ITEMS} items ({sizes:?} bytes): gateway peak RSS {} -> {} MiB (+{:.1} MiB), RSS {} -> {} MiB",
        peak_before >> 20,
        peak_after >> 20,
        growth as f64 / (1 << 20) as f64,
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(
        sizes.iter().all(|size| (300_000..350_000).contains(size)),
        "{sizes:?}"
    );
    assert!(
        growth < MEMORY_BOUND,
        "the gateway's peak RSS grew by {growth} bytes, over the bound of {MEMORY_BOUND}"
    );
    assert_eq!(records(), (10 + CONCURRENT * ITEMS) as i64);
    drop(gateway);
    Ok(())
}

/// The webhook listener bounds its connections and cuts off slow clients: a client that does not finish its
/// headers is disconnected after `http_header_read_timeout`, one that does not finish its body gets 408
/// after `http_body_read_timeout`, and a connection beyond `max_http_connections` gets 503 with
/// Retry-After; once connections close, new ones are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_listener_limits_connections_and_slow_clients() -> anyhow::Result<()> {
    chatvault_core::storage::install_crypto_provider();
    let kafka = TestKafka::start(TOPIC, 1)?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        StorageConfig {
            url: "memory://".into(),
            ..Default::default()
        },
        &dir.path().join("keyring.json"),
    );
    config.gateway.max_http_connections = 2;
    config.gateway.http_header_read_timeout = Duration::from_millis(1_000);
    config.gateway.http_body_read_timeout = Duration::from_millis(1_000);
    config.gateway.webhooks = vec![WebhookConfig {
        name: "slack".into(),
        platform: Some(WebhookPlatform::Slack),
        tenant: "acme".into(),
        secrets: vec![SLACK_SECRET.into()],
        ..Default::default()
    }];
    config.validate()?;
    let gateway = start_gateway(&config).await?;
    let address = gateway.http_address.expect("http address");
    // Reads until the peer closes (or 5 s pass): what it answered, and whether it closed.
    async fn read_until_closed(socket: &mut tokio::net::TcpStream) -> (String, bool) {
        let mut answer = Vec::new();
        let mut buffer = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&answer).into(), true),
                Ok(Ok(read)) => answer.extend_from_slice(&buffer[..read]),
                Err(_) => return (String::from_utf8_lossy(&answer).into(), false),
            }
        }
    }

    // Slowloris: headers that never end.
    let started = std::time::Instant::now();
    let mut slow_headers = tokio::net::TcpStream::connect(address).await?;
    slow_headers
        .write_all(
            b"POST /webhooks/slack HTTP/1.1\r\nhost: chatvault\r\nx-slack-request-timestamp: 1",
        )
        .await?;
    let (_, closed) = read_until_closed(&mut slow_headers).await;
    assert!(
        closed,
        "a client that never finishes its headers must be disconnected"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A body that never arrives: 408 and the connection closed.
    let mut slow_body = tokio::net::TcpStream::connect(address).await?;
    slow_body
        .write_all(b"POST /webhooks/slack HTTP/1.1\r\nhost: chatvault\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"type\":")
        .await?;
    let (answer, closed) = read_until_closed(&mut slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(closed, "the connection of a timed-out body is closed");

    // Two connections are the limit: the third is answered 503 with Retry-After without being read.
    let first = tokio::net::TcpStream::connect(address).await?;
    let second = tokio::net::TcpStream::connect(address).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(address).await?;
    let (answer, closed) = read_until_closed(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 5"),
        "{answer}"
    );
    assert!(closed);
    drop((first, second));
    let http = reqwest::Client::new();
    let healthz = format!("http://{address}/healthz");
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            matches!(http.get(&healthz).send().await, Ok(r) if r.status().as_u16() == 200)
        })
        .await,
        "served again once the connections closed"
    );
    gateway.stop().await?;
    Ok(())
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut condition: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
