//! Microsoft Graph change notifications: the validationToken query, clientState checks, basic and lifecycle
//! notifications, and the refusal of rich notifications without valid validation tokens.
#![no_main]

use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_ingest_gateway::webhooks::teams::Teams;
use chatvault_ingest_gateway::webhooks::{PlatformHandler, WebhookRequest};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (query, body) = match data.iter().position(|byte| *byte == 0xff) {
        Some(split) => (std::str::from_utf8(&data[..split]).ok(), &data[split + 1..]),
        None => (None, data),
    };
    let config = WebhookConfig {
        name: "fuzz".into(),
        platform: Some(WebhookPlatform::Teams),
        tenant: "acme".into(),
        secrets: vec!["fuzz-client-state".into()],
        ..Default::default()
    };
    let teams = Teams::new(&config, vec!["fuzz-client-state".into()]).expect("valid Teams handler");
    let headers = HeaderMap::new();
    let request = WebhookRequest { headers: &headers, query, body, now_secs: 1_764_000_000, replay_window_secs: 300 };
    let _ = teams.handle("acme", &request);
});
