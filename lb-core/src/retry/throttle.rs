//! The retry throttle of gRFC A6: one token bucket per target. A failed attempt costs
//! a token, a success earns `tokenRatio`; retries and hedges stop while the bucket holds
//! half its capacity or less. Kept in thousandths, as A6 does, so it is exact.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    max: u32,
    ratio: u32,
    tokens: u32,
}

impl Throttle {
    pub fn new(max_tokens: f64, token_ratio: f64) -> Self {
        let max = (max_tokens * 1000.0).round() as u32;
        Throttle { max, ratio: (token_ratio * 1000.0).round() as u32, tokens: max }
    }

    /// An attempt failed with a retryable (or non-fatal) status.
    pub fn on_failure(&mut self) {
        self.tokens = self.tokens.saturating_sub(1000);
    }

    pub fn on_success(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.max);
    }

    /// Whether a retry or hedge may be sent now.
    pub fn allows(&self) -> bool {
        self.tokens > self.max / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_half_and_recovers_by_the_ratio() {
        let mut t = Throttle::new(10.0, 0.5);
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
        assert_eq!(t, Throttle { max: 10_000, ratio: 500, tokens: 10_000 });
        for _ in 0..100 {
            t.on_failure();
        }
        assert_eq!(t.tokens, 0);
    }
}
