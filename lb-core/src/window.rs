//! Calls per second and latency percentiles over the last ten seconds, recorded by
//! concurrent calls without a lock and read by the admin API. Pure: the second a
//! sample belongs to is passed in.
//!
//! Ten one-second slots, each a count and a latency histogram. A slot is reused when
//! its second comes round again and is cleared by the first sample of the new second;
//! samples racing that clear may be lost or counted in the wrong second, which the
//! figures shown (a rate and two percentiles) can bear.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Seconds covered.
pub const SECONDS: u64 = 10;

/// Buckets per power of two: each is at most 1/4 wider than the one before (about
/// 19 % error at worst).
const SUB: u32 = 4;
/// Latencies up to about 9 minutes; longer ones land in the last bucket.
const BUCKETS: usize = 28 * SUB as usize;

#[derive(Debug)]
struct Slot {
    /// The second its counts are for.
    second: AtomicU64,
    count: AtomicU64,
    buckets: [AtomicU32; BUCKETS],
}

/// What the window says now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Samples per second over the last [`SECONDS`] seconds, the current one included.
    pub rate: f64,
    /// Latency percentiles in milliseconds; `None` without samples.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug)]
pub struct Window {
    slots: [Slot; SECONDS as usize],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            slots: std::array::from_fn(|_| Slot {
                second: AtomicU64::new(u64::MAX),
                count: AtomicU64::new(0),
                buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            }),
        }
    }
}

impl Window {
    /// A sample of `micros` taken during second `now`.
    pub fn record(&self, now: u64, micros: u64) {
        let slot = &self.slots[(now % SECONDS) as usize];
        if slot.second.load(Relaxed) != now && slot.second.swap(now, Relaxed) != now {
            slot.count.store(0, Relaxed);
            for b in &slot.buckets {
                b.store(0, Relaxed);
            }
        }
        slot.count.fetch_add(1, Relaxed);
        slot.buckets[bucket(micros)].fetch_add(1, Relaxed);
    }

    /// The last [`SECONDS`] seconds up to and including second `now`.
    pub fn summary(&self, now: u64) -> Summary {
        let mut merged = [0u64; BUCKETS];
        let mut count = 0;
        for slot in &self.slots {
            let second = slot.second.load(Relaxed);
            if second <= now && now - second < SECONDS {
                count += slot.count.load(Relaxed);
                for (m, b) in merged.iter_mut().zip(&slot.buckets) {
                    *m += u64::from(b.load(Relaxed));
                }
            }
        }
        let total: u64 = merged.iter().sum();
        let quantile = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            merged.iter().position(|n| {
                seen += n;
                seen >= rank
            })
        };
        let ms = |i: Option<usize>| i.filter(|_| total > 0).map(|i| upper(i) as f64 / 1000.0);
        Summary { rate: count as f64 / SECONDS as f64, p50_ms: ms(quantile(0.5)), p99_ms: ms(quantile(0.99)) }
    }
}

/// The bucket of `micros`: below 4 µs one each, then [`SUB`] per power of two.
fn bucket(micros: u64) -> usize {
    if micros < u64::from(SUB) {
        return micros as usize;
    }
    let log = 63 - micros.leading_zeros(); // ≥ 2
    let sub = (micros >> (log - 2)) & u64::from(SUB - 1);
    (((log - 1) * SUB) as usize + sub as usize).min(BUCKETS - 1)
}

/// The largest latency in bucket `i`, in microseconds: what a percentile reports.
fn upper(i: usize) -> u64 {
    let sub = SUB as usize;
    if i < sub {
        return i as u64;
    }
    let log = (i / sub + 1) as u32;
    let part = (i % sub) as u64;
    ((u64::from(SUB) + part + 1) << (log - 2)) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order_with_bounded_width() {
        let mut last = 0;
        for us in [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 999, 1000, 1500, 65_535, 1 << 20, u64::MAX] {
            let b = bucket(us);
            assert!(b >= last, "{us} µs");
            assert!(upper(b) >= us.min(upper(BUCKETS - 1)), "{us} µs in bucket {b} up to {}", upper(b));
            last = b;
        }
        for us in 4..100_000u64 {
            let up = upper(bucket(us));
            assert!(up >= us && up as f64 <= us as f64 * 1.25 + 1.0, "{us} µs reported as {up}");
        }
    }

    #[test]
    fn rate_and_percentiles_over_the_last_ten_seconds() {
        let w = Window::default();
        assert_eq!(w.summary(5), Summary { rate: 0.0, p50_ms: None, p99_ms: None });
        for second in 1..=10 {
            for i in 0..100u64 {
                // 99 of every 100 calls take 1 ms, one takes 100 ms.
                w.record(second, if i == 0 { 100_000 } else { 1_000 });
            }
        }
        let s = w.summary(10);
        assert_eq!(s.rate, 100.0);
        assert!(s.p50_ms.is_some_and(|p| (1.0..1.25).contains(&p)), "{s:?}");
        assert!(s.p99_ms.is_some_and(|p| (1.0..1.25).contains(&p)), "exactly 1 % took longer: {s:?}");
        w.record(11, 5_000_000);
        let later = w.summary(11);
        assert_eq!(later.rate, 90.1, "second 1 left the window, second 11 came in");
        assert!(later.p99_ms.is_some_and(|p| (100.0..125.0).contains(&p)), "now over 1 %: {later:?}");
        assert!(w.summary(25).p50_ms.is_none(), "all of it is old by then");
    }

    #[test]
    fn a_slot_reused_a_round_later_starts_clean() {
        let w = Window::default();
        w.record(3, 1_000);
        w.record(13, 2_000);
        let s = w.summary(13);
        assert_eq!(s.rate, 0.1);
        assert!(s.p50_ms.is_some_and(|p| (2.0..2.5).contains(&p)), "{s:?}");
    }
}
