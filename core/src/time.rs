//! Calendar arithmetic on microsecond timestamps, enough for partition names (UTC dates and months) without a
//! date library.

use std::time::{SystemTime, UNIX_EPOCH};

pub const MICROS_PER_SECOND: i64 = 1_000_000;
pub const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as i64)
        .unwrap_or(0)
}

/// A UTC calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The UTC date of a timestamp in microseconds since the epoch.
    pub fn from_micros(micros: i64) -> Date {
        let days = micros.div_euclid(MICROS_PER_DAY);
        civil_from_days(days)
    }

    /// `yyyy-mm-dd`, the `date=` partition value.
    pub fn iso(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `yyyy-mm`, the data-key period.
    pub fn month_period(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// Parses `yyyy-mm-dd`.
    pub fn parse_iso(text: &str) -> Option<Date> {
        let mut parts = text.splitn(3, '-');
        let year = parts.next()?.parse().ok()?;
        let month = parts.next()?.parse().ok()?;
        let day = parts.next()?.parse().ok()?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        Some(Date { year, month, day })
    }

    /// Microseconds since the epoch at 00:00 UTC of this date.
    pub fn start_micros(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * MICROS_PER_DAY
    }

    /// The first day of the month after this date's.
    pub fn first_of_next_month(&self) -> Date {
        match self.month {
            12 => Date {
                year: self.year + 1,
                month: 1,
                day: 1,
            },
            month => Date {
                year: self.year,
                month: month + 1,
                day: 1,
            },
        }
    }
}

/// `yyyy-mm-dd hh:mm:ssZ` in UTC.
pub fn format_time(micros: i64) -> String {
    let date = Date::from_micros(micros);
    let seconds_of_day = micros.rem_euclid(MICROS_PER_DAY) / MICROS_PER_SECOND;
    format!(
        "{} {:02}:{:02}:{:02}Z",
        date.iso(),
        seconds_of_day / 3600,
        seconds_of_day / 60 % 60,
        seconds_of_day % 60
    )
}

/// Parses a Slack timestamp (`"1355517523.000005"`: seconds, a dot, 6 digits of microseconds) to
/// microseconds since the epoch. Slack message `ts` values double as message ids.
pub fn parse_slack_ts(ts: &str) -> Option<i64> {
    let (seconds, fraction) = ts.split_once('.').unwrap_or((ts, ""));
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 6 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = seconds.parse().ok()?;
    let micros: i64 = format!("{fraction:0<6}").parse().ok()?;
    seconds.checked_mul(MICROS_PER_SECOND)?.checked_add(micros)
}

/// Parses an RFC 3339 timestamp (`2021-03-04T12:34:56.789+00:00`, `...Z`) to microseconds since the epoch.
/// Fractions beyond microseconds are truncated.
pub fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut micros = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &fraction[..digits.min(6)];
        micros = format!("{kept:0<6}").parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = rest.get(1..)?;
            let (hours, minutes) = offset.split_once(':')?;
            if hours.len() != 2 || minutes.len() != 2 {
                return None;
            }
            sign * (hours.parse::<i64>().ok()? * 3600 + minutes.parse::<i64>().ok()? * 60)
        }
    };
    let days = days_from_civil(year as i32, month as u32, day as u32);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(seconds * MICROS_PER_SECOND + micros)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's civil calendar algorithm).
fn civil_from_days(days_since_epoch: i64) -> Date {
    let shifted = days_since_epoch + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = (year_of_era + era * 400 + i64::from(month <= 2)) as i32;
    Date { year, month, day }
}

fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Date::from_micros(0).iso(), "1970-01-01");
        // 2024-02-29T23:59:59.999999Z
        assert_eq!(Date::from_micros(1_709_251_199_999_999).iso(), "2024-02-29");
        assert_eq!(Date::from_micros(1_709_251_200_000_000).iso(), "2024-03-01");
        assert_eq!(Date::from_micros(-1).iso(), "1969-12-31");
        assert_eq!(
            Date::from_micros(1_764_028_800_000_000).month_period(),
            "2025-11"
        );
    }

    #[test]
    fn parses_source_timestamps() {
        assert_eq!(
            parse_slack_ts("1355517523.000005"),
            Some(1_355_517_523_000_005)
        );
        assert_eq!(parse_slack_ts("1355517523.5"), Some(1_355_517_523_500_000));
        assert_eq!(parse_slack_ts("1355517523"), Some(1_355_517_523_000_000));
        for bad in ["", ".1", "12a.1", "1.1234567", "1.-1"] {
            assert_eq!(parse_slack_ts(bad), None, "{bad}");
        }
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_micros("2021-03-04T12:34:56.789+00:00"),
            Some(1_614_861_296_789_000)
        );
        assert_eq!(
            parse_rfc3339_micros("2021-03-04T14:34:56.789123456+02:00"),
            Some(1_614_861_296_789_123)
        );
        for bad in [
            "",
            "2021-03-04",
            "2021-13-04T00:00:00Z",
            "2021-03-04T00:00:00",
            "2021-03-04T00:00:00+0200",
        ] {
            assert_eq!(parse_rfc3339_micros(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trip_every_day_for_centuries() {
        for days in (-200_000..200_000).step_by(7) {
            let date = civil_from_days(days);
            assert_eq!(
                days_from_civil(date.year, date.month, date.day),
                days,
                "{date:?}"
            );
            assert_eq!(Date::parse_iso(&date.iso()), Some(date));
        }
    }
}
