//! The timestamp parsers every source goes through, and the webhooks' replay-window check on attacker-chosen
//! signed timestamps (no overflow for any values; symmetric).
#![no_main]

use chatvault_core::time::{Date, parse_rfc3339_micros, parse_slack_ts};
use chatvault_ingest_gateway::webhooks::within_replay_window;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let [now, timestamp, window] = data
        .chunks_exact(8)
        .take(3)
        .map(|chunk| i64::from_le_bytes(chunk.try_into().expect("8 bytes")))
        .collect::<Vec<_>>()[..]
    {
        let inside = within_replay_window(now, timestamp, window);
        assert_eq!(inside, within_replay_window(timestamp, now, window));
        if inside {
            assert!(i128::from(now).abs_diff(i128::from(timestamp)) <= u128::from(window.max(0).unsigned_abs()));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(micros) = parse_slack_ts(text) {
            let _ = Date::from_micros(micros).iso();
        }
        if let Some(micros) = parse_rfc3339_micros(text) {
            let _ = Date::from_micros(micros).iso();
        }
    }
});
