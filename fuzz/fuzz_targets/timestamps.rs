//! The timestamp parsers every source goes through.
#![no_main]

use chatvault_core::time::{Date, parse_rfc3339_micros, parse_slack_ts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(micros) = parse_slack_ts(text) {
            let _ = Date::from_micros(micros).iso();
        }
        if let Some(micros) = parse_rfc3339_micros(text) {
            let _ = Date::from_micros(micros).iso();
        }
    }
});
