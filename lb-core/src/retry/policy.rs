//! When a failed attempt is retried, and after how long (gRFC A6). Pure: the caller
//! passes the status, the server's pushback, whether the throttle allows it, and an RNG.

use std::time::Duration;

use crate::code::Code;

use crate::rng::Rng;

/// A set of status codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodeSet(u32);

impl CodeSet {
    pub fn insert(&mut self, code: Code) {
        self.0 |= 1 << (code as u32);
    }
    pub fn contains(&self, code: Code) -> bool {
        self.0 & (1 << (code as u32)) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Code> for CodeSet {
    fn from_iter<I: IntoIterator<Item = Code>>(iter: I) -> Self {
        let mut s = CodeSet::default();
        iter.into_iter().for_each(|c| s.insert(c));
        s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (already clamped).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub retryable: CodeSet,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    pub max_attempts: u32,
    /// Between one attempt and the next.
    pub delay: Duration,
    /// Codes that let the other attempts go on; any other failure ends the call.
    pub non_fatal: CodeSet,
}

impl HedgingPolicy {
    pub fn is_fatal(&self, code: Code) -> bool {
        code != Code::Ok && !self.non_fatal.contains(code)
    }
}

/// What a server asked for with `grpc-retry-pushback-ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// No header: use the policy's backoff.
    None,
    /// Retry after exactly this long.
    After(Duration),
    /// Negative or unparsable: do not retry.
    Stop,
}

impl Pushback {
    pub fn parse(header: Option<&[u8]>) -> Pushback {
        let Some(v) = header else { return Pushback::None };
        // An int32 of milliseconds; anything else (negative, too large, not a number)
        // means "do not retry", as gRPC reads it.
        match std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
            Some(ms) if ms >= 0 => Pushback::After(Duration::from_millis(ms as u64)),
            _ => Pushback::Stop,
        }
    }
}

/// The decision after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Retry { after: Duration },
    Stop(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    NotRetryable,
    Exhausted,
    Pushback,
    Throttled,
}

/// One call's progress through its retry policy.
#[derive(Debug, Clone)]
pub struct RetryState {
    /// Attempts made so far (the first included).
    pub attempts: u32,
    /// The exponent for the next backoff; a pushback starts it over.
    backoff_n: u32,
}

impl Default for RetryState {
    fn default() -> Self {
        RetryState { attempts: 1, backoff_n: 0 }
    }
}

impl RetryState {
    /// Decides after an attempt failed with `code`. On `Retry`, counts the next attempt.
    pub fn next(
        &mut self,
        p: &RetryPolicy,
        code: Code,
        pushback: Pushback,
        throttle_allows: bool,
        rng: &mut impl Rng,
    ) -> Verdict {
        let stop = if !p.retryable.contains(code) {
            Some(StopReason::NotRetryable)
        } else if self.attempts >= p.max_attempts {
            Some(StopReason::Exhausted)
        } else if pushback == Pushback::Stop {
            Some(StopReason::Pushback)
        } else if !throttle_allows {
            Some(StopReason::Throttled)
        } else {
            None
        };
        if let Some(reason) = stop {
            return Verdict::Stop(reason);
        }
        self.attempts += 1;
        let after = match pushback {
            Pushback::After(d) => {
                self.backoff_n = 0;
                d
            }
            _ => {
                // In f64 seconds: initial · multiplier^n overflows Duration long before
                // the cap applies (a multiplier of 1e7 after three retries).
                let exp = p.initial_backoff.as_secs_f64() * p.multiplier.powi(self.backoff_n.min(1024) as i32);
                let cap = Duration::try_from_secs_f64(exp).map_or(p.max_backoff, |d| d.min(p.max_backoff));
                self.backoff_n = self.backoff_n.saturating_add(1);
                Duration::from_nanos(rng.below(cap.as_nanos() as u64 + 1))
            }
        };
        Verdict::Retry { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::tests::Top;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            retryable: [Code::Unavailable].into_iter().collect(),
        }
    }

    fn after(v: Verdict) -> u128 {
        match v {
            Verdict::Retry { after } => after.as_millis(),
            Verdict::Stop(r) => panic!("stopped: {r:?}"),
        }
    }

    #[test]
    fn backs_off_exponentially_up_to_the_cap_then_stops_at_max_attempts() {
        let (p, mut s) = (policy(), RetryState::default());
        let ms: Vec<u128> =
            (0..4).map(|_| after(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top))).collect();
        // The top of random(0, min(100·2^(n-1), 500)).
        assert_eq!(ms, [100, 200, 400, 500]);
        assert_eq!(s.attempts, 5);
        assert_eq!(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top), Verdict::Stop(StopReason::Exhausted));
    }

    #[test]
    fn only_listed_codes_are_retried() {
        let mut s = RetryState::default();
        let v = s.next(&policy(), Code::NotFound, Pushback::None, true, &mut Top);
        assert_eq!(v, Verdict::Stop(StopReason::NotRetryable));
        assert_eq!(s.attempts, 1);
    }

    #[test]
    fn pushback_replaces_the_delay_and_restarts_the_exponent() {
        let (p, mut s) = (policy(), RetryState::default());
        after(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top));
        let v = s.next(&p, Code::Unavailable, Pushback::After(Duration::from_millis(1234)), true, &mut Top);
        assert_eq!(after(v), 1234);
        assert_eq!(after(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top)), 100);
        let v = s.next(&p, Code::Unavailable, Pushback::Stop, true, &mut Top);
        assert_eq!(v, Verdict::Stop(StopReason::Pushback));
    }

    #[test]
    fn a_huge_multiplier_saturates_at_the_cap() {
        let p = RetryPolicy { multiplier: 1e7, ..policy() };
        let mut s = RetryState::default();
        let ms: Vec<u128> =
            (0..4).map(|_| after(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top))).collect();
        assert_eq!(ms, [100, 500, 500, 500]);
        let p = RetryPolicy { multiplier: f64::MAX, max_attempts: 100, ..policy() };
        let mut s = RetryState::default();
        for _ in 0..50 {
            assert!(after(s.next(&p, Code::Unavailable, Pushback::None, true, &mut Top)) <= 500);
        }
    }

    #[test]
    fn the_throttle_stops_retries() {
        let v = RetryState::default().next(&policy(), Code::Unavailable, Pushback::None, false, &mut Top);
        assert_eq!(v, Verdict::Stop(StopReason::Throttled));
    }

    #[test]
    fn parses_pushback_headers() {
        assert_eq!(Pushback::parse(None), Pushback::None);
        assert_eq!(Pushback::parse(Some(b"250")), Pushback::After(Duration::from_millis(250)));
        assert_eq!(Pushback::parse(Some(b"-1")), Pushback::Stop);
        assert_eq!(Pushback::parse(Some(b"soon")), Pushback::Stop);
        assert_eq!(Pushback::parse(Some(b"\xff")), Pushback::Stop);
        assert_eq!(Pushback::parse(Some(b"2147483647")), Pushback::After(Duration::from_millis(i32::MAX as u64)));
        assert_eq!(Pushback::parse(Some(b"2147483648")), Pushback::Stop, "above int32");
        assert_eq!(Pushback::parse(Some(b"99999999999999999999999")), Pushback::Stop);
    }

    #[test]
    fn hedging_fatality() {
        let h = HedgingPolicy {
            max_attempts: 3,
            delay: Duration::ZERO,
            non_fatal: [Code::Unavailable].into_iter().collect(),
        };
        assert!(!h.is_fatal(Code::Unavailable));
        assert!(h.is_fatal(Code::NotFound));
        assert!(!h.is_fatal(Code::Ok));
    }
}
