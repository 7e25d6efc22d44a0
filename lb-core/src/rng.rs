//! The randomness the pure parts take as an argument, so tests can seed it.

/// A source of random numbers.
pub trait Rng {
    fn next_u64(&mut self) -> u64;

    /// A uniform value in `0..n` (`0` when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// SplitMix64: tiny, fast, and good enough for jitter.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn seeded(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Seeded from the process's hash keys, which the OS randomizes.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, RandomState};
        SplitMix64(RandomState::new().hash_one(0u64))
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Rng;

    /// Always the top of the range asked for: the longest delays.
    pub(crate) struct Top;

    impl Rng for Top {
        fn next_u64(&mut self) -> u64 {
            u64::MAX
        }
        fn below(&mut self, n: u64) -> u64 {
            n.saturating_sub(1)
        }
    }
}
