//! The retry throttle of gRFC A6: one token bucket per target, shared by every call. A
//! failed attempt costs a token, a successful call earns `tokenRatio`; retries and
//! hedges stop while the bucket holds half its capacity or less. Kept in thousandths,
//! as A6 does, so it is exact; lock-free, so calls share it without a mutex. Whoever
//! wants to hear it stop and start retries (an event log) passes a callback.

use std::sync::atomic::{AtomicU32, Ordering};

/// Told `(allows, tokens)` each time the throttle stops or starts allowing retries.
pub type OnChange = Box<dyn Fn(bool, u32) + Send + Sync>;

pub struct Throttle {
    /// Capacity, in thousandths of a token.
    max: u32,
    /// What a success earns, in thousandths.
    ratio: u32,
    tokens: AtomicU32,
    on_change: Option<OnChange>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("max", &self.max)
            .field("ratio", &self.ratio)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Throttle {
    /// A full bucket. The config parser has checked `0 < max_tokens <= 1000` and that
    /// `token_ratio` keeps at least one thousandth.
    pub fn new(max_tokens: f64, token_ratio: f64) -> Self {
        let max = (max_tokens * 1000.0).round() as u32;
        Throttle { max, ratio: (token_ratio * 1000.0).round() as u32, tokens: AtomicU32::new(max), on_change: None }
    }

    /// Calls `f(allows, tokens)` whenever the throttle stops or starts allowing retries,
    /// from the call whose outcome crossed the line.
    pub fn on_change(mut self, f: OnChange) -> Self {
        self.on_change = Some(f);
        self
    }

    /// Capacity, in thousandths of a token.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// An attempt failed with a retryable (or non-fatal) status.
    pub fn on_failure(&self) {
        self.update(|t| t.saturating_sub(1000));
    }

    /// A call succeeded, whatever its method's policy.
    pub fn on_success(&self) {
        self.update(|t| t.saturating_add(self.ratio).min(self.max));
    }

    /// Whether a retry or hedge may be sent now.
    pub fn allows(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > self.max / 2
    }

    /// Tokens left, in thousandths.
    pub fn tokens(&self) -> u32 {
        self.tokens.load(Ordering::Relaxed)
    }

    fn update(&self, f: impl Fn(u32) -> u32) {
        let Ok(was) = self.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(f(t))) else { return };
        let now = f(was);
        let half = self.max / 2;
        if let Some(tell) = &self.on_change
            && (was > half) != (now > half)
        {
            tell(now > half, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_half_and_recovers_by_the_ratio() {
        let t = Throttle::new(10.0, 0.5);
        for _ in 0..4 {
            t.on_failure();
        }
        assert!(t.allows(), "6 of 10 tokens left");
        t.on_failure();
        assert!(!t.allows(), "5 of 10: no more retries");
        t.on_success();
        assert!(t.allows(), "5.5 of 10");
        for _ in 0..100 {
            t.on_success();
        }
        assert_eq!(t.tokens(), 10_000);
        for _ in 0..100 {
            t.on_failure();
        }
        assert_eq!(t.tokens(), 0);
    }

    #[test]
    fn tells_each_crossing_of_the_half_once() {
        use std::sync::{Arc, Mutex};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let t = Throttle::new(4.0, 1.0)
            .on_change(Box::new(move |allows, tokens| log.lock().unwrap().push((allows, tokens))));
        for _ in 0..4 {
            t.on_failure(); // 3, 2 (stops), 1, 0
        }
        for _ in 0..4 {
            t.on_success(); // 1, 2, 3 (starts), 4
        }
        assert_eq!(*seen.lock().unwrap(), [(false, 2_000), (true, 3_000)]);
    }
}
