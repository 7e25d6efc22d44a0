//! Per-method counters of what the call path did (attempts, retries, hedges, throttled,
//! committed by the buffer limit, outcomes), logged at debug level every 10 s while
//! they change. Bounded whatever paths clients send: a method gets its own row once a
//! call to it has succeeded, up to [`MAX_METHODS`]; every other call counts as `other`.
//!
//! Lock-free: a fixed table of rows of atomics, found by hashing the path (open
//! addressing). A row's name is set once, by the first successful call to its method;
//! recording a call allocates nothing after that.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use lb_core::{Code, call::Stats};
use tracing::debug;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MethodCounters {
    pub calls: u64,
    pub attempts: u64,
    pub retries: u64,
    pub hedges: u64,
    /// Transparent retries of attempts never sent or refused unprocessed.
    pub replays: u64,
    pub throttled: u64,
    pub committed_by_buffer: u64,
    /// Final outcome: the status code's name (OK when the call got response headers).
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// Rows with a method of their own, at most.
pub const MAX_METHODS: usize = 256;

/// The row for calls to methods without one of their own.
pub const OTHER: &str = "other";

#[derive(Debug, Default)]
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
}

impl Row {
    fn add(&self, s: &Stats, outcome: Code) {
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
        self.outcomes[outcome as usize].fetch_add(1, Relaxed);
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
    pub fn record(&self, path: &str, s: &Stats, outcome: Code) {
        self.table.row(path, outcome == Code::Ok).add(s, outcome);
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
    fn row(&self, path: &str, claim: bool) -> &Row {
        let start = fnv1a(path) as usize;
        for i in 0..self.slots.len() {
            let slot = &self.slots[(start + i) % self.slots.len()];
            match slot.name.get() {
                Some(name) if **name == *path => return &slot.row,
                Some(_) => continue,
                None if !claim => break,
                None => {
                    // Another call may claim it first, for this method or another.
                    if slot.name.set(path.into()).is_ok() || slot.name.get().is_some_and(|n| **n == *path) {
                        return &slot.row;
                    }
                }
            }
        }
        &self.other
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

    #[test]
    fn rows_are_bounded_whatever_paths_clients_send() {
        let c = Counters::default();
        let one = Stats { attempts: 1, ..Stats::default() };
        c.record("/a.B/Known", &one, Code::Ok);
        for n in 0..10_000 {
            c.record(&format!("/random.S/M{n}"), &one, Code::Unimplemented);
        }
        for n in 0..1_000 {
            c.record(&format!("/ok.S/M{n}"), &one, Code::Ok);
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
                        c.record(&format!("/s.S/M{}", n % 8), &one, if t == 0 { Code::Ok } else { Code::Unavailable });
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
