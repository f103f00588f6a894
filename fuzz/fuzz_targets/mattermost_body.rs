//! Mattermost form and JSON bodies behind a correct token.
#![no_main]

use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_ingest_gateway::webhooks::{Integration, WebhookRequest};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "fuzz-token-that-is-long-enough";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let integration = Integration::from_config(&WebhookConfig {
        name: "fuzz".into(),
        platform: Some(WebhookPlatform::Mattermost),
        tenant: "acme".into(),
        secrets: vec![TOKEN.into()],
        ..Default::default()
    })
    .expect("valid integration");
    let mut headers = HeaderMap::new();
    let body = if selector % 2 == 0 {
        headers.insert("content-type", HeaderValue::from_static("application/x-www-form-urlencoded"));
        [format!("token={TOKEN}&").as_bytes(), rest].concat()
    } else {
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        rest.to_vec()
    };
    let request = WebhookRequest { headers: &headers, query: None, body: &body, now_secs: 0, replay_window_secs: 300 };
    let _ = integration.handler.handle("acme", &request);
});
