//! `--coalesce MICROS`: while many h2c calls are open and calls keep starting and ending,
//! the worker sleeps MICROS between its polls for I/O instead of waking for every
//! arrival, the way a network card coalesces interrupts (`ethtool -C rx-usecs`). Frames
//! that arrive during the sleep wait in the sockets; the next poll reads them all, and
//! the relay writes each side's share in one system call. A forwarder that keeps up
//! easily otherwise wakes once per call on each side, and on loopback each small write
//! also runs the peer's TCP receive path: most of its CPU per call is that kernel work.
//!
//! The price is latency under load: a frame can wait up to MICROS (plus the kernel's
//! timer slack) on each hop. A lone call, or a few, never waits: the sleeping starts at
//! [`FROM`] open calls. It stops when no call has started or ended for [`IDLE_TURNS`]
//! sleeps, so open streams that carry nothing do not keep the worker waking.
//!
//! The sleep blocks the worker thread on purpose, which is why it needs `--threads 1`:
//! with more workers, the others would still wake for every arrival.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// The worker sleeps between polls only while at least this many calls are open.
pub(crate) const FROM: usize = 8;
/// Sleeps in a row with no call started or ended, after which the worker parks as usual.
pub(crate) const IDLE_TURNS: u32 = 4;

/// How many calls are open and how often they start and end, and the sleeping task.
#[derive(Debug)]
pub(crate) struct Coalesce {
    window: Duration,
    open: AtomicUsize,
    /// Calls started or ended: how the sleeping task tells a busy proxy from open streams
    /// that carry nothing.
    events: AtomicU64,
    /// Sleeps taken: `proxy_coalesce_sleeps_total`.
    naps: AtomicU64,
    wake: Notify,
}

impl Coalesce {
    /// Starts the sleeping task on the current runtime.
    pub(crate) fn start(window: Duration) -> Arc<Coalesce> {
        let coalesce = Arc::new(Coalesce {
            window,
            open: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            naps: AtomicU64::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(coalesce.clone().nap());
        coalesce
    }

    /// A count of open calls (one connection's, or one call's) that goes into the
    /// total, and out of it when dropped.
    pub(crate) fn open(self: &Arc<Self>, calls: usize) -> Open {
        let mut open = Open { coalesce: self.clone(), calls: 0 };
        open.set(calls);
        open
    }

    fn busy(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= FROM
    }

    async fn nap(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            let mut idle = 0;
            while self.busy() && idle < IDLE_TURNS {
                let seen = self.events.load(Ordering::Relaxed);
                self.naps.fetch_add(1, Ordering::Relaxed);
                // Blocking the worker is the point: arrivals gather in the sockets, and
                // the yield below lets the runtime poll them all at once.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(self.window);
                tokio::task::yield_now().await;
                idle = if self.events.load(Ordering::Relaxed) == seen { idle + 1 } else { 0 };
            }
        }
    }

    /// Sleeps taken so far.
    pub(crate) fn naps(&self) -> u64 {
        self.naps.load(Ordering::Relaxed)
    }
}

/// Calls counted open in a [`Coalesce`] until this is dropped.
#[derive(Debug)]
pub(crate) struct Open {
    coalesce: Arc<Coalesce>,
    calls: usize,
}

impl Open {
    /// Now `calls` are open here; a change counts as calls starting or ending.
    pub(crate) fn set(&mut self, calls: usize) {
        if calls == self.calls {
            return;
        }
        let c = &self.coalesce;
        let total = match calls > self.calls {
            true => c.open.fetch_add(calls - self.calls, Ordering::Relaxed) + (calls - self.calls),
            false => c.open.fetch_sub(self.calls - calls, Ordering::Relaxed) - (self.calls - calls),
        };
        self.calls = calls;
        c.events.fetch_add(1, Ordering::Relaxed);
        if total >= FROM {
            c.wake.notify_one();
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the sleeping task take the turns it wants without the clock moving.
    async fn let_run() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn it_sleeps_only_while_many_calls_are_open_and_coming_and_going() {
        let c = Coalesce::start(Duration::from_micros(1));
        let mut a = c.open(FROM - 1);
        let_run().await;
        assert_eq!(c.naps(), 0, "fewer than FROM calls open: parked");

        let b = c.open(1);
        let_run().await;
        assert!(c.naps() > 0, "FROM calls open: sleeping between polls");

        let_run().await;
        let after_idle = c.naps();
        let_run().await;
        assert_eq!(c.naps(), after_idle, "no call started or ended for IDLE_TURNS sleeps: parked");
        assert!(after_idle <= u64::from(IDLE_TURNS) + 1, "{after_idle} sleeps with nothing coming or going");

        a.set(FROM);
        let_run().await;
        assert!(c.naps() > after_idle, "a call started: sleeping again");

        drop(b);
        a.set(2);
        let_run().await;
        let quiet = c.naps();
        for n in 3..FROM {
            a.set(n);
            let_run().await;
        }
        assert_eq!(c.naps(), quiet, "calls coming and going, fewer than FROM open: parked");
        drop(a);
        assert_eq!(c.open.load(Ordering::Relaxed), 0, "every count given back");
    }
}
