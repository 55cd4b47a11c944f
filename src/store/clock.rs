//! UTC calendar time from `SystemTime`, for backup names and `--list` output.
//!
//! Backup directory names carry a UTC timestamp (`backup-YYYYMMDD-HHMMSS`). The crate has no
//! date library and this needs only the proleptic Gregorian conversion from a day count,
//! so it is done here (Howard Hinnant's `civil_from_days`) and unit-tested against known
//! dates.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time of day, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// The calendar date (year, month 1–12, day 1–31) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31 and 1..=12).
    (year, month as u32, day as u32)
}

impl Utc {
    /// The UTC time `secs` seconds after the Unix epoch (negative: before it).
    pub fn from_unix(secs: i64) -> Utc {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Utc {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }

    /// A `SystemTime` in UTC (times before 1970 are clamped to the epoch).
    pub fn from_system(time: SystemTime) -> Utc {
        let secs = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
        Utc::from_unix(secs)
    }

    /// The current time.
    pub fn now() -> Utc {
        Utc::from_system(SystemTime::now())
    }

    /// `YYYYMMDD-HHMMSS`, as in backup names.
    pub fn compact(&self) -> String {
        format!(
            "{:04}{:02}{:02}-{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `YYYY-MM-DD HH:MM:SS`, for listings.
    pub fn readable(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1)); // 2100 is not a leap year
    }

    #[test]
    fn formats() {
        // 2025-11-23 12:00:00 UTC, the example backup name in the rotation guide.
        let t = Utc::from_unix(1_763_899_200);
        assert_eq!(t.compact(), "20251123-120000");
        assert_eq!(t.readable(), "2025-11-23 12:00:00");
        assert_eq!(Utc::from_unix(86_399).compact(), "19700101-235959");
        assert_eq!(
            Utc::from_unix(1_709_251_199).readable(),
            "2024-02-29 23:59:59"
        );
    }

    #[test]
    fn every_day_follows_the_previous_one() {
        // Walk 1900..2200 and check the calendar advances by exactly one day each time.
        let mut prev = civil_from_days(-25_567); // 1900-01-01
        assert_eq!(prev, (1900, 1, 1));
        for days in -25_566..84_000 {
            let next = civil_from_days(days);
            let same_month = next.0 == prev.0 && next.1 == prev.1 && next.2 == prev.2 + 1;
            let new_month = next.0 == prev.0 && next.1 == prev.1 + 1 && next.2 == 1;
            let new_year = next.0 == prev.0 + 1 && next.1 == 1 && next.2 == 1 && prev.1 == 12;
            assert!(same_month || new_month || new_year, "{prev:?} -> {next:?}");
            prev = next;
        }
    }
}
