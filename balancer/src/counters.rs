//! Per-method counters of what the call path did (attempts, retries, hedges, throttled,
//! committed by the buffer limit, outcomes), logged at debug level every 10 s while
//! they change. Bounded whatever paths clients send: a method gets its own row once a
//! call to it has succeeded, up to [`MAX_METHODS`]; every other call counts as `other`.
//!
//! Lock-free: a fixed table of rows of atomics, found by hashing the path (open
//! addressing). A row's name is set once, by the first successful call to its method;
//! a row's duration histogram for a status is made by the first call ending with it;
//! recording a call allocates nothing after that.
//!
//! A row also holds what gRFC A66 and A96 measure per call: its duration by status,
//! and how many retries, transparent retries and hedges it took (when it took any).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use lb_core::{
    Code,
    call::Stats,
    histogram::{COUNTS, Histogram, Reading, SECONDS},
};
use tracing::debug;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodCounters {
    pub calls: u64,
    pub attempts: u64,
    pub retries: u64,
    pub hedges: u64,
    /// Transparent retries of attempts never sent or refused unprocessed.
    pub replays: u64,
    pub throttled: u64,
    pub committed_by_buffer: u64,
    /// Final outcome: the status code's name.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Call durations (µs) by status code name.
    pub durations: BTreeMap<&'static str, Reading>,
    /// Per call that had any: retries, transparent retries, hedges.
    pub retries_per_call: Reading,
    pub transparent_retries_per_call: Reading,
    pub hedges_per_call: Reading,
}

/// A method's row: its own, or [`MethodRow::OTHER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRow(pub u16);

impl MethodRow {
    pub const OTHER: MethodRow = MethodRow(MAX_METHODS as u16);
}

/// Rows with a method of their own, at most.
pub const MAX_METHODS: usize = 256;

/// The row for calls to methods without one of their own.
pub const OTHER: &str = "other";

#[derive(Debug)]
struct Row {
    calls: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    replays: AtomicU64,
    throttled: AtomicU64,
    committed_by_buffer: AtomicU64,
    /// By status code number.
    outcomes: [AtomicU64; 17],
    /// Call durations by status code number, made by the first call ending with it.
    durations: [OnceLock<Box<Histogram>>; 17],
    retries_per_call: Histogram,
    transparent_retries_per_call: Histogram,
    hedges_per_call: Histogram,
}

impl Default for Row {
    fn default() -> Self {
        Row {
            calls: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            committed_by_buffer: AtomicU64::new(0),
            outcomes: Default::default(),
            durations: Default::default(),
            retries_per_call: Histogram::new(COUNTS),
            transparent_retries_per_call: Histogram::new(COUNTS),
            hedges_per_call: Histogram::new(COUNTS),
        }
    }
}

impl Row {
    fn add(&self, s: &Stats, outcome: Code, took: Duration) {
        self.calls.fetch_add(1, Relaxed);
        self.attempts.fetch_add(u64::from(s.attempts), Relaxed);
        for (counter, n) in [
            (&self.retries, s.retries),
            (&self.hedges, s.hedges),
            (&self.replays, s.transparent_retries),
            (&self.throttled, u32::from(s.throttled)),
            (&self.committed_by_buffer, u32::from(s.committed_by_buffer)),
        ] {
            if n > 0 {
                counter.fetch_add(u64::from(n), Relaxed);
            }
        }
        // A96: a call without any is not recorded.
        for (histogram, n) in [
            (&self.retries_per_call, s.retries),
            (&self.transparent_retries_per_call, s.transparent_retries),
            (&self.hedges_per_call, s.hedges),
        ] {
            if n > 0 {
                histogram.record(u64::from(n));
            }
        }
        self.outcomes[outcome as usize].fetch_add(1, Relaxed);
        let durations = self.durations[outcome as usize].get_or_init(|| Box::new(Histogram::new(SECONDS)));
        durations.record(took.as_micros() as u64);
    }

    fn read(&self) -> MethodCounters {
        let outcomes = self
            .outcomes
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = n.load(Relaxed);
                let code = Code::from_i32(code as i32)?;
                (n > 0).then(|| (code.name(), n))
            })
            .collect();
        MethodCounters {
            calls: self.calls.load(Relaxed),
            attempts: self.attempts.load(Relaxed),
            retries: self.retries.load(Relaxed),
            hedges: self.hedges.load(Relaxed),
            replays: self.replays.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            committed_by_buffer: self.committed_by_buffer.load(Relaxed),
            outcomes,
            durations: self
                .durations
                .iter()
                .enumerate()
                .filter_map(|(code, h)| Some((Code::from_i32(code as i32)?.name(), h.get()?.read())))
                .collect(),
            retries_per_call: self.retries_per_call.read(),
            transparent_retries_per_call: self.transparent_retries_per_call.read(),
            hedges_per_call: self.hedges_per_call.read(),
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// Set once, by the first successful call to the method.
    name: OnceLock<Box<str>>,
    row: Row,
}

#[derive(Debug)]
struct Table {
    slots: Box<[Slot]>,
    other: Row,
}

#[derive(Debug, Clone)]
pub struct Counters {
    table: Arc<Table>,
}

impl Default for Counters {
    fn default() -> Self {
        let slots = (0..MAX_METHODS).map(|_| Slot::default()).collect();
        Counters { table: Arc::new(Table { slots, other: Row::default() }) }
    }
}

impl Counters {
    /// The row of `path`: its own if it has one, a new one if `claim` (the call to it
    /// succeeded) and there is room, else [`MethodRow::OTHER`].
    pub fn method(&self, path: &str, claim: bool) -> MethodRow {
        self.table.find(path, claim)
    }

    /// The method a row counts, `other` for [`MethodRow::OTHER`] or a row not claimed.
    pub fn name(&self, row: MethodRow) -> &str {
        self.table.slots.get(usize::from(row.0)).and_then(|s| s.name.get()).map_or(OTHER, |n| n)
    }

    /// A call ended with `outcome` after `took`; it claims `path`'s row when it
    /// succeeded.
    pub fn record(&self, path: &str, s: &Stats, outcome: Code, took: Duration) {
        self.record_row(self.method(path, outcome == Code::Ok), s, outcome, took);
    }

    pub fn record_row(&self, row: MethodRow, s: &Stats, outcome: Code, took: Duration) {
        self.table.row(row).add(s, outcome, took);
    }

    /// Every method with a row, and `other` once a call counted there.
    pub fn snapshot(&self) -> HashMap<String, MethodCounters> {
        self.table.snapshot()
    }

    /// Logs the counters every 10 s when they changed, until the balancer is dropped.
    pub(crate) fn spawn_reporter(&self, target: String) {
        let weak = Arc::downgrade(&self.table);
        tokio::spawn(async move {
            let mut last = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let Some(table) = weak.upgrade() else { return };
                let now = table.snapshot();
                for (method, c) in &now {
                    if last.get(method) != Some(c) {
                        debug!(%target, %method, calls = c.calls, attempts = c.attempts, retries = c.retries,
                            hedges = c.hedges, replays = c.replays, throttled = c.throttled,
                            committed_by_buffer = c.committed_by_buffer, outcomes = ?c.outcomes, "Call counters");
                    }
                }
                last = now;
            }
        });
    }
}

impl Table {
    /// The row of `path`: its own if it has one, a new one if `claim` and there is room,
    /// else `other`. Probes from the path's hash to the first free slot: a method is
    /// always placed before the first slot still free.
    fn find(&self, path: &str, claim: bool) -> MethodRow {
        let start = fnv1a(path) as usize;
        for i in 0..self.slots.len() {
            let at = (start + i) % self.slots.len();
            let slot = &self.slots[at];
            match slot.name.get() {
                Some(name) if **name == *path => return MethodRow(at as u16),
                Some(_) => continue,
                None if !claim => break,
                None => {
                    // Another call may claim it first, for this method or another.
                    if slot.name.set(path.into()).is_ok() || slot.name.get().is_some_and(|n| **n == *path) {
                        return MethodRow(at as u16);
                    }
                }
            }
        }
        MethodRow::OTHER
    }

    fn row(&self, row: MethodRow) -> &Row {
        self.slots.get(usize::from(row.0)).map_or(&self.other, |s| &s.row)
    }

    fn snapshot(&self) -> HashMap<String, MethodCounters> {
        let mut out: HashMap<String, MethodCounters> =
            self.slots.iter().filter_map(|s| s.name.get().map(|n| (n.to_string(), s.row.read()))).collect();
        let other = self.other.read();
        if other.calls > 0 {
            out.insert(OTHER.to_owned(), other);
        }
        out
    }
}

/// FNV-1a (64-bit): fixed, so the table fills the same way from run to run.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_call_records_its_duration_by_status_and_its_retries_only_when_it_had_any() {
        let c = Counters::default();
        let plain = Stats { attempts: 1, ..Stats::default() };
        let retried = Stats { attempts: 3, retries: 2, ..Stats::default() };
        c.record("/a.B/M", &plain, Code::Ok, Duration::from_micros(900));
        c.record("/a.B/M", &retried, Code::Ok, Duration::from_millis(40));
        c.record("/a.B/M", &plain, Code::Unavailable, Duration::from_secs(2));
        let m = &c.snapshot()["/a.B/M"];
        let ok = &m.durations["OK"];
        assert_eq!((ok.count(), ok.sum), (2, 40_900));
        assert_eq!(m.durations["UNAVAILABLE"].count(), 1);
        assert_eq!(m.retries_per_call.counts, [0, 1, 0, 0, 0, 0], "one call, two retries");
        assert_eq!((m.hedges_per_call.count(), m.transparent_retries_per_call.count()), (0, 0));
        assert_eq!(c.name(c.method("/a.B/M", false)), "/a.B/M");
        assert_eq!(c.method("/never.Seen/M", false), MethodRow::OTHER);
        assert_eq!(c.name(MethodRow::OTHER), OTHER);
    }

    #[test]
    fn rows_are_bounded_whatever_paths_clients_send() {
        let c = Counters::default();
        let one = Stats { attempts: 1, ..Stats::default() };
        c.record("/a.B/Known", &one, Code::Ok, MS);
        for n in 0..10_000 {
            c.record(&format!("/random.S/M{n}"), &one, Code::Unimplemented, MS);
        }
        for n in 0..1_000 {
            c.record(&format!("/ok.S/M{n}"), &one, Code::Ok, MS);
        }
        let snap = c.snapshot();
        assert_eq!(snap.len(), MAX_METHODS + 1, "{MAX_METHODS} methods and `other`");
        assert_eq!(snap[OTHER].calls, 10_000 + 1_000 - (MAX_METHODS as u64 - 1));
        assert_eq!(snap["/a.B/Known"].outcomes["OK"], 1);
    }

    #[test]
    fn concurrent_callers_each_land_in_their_methods_row() {
        let c = Counters::default();
        let one = Stats { attempts: 1, ..Stats::default() };
        std::thread::scope(|scope| {
            for t in 0..4 {
                let c = &c;
                scope.spawn(move || {
                    for n in 0..1_000 {
                        let code = if t == 0 { Code::Ok } else { Code::Unavailable };
                        c.record(&format!("/s.S/M{}", n % 8), &one, code, MS);
                    }
                });
            }
        });
        let snap = c.snapshot();
        let total: u64 = snap.values().map(|m| m.calls).sum();
        assert_eq!(total, 4_000, "nothing lost");
        assert_eq!(snap["/s.S/M3"].outcomes["OK"], 125);
        assert!(snap.keys().filter(|k| k.starts_with("/s.S/")).count() == 8, "{:?}", snap.keys());
    }
}
