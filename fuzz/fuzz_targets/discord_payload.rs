//! Discord interactions and webhook events (what follows a valid Ed25519 signature).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = chatvault_ingest_gateway::webhooks::discord::parse_payload("acme", data);
});
