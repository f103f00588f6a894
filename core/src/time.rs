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
