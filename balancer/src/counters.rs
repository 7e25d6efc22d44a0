//! Per-method counters of what the call path did (attempts, retries, hedges, throttled,
//! committed by the buffer limit, outcomes), logged at debug level every 10 s while
//! they change. Bounded whatever paths clients send: a method gets its own row once a
//! call to it has succeeded, up to [`MAX_METHODS`]; every other call counts as `other`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
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

#[derive(Debug, Default, Clone)]
pub struct Counters {
    by_method: Arc<Mutex<HashMap<String, MethodCounters>>>,
}

impl Counters {
    pub fn record(&self, path: &str, s: &Stats, outcome: Code) {
        let mut map = self.by_method.lock().unwrap_or_else(|e| e.into_inner());
        // Look up before inserting: `entry` would allocate the key on every call.
        let methods = map.len() - usize::from(map.contains_key(OTHER));
        if !map.contains_key(path) && outcome == Code::Ok && methods < MAX_METHODS {
            map.insert(path.to_owned(), MethodCounters::default());
        }
        let key = if map.contains_key(path) { path } else { OTHER };
        if key == OTHER && !map.contains_key(OTHER) {
            map.insert(OTHER.to_owned(), MethodCounters::default());
        }
        let Some(m) = map.get_mut(key) else { return };
        m.calls += 1;
        m.attempts += u64::from(s.attempts);
        m.retries += u64::from(s.retries);
        m.hedges += u64::from(s.hedges);
        m.replays += u64::from(s.transparent_retries);
        m.throttled += u64::from(s.throttled);
        m.committed_by_buffer += u64::from(s.committed_by_buffer);
        *m.outcomes.entry(outcome.name()).or_default() += 1;
    }

    pub fn snapshot(&self) -> HashMap<String, MethodCounters> {
        self.by_method.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Logs the counters every 10 s when they changed, until the balancer is dropped.
    pub(crate) fn spawn_reporter(&self, target: String) {
        let weak = Arc::downgrade(&self.by_method);
        tokio::spawn(async move {
            let mut last = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let Some(map) = weak.upgrade() else { return };
                let now = map.lock().unwrap_or_else(|e| e.into_inner()).clone();
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
}
