//! Prometheus-style histograms recorded by concurrent calls without a lock, and a
//! fixed-capacity table of them keyed by a small number (a method's row and a status
//! code), filled on first use. A histogram is allocated once, when its key is first
//! recorded; recording into it after that is two atomic adds and a search of a short
//! array.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering::Relaxed},
};

/// Bucket bounds for durations, in microseconds: the boundaries gRFC A66 recommends
/// for its latency histograms (10 µs to 100 s).
pub const SECONDS: &[u64] = &[
    10,
    50,
    100,
    300,
    600,
    800,
    1_000,
    2_000,
    3_000,
    4_000,
    5_000,
    6_000,
    8_000,
    10_000,
    13_000,
    16_000,
    20_000,
    25_000,
    30_000,
    40_000,
    50_000,
    65_000,
    80_000,
    100_000,
    130_000,
    160_000,
    200_000,
    250_000,
    300_000,
    400_000,
    500_000,
    650_000,
    800_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
];

/// Bucket bounds for small counts: retries, transparent retries and hedges per call.
pub const COUNTS: &[u64] = &[1, 2, 3, 4, 5];

#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive), ascending; one more bucket holds what is above.
    bounds: &'static [u64],
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A histogram as read: per-bucket counts, not cumulative, the last one above every
/// bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub bounds: &'static [u64],
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl Reading {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, samples at or below it)` for each bound, then `(None, count)`:
    /// Prometheus' cumulative `le` buckets.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        let bounds = self.bounds.iter().map(|&b| Some(b)).chain([None]);
        bounds.zip(self.counts.iter().scan(0, |acc, &n| {
            *acc += n;
            Some(*acc)
        }))
    }
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    pub fn record(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Read while others record: each count is exact, the sum may lag them by the
    /// samples landing meanwhile.
    pub fn read(&self) -> Reading {
        Reading {
            bounds: self.bounds,
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// A slot of a [`Table`]: a key and its histogram, once set.
type Entry = OnceLock<Box<(u32, Histogram)>>;

/// Histograms by key, at most a fixed number; a key's histogram is made the first time
/// it is recorded. Open addressing: a key lives at or after its hash's slot, before the
/// first slot still free, and slots are never emptied.
#[derive(Debug)]
pub struct Table {
    bounds: &'static [u64],
    slots: Box<[Entry]>,
    /// Samples refused because every slot holds another key.
    refused: AtomicU64,
}

impl Table {
    pub fn new(bounds: &'static [u64], capacity: usize) -> Self {
        Table { bounds, slots: (0..capacity.max(1)).map(|_| OnceLock::new()).collect(), refused: AtomicU64::new(0) }
    }

    /// Records `value` under `key`; counted as refused when the table is full.
    pub fn record(&self, key: u32, value: u64) {
        match self.find(key) {
            Some(h) => h.record(value),
            None => {
                self.refused.fetch_add(1, Relaxed);
            }
        }
    }

    fn find(&self, key: u32) -> Option<&Histogram> {
        // Fibonacci hashing spreads neighbouring keys (a row's codes) apart.
        let start = (u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize;
        for i in 0..self.slots.len() {
            let slot = &self.slots[(start + i) % self.slots.len()];
            let entry = slot.get_or_init(|| Box::new((key, Histogram::new(self.bounds))));
            if entry.0 == key {
                return Some(&entry.1);
            }
        }
        None
    }

    /// Every key recorded so far with its histogram, in slot order.
    pub fn read(&self) -> Vec<(u32, Reading)> {
        self.slots.iter().filter_map(|s| s.get().map(|e| (e.0, e.1.read()))).collect()
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new(COUNTS);
        for v in [1, 1, 2, 5, 6, 100] {
            h.record(v);
        }
        let r = h.read();
        assert_eq!(r.counts, [2, 1, 0, 0, 1, 2]);
        assert_eq!((r.sum, r.count()), (115, 6));
        let le: Vec<_> = r.cumulative().collect();
        assert_eq!(le, [(Some(1), 2), (Some(2), 3), (Some(3), 3), (Some(4), 3), (Some(5), 4), (None, 6)]);
    }

    #[test]
    fn a_bound_is_inclusive_as_prometheus_le_is() {
        let h = Histogram::new(SECONDS);
        h.record(1_000); // exactly 1 ms: in le="0.001"
        h.record(1_001);
        let r = h.read();
        let at = SECONDS.iter().position(|&b| b == 1_000).unwrap();
        assert_eq!((r.counts[at], r.counts[at + 1]), (1, 1));
    }

    #[test]
    fn a_full_table_refuses_new_keys_and_keeps_recording_old_ones() {
        let t = Table::new(COUNTS, 4);
        for key in 0..6 {
            t.record(key, 1);
        }
        t.record(2, 3);
        let read = t.read();
        assert_eq!(read.len(), 4);
        assert_eq!(t.refused(), 2);
        let two = read.iter().find(|(k, _)| *k == 2).expect("kept");
        assert_eq!(two.1.counts, [1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn concurrent_recorders_lose_nothing() {
        let t = Table::new(SECONDS, 64);
        std::thread::scope(|s| {
            for n in 0..4u64 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        t.record((i % 8) as u32, n * 1_000 + i % 7);
                    }
                });
            }
        });
        let read = t.read();
        assert_eq!(read.len(), 8);
        assert_eq!(read.iter().map(|(_, r)| r.count()).sum::<u64>(), 40_000);
    }
}
