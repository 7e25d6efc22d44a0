//! Human durations for flags: `1s`, `250ms`, `1.5s`, `2m`, `1h`.

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

#[cfg(test)]
mod tests {
    use super::*;

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
