//! `X-Amz-Date`: the ISO 8601 basic form `YYYYMMDDTHHMMSSZ`, parsed strictly.
//!
//! Strict because the date is part of what the signature covers and of the credential scope: a
//! lenient parser (signs, spaces, day 31 of November, second 60) would let two spellings name
//! one instant, or none.

use std::time::{SystemTime, UNIX_EPOCH};

/// `20150830T123600Z` -> seconds since the epoch; `None` unless the text is exactly 8 digits,
/// `T`, 6 digits, `Z`, naming a real calendar date and a time with hours < 24, minutes < 60
/// and seconds < 60.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (y, mo, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (h, mi, se) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return None;
    }
    if h > 23 || mi > 59 || se > 59 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// `SystemTime` as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_epoch_secs(secs)
}

/// Seconds since the epoch as `YYYYMMDDTHHMMSSZ`.
pub fn format_epoch_secs(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The inverse of `days_from_civil`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_inverts_parsing() {
        for s in [
            "19700101T000000Z",
            "20150830T123600Z",
            "20240229T235959Z",
            "20000229T000000Z",
            "21000301T010203Z",
            "99991231T235959Z",
        ] {
            assert_eq!(format_epoch_secs(parse_amz_date(s).unwrap()), s);
        }
    }

    #[test]
    fn dates_convert_to_epoch_seconds() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1440938160));
    }

    #[test]
    fn anything_but_the_basic_form_is_refused() {
        for s in [
            "2015-08-30T12:36:00Z",
            "202612+1T123600Z",
            "2026120+T123600Z",
            "+0261201T123600Z",
            "20261201T+23600Z",
            "20261201T12360+Z",
            "20261201T 23600Z",
            "20261201t123600Z",
            "20261201T123600z",
            "20261201T123600",
            "20261201T1236000Z",
            "20261201T123600Z ",
            "",
            "２０１５0830T123600Z",
        ] {
            assert_eq!(parse_amz_date(s), None, "{s:?}");
        }
    }

    #[test]
    fn impossible_dates_and_times_are_refused() {
        for s in [
            "20261131T000000Z", // 31 November
            "20250229T000000Z", // not a leap year
            "21000229T000000Z", // century, not a leap year
            "20261301T000000Z",
            "20260001T000000Z",
            "20260100T000000Z",
            "20260132T000000Z",
            "20261201T240000Z",
            "20261201T236000Z",
            "20261201T235960Z", // no leap seconds
            "20261201T999999Z",
        ] {
            assert_eq!(parse_amz_date(s), None, "{s:?}");
        }
        for s in ["20240229T000000Z", "20000229T000000Z", "20261130T235959Z"] {
            assert!(parse_amz_date(s).is_some(), "{s:?}");
        }
    }
}
