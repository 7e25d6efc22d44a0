//! Human durations for flags (`1s`, `250ms`, `1.5s`, `2m`, `1h`), and gRPC's
//! `grpc-timeout` values (`100m`, `5S`).

use std::time::Duration;

/// Parses a non-negative duration with a unit: `ms`, `s`, `m` or `h`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration like 1s, 250ms or 1.5s, got {s:?}");
    let split = s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(err)?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.checked_mul(3600)?),
        b"M" => Duration::from_secs(n.checked_mul(60)?),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d` in the finest unit whose count fits the 8 digits gRPC
/// allows (microseconds up to 100 s, then milliseconds, seconds, minutes, hours), rounded
/// down and at least 1, written into `buf`; returns the written part.
pub fn format_grpc_timeout(d: Duration, buf: &mut [u8; 9]) -> &[u8] {
    const MAX: u128 = 99_999_999;
    let secs = u128::from(d.as_secs());
    let units = [(d.as_micros(), b'u'), (d.as_millis(), b'm'), (secs, b'S'), (secs / 60, b'M'), (secs / 3600, b'H')];
    let (n, unit) = units.into_iter().find(|(n, _)| *n <= MAX).unwrap_or((MAX, b'H'));
    let mut n = n.max(1);
    let mut i = buf.len() - 1;
    buf[i] = unit;
    while n > 0 {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_read_and_write_back() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        for bad in [&b"m"[..], b"100", b"1x", b"123456789m", b"-1m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut buf = [0; 9];
        assert_eq!(format_grpc_timeout(Duration::from_millis(990), &mut buf), b"990000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(1000), &mut buf), b"1000000m");
        assert_eq!(format_grpc_timeout(Duration::ZERO, &mut buf), b"1u");
    }

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "1", "s", "-1s", "1d", "1 sec", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
