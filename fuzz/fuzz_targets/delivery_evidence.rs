//! Delivery evidence (`webhooks::evidence`): for any body a multi-item handler accepts (Standard Webhooks
//! `chat.events`/`chat.event`, Microsoft Graph `value[]`), every event's `raw_payload` is a verbatim slice of
//! the body at its offset, the slices are sealed without error, and envelope + slices reassemble to the body
//! byte for byte. Also: `reassemble` never panics on arbitrary pieces.
#![no_main]

use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_ingest_gateway::webhooks::evidence::{reassemble, seal, sha256_hex};
use chatvault_ingest_gateway::webhooks::standard::StandardWebhooks;
use chatvault_ingest_gateway::webhooks::teams::Teams;
use chatvault_ingest_gateway::webhooks::{PlatformHandler, WebhookRequest};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;

/// The invariants for one accepted delivery's events (a macro, so this crate need not name the protobuf type).
macro_rules! check {
    ($body:expr, $events:expr) => {{
        let body: &[u8] = $body;
        let mut events = $events;
        seal(body, &mut events).expect("a handler's events are slices of its body");
        // A delivery that produced no event (only ignored items) has nothing to reassemble.
        if !events.is_empty() {
            let envelopes: Vec<&[u8]> = events
                .iter()
                .map(|event| event.delivery_envelope.as_slice())
                .filter(|envelope| !envelope.is_empty())
                .collect();
            assert!(envelopes.len() <= 1, "at most one event carries the envelope");
            let digest = sha256_hex(body);
            assert!(events.iter().all(|event| event.delivery_sha256 == digest));
            let rebuilt = reassemble(
                envelopes.first().copied().unwrap_or_default(),
                events
                    .iter()
                    .map(|event| (event.raw_payload_offset, event.raw_payload.as_slice())),
            )
            .expect("the pieces fit");
            assert_eq!(rebuilt, body, "envelope + slices reproduce the body");
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    match selector % 3 {
        0 => {
            let handler = StandardWebhooks::new(
                "fuzz",
                &["whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string()],
            )
            .expect("valid secret");
            if let Ok(events) = handler.parse_payload("acme", "msg_fuzz", body) {
                check!(body, events);
            }
        }
        1 => {
            let config = WebhookConfig {
                name: "fuzz".into(),
                platform: Some(WebhookPlatform::Teams),
                tenant: "acme".into(),
                secrets: vec!["s".into()],
                ..Default::default()
            };
            let teams = Teams::new(&config, vec!["s".into()]).expect("valid Teams handler");
            let headers = HeaderMap::new();
            let request = WebhookRequest {
                headers: &headers,
                query: None,
                body,
                now_secs: 1_764_000_000,
                replay_window_secs: 300,
            };
            if let Ok(accepted) = teams.handle("acme", &request) {
                check!(body, accepted.events);
            }
        }
        _ => {
            // Arbitrary pieces: the first bytes are offsets, the rest envelope and slices.
            let mut pieces = body.chunks(7);
            let envelope = pieces.next().unwrap_or_default();
            let slices = pieces.map(|piece| (u64::from(piece[0]) * 3, &piece[1..]));
            let _ = reassemble(envelope, slices);
        }
    }
});
