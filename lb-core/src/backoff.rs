//! Reconnect backoff: exponential with jitter, pure (the RNG is an argument).
//!
//! The cap is low on purpose: a replica that restarts must be back in rotation within
//! 300 ms of accepting connections, so no wait may exceed [`Backoff::MAX`].

use std::time::Duration;

use crate::rng::Rng;

/// Delays of `d/2 + random(0..=d/2)` where `d = min(base · 2^n, max)`; by default
/// `base` is [`Backoff::BASE`] and `max` [`Backoff::MAX`], the reconnect delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failures since the last successful connection.
    failures: u32,
    base: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Self::BASE, Self::MAX)
    }
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_millis(200);

    /// Other delays than reconnecting's, e.g. re-opening a health watch.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { failures: 0, base, max }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let exp = self.base.saturating_mul(1 << self.failures.min(16));
        let d = exp.min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = d.as_micros() as u64 / 2;
        Duration::from_micros(half + rng.below(half + 1))
    }

    /// A connection succeeded: start again from the base.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::rng::tests::Top;

    /// Always the bottom.
    struct Zero;
    impl Rng for Zero {
        fn next_u64(&mut self) -> u64 {
            0
        }
    }

    #[test]
    fn doubles_up_to_the_cap_with_upper_jitter() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..7).map(|_| b.next_delay(&mut Top).as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 200, 200]);
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..7).map(|_| b.next_delay(&mut Zero).as_millis()).collect();
        assert_eq!(ms, [5, 10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let mut b = Backoff::default();
        let mut rng = SplitMix64::seeded(7);
        for n in 0..50u32 {
            let d = b.next_delay(&mut rng);
            let full = (Backoff::BASE * (1 << n.min(16))).min(Backoff::MAX);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?} outside {full:?}");
        }
    }

    #[test]
    fn other_bounds_for_other_waits() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ms: Vec<u128> = (0..6).map(|_| b.next_delay(&mut Top).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay(&mut Zero);
        }
        b.reset();
        assert_eq!(b.next_delay(&mut Zero), Duration::from_millis(5));
    }
}
