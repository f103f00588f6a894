//! The generic chat-event JSON of Standard Webhooks senders (what follows a valid signature).
#![no_main]

use chatvault_ingest_gateway::webhooks::standard::StandardWebhooks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let handler = StandardWebhooks::new("fuzz", &["whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string()])
        .expect("valid secret");
    let _ = handler.parse_payload("acme", "msg_fuzz", data);
});
