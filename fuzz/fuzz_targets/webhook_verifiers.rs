//! Every platform's verifier with arbitrary headers and body: never panics, and accepts nothing unsigned.
#![no_main]

use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_ingest_gateway::webhooks::{Integration, WebhookRequest};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HEADERS: [&str; 8] = [
    "x-slack-request-timestamp",
    "x-slack-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-signature-ed25519",
    "x-signature-timestamp",
    "content-type",
];

fn integration(platform: WebhookPlatform, secret: &str) -> Integration {
    Integration::from_config(&WebhookConfig {
        name: "fuzz".into(),
        platform: Some(platform),
        tenant: "acme".into(),
        secrets: vec![secret.into()],
        ..Default::default()
    })
    .expect("valid fuzz integration")
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let mut parts = rest.split(|byte| *byte == 0xff);
    let mut headers = HeaderMap::new();
    for name in HEADERS {
        if let Some(value) = parts.next()
            && let Ok(value) = HeaderValue::from_bytes(value)
        {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let body: Vec<u8> = parts.flatten().copied().collect();
    let platform_integration = match selector % 4 {
        0 => integration(WebhookPlatform::Slack, "fuzz-signing-secret"),
        1 => integration(WebhookPlatform::StandardWebhooks, "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        2 => integration(WebhookPlatform::Mattermost, "fuzz-token-that-is-long-enough"),
        _ => integration(WebhookPlatform::Discord, &"ab".repeat(32)),
    };
    let request = WebhookRequest {
        headers: &headers,
        query: None,
        body: &body,
        now_secs: 1_764_000_000,
        replay_window_secs: 300,
    };
    if let Ok(accepted) = platform_integration.handler.handle("acme", &request) {
        // Only Mattermost can be satisfied without a secret-derived signature, and only with the exact token.
        assert!(
            selector % 4 == 2 || accepted.events.is_empty(),
            "an unsigned request was accepted with events"
        );
    }
});
