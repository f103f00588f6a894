//! Slack event normalization on arbitrary JSON (what follows a valid signature).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = chatvault_ingest_gateway::webhooks::slack::normalize_event("acme", &envelope, data);
    }
});
