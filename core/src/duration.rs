//! Durations in configuration, written with units: `"500ms"`, `"10s"`, `"2m"`, `"1h"`, or combined
//! (`"1m30s"`). A bare number is refused, because its unit would be a guess; `0s` (or `0`) is zero.
//!
//! The granularity is a millisecond, which is what every setting needs (librdkafka takes milliseconds).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Parses a duration with units; the error says what is wrong with `text`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    let expected = "a duration with a unit, such as \"500ms\", \"10s\", \"2m\" or \"1h\"";
    if trimmed.is_empty() {
        return Err(format!("expected {expected}, got an empty string"));
    }
    let mut millis: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("expected {expected}, got {text:?}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is too large"))?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..letters];
        let Some((_, scale)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(if unit.is_empty() {
                format!("expected {expected}, got {text:?} (a number needs a unit)")
            } else {
                format!("expected {expected}, got {text:?} (unknown unit {unit:?})")
            });
        };
        millis = number
            .checked_mul(*scale)
            .and_then(|part| millis.checked_add(part))
            .ok_or_else(|| format!("{text:?} is too large"))?;
        rest = &rest[letters..];
    }
    Ok(Duration::from_millis(millis))
}

/// The shortest exact form with a single unit: `"10s"`, `"1500ms"`, `"2m"`. [`parse`] reads it back.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".into();
    }
    let (unit, scale) = UNITS
        .iter()
        .rev()
        .find(|(_, scale)| millis.is_multiple_of(u128::from(*scale)))
        .copied()
        .unwrap_or(UNITS[0]);
    format!("{}{unit}", millis / u128::from(scale))
}

/// `#[serde(with = "chatvault_core::duration")]` for a `Duration` field.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Number(i64),
    }
    match Written::deserialize(deserializer)? {
        Written::Text(text) => parse(&text).map_err(serde::de::Error::custom),
        Written::Number(0) => Ok(Duration::ZERO),
        Written::Number(number) => Err(serde::de::Error::custom(format!(
            "expected a duration with a unit, such as \"{number}ms\" or \"{number}s\", got the bare number \
             {number}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_format_round_trip() {
        let cases = [
            ("500ms", 500),
            ("10s", 10_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("0s", 0),
            ("0", 0),
            (" 250ms ", 250),
        ];
        for (text, millis) in cases {
            assert_eq!(parse(text), Ok(Duration::from_millis(millis)), "{text}");
            assert_eq!(
                parse(&format(Duration::from_millis(millis))),
                Ok(Duration::from_millis(millis))
            );
        }
        assert_eq!(format(Duration::from_millis(90_000)), "90s");
        assert_eq!(format(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(format(Duration::from_secs(7_200)), "2h");
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("10", "needs a unit"),
            ("10 seconds", "needs a unit"),
            ("5d", "unknown unit \"d\""),
            ("", "empty"),
            ("ms", "got \"ms\""),
            ("99999999999999999999s", "too large"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
