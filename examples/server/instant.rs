//! Points in time as FHIR `instant` strings and HTTP dates. Times are kept as milliseconds since
//! the Unix epoch so `_since` is an integer comparison; the calendar arithmetic is done here
//! rather than pulling in a date crate for two conversions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since 1970-01-01T00:00:00Z.
pub(crate) type Millis = i64;

const MS_PER_DAY: i64 = 86_400_000;

pub(crate) fn now() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// `2024-03-01T12:34:56.789Z`: always UTC with milliseconds, which sorts as text too.
pub(crate) fn format(ms: Millis) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// The `Last-Modified` form, e.g. `Fri, 01 Mar 2024 12:34:56 GMT`.
pub(crate) fn http_date(ms: Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    httpdate::fmt_http_date(t)
}

/// Parses a FHIR `instant` (`YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm)`), or a bare date taken as
/// midnight UTC. Returns `None` for anything else.
pub(crate) fn parse(text: &str) -> Option<Millis> {
    let text = text.trim();
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (number(y)?, number(m)?, number(d)?);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    let day_ms = days_from_civil(y, m, d) * MS_PER_DAY;
    let Some(time) = time else {
        return Some(day_ms);
    };

    // An unencoded `+` in a query string decodes to a space, so `+01:00` may arrive as ` 01:00`.
    let zone_at = time.find(['Z', 'z', '+', '-', ' '])?;
    let (clock, zone) = time.split_at(zone_at);
    let offset_ms = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, mm) = zone[1..].split_once(':')?;
            if h.len() != 2 || mm.len() != 2 {
                return None;
            }
            let (h, mm): (i64, i64) = (number(h)?, number(mm)?);
            if h > 14 || mm > 59 {
                return None;
            }
            sign * (h * 3_600_000 + mm * 60_000)
        }
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, fraction)) => (hms, Some(fraction)),
        None => (clock, None),
    };
    let mut hms = hms.split(':');
    let (h, mi, s) = (hms.next()?, hms.next()?, hms.next()?);
    if hms.next().is_some() || h.len() != 2 || mi.len() != 2 || s.len() != 2 {
        return None;
    }
    let (h, mi, s): (i64, i64, i64) = (number(h)?, number(mi)?, number(s)?);
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let millis = match fraction {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            // Only the first three digits matter at millisecond resolution.
            let digits: String = f.chars().chain("000".chars()).take(3).collect();
            number::<i64>(&digits)?
        }
        Some(_) => return None,
    };
    Some(day_ms + h * 3_600_000 + mi * 60_000 + s * 1000 + millis - offset_ms)
}

fn number<T: std::str::FromStr>(digits: &str) -> Option<T> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's `days_from_civil` / `civil_from_days` (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_offsets() {
        let t = parse("2024-02-29T23:59:58.5Z").unwrap();
        assert_eq!(format(t), "2024-02-29T23:59:58.500Z");
        assert_eq!(parse("1970-01-01").unwrap(), 0);
        assert_eq!(parse("1970-01-01T01:00:00+01:00").unwrap(), 0);
        assert_eq!(parse("1970-01-01T01:00:00 01:00").unwrap(), 0);
        assert_eq!(parse("1969-12-31T23:00:00-01:00").unwrap(), 0);
        assert!(parse("2023-02-29").is_none());
        assert!(parse("2024-01-01T10:00:00").is_none());
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
