//! Per-method counters of what the call path did (attempts, retries, hedges, throttled,
//! committed by the buffer limit, outcomes), logged at debug level every 10 s while
//! they change.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::debug;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MethodCounters {
    pub calls: u64,
    pub attempts: u64,
    pub retries: u64,
    pub hedges: u64,
    /// Transparent replays of attempts the endpoint never processed.
    pub replays: u64,
    pub throttled: u64,
    pub committed_by_buffer: u64,
    /// Final outcome: a status code name, or RESPONSE when the call streamed a reply.
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// What one call did, added to its method's counters when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallStats {
    pub attempts: u64,
    pub retries: u64,
    pub hedges: u64,
    pub replays: u64,
    pub throttled: bool,
    pub committed_by_buffer: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Counters {
    by_method: Arc<Mutex<HashMap<String, MethodCounters>>>,
}

impl Counters {
    pub fn record(&self, path: &str, s: &CallStats, outcome: &'static str) {
        let mut map = self.by_method.lock().unwrap_or_else(|e| e.into_inner());
        // Look up before inserting: `entry` would allocate the key on every call.
        if !map.contains_key(path) {
            map.insert(path.to_owned(), MethodCounters::default());
        }
        let Some(m) = map.get_mut(path) else { return };
        m.calls += 1;
        m.attempts += s.attempts;
        m.retries += s.retries;
        m.hedges += s.hedges;
        m.replays += s.replays;
        m.throttled += u64::from(s.throttled);
        m.committed_by_buffer += u64::from(s.committed_by_buffer);
        *m.outcomes.entry(outcome).or_default() += 1;
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
