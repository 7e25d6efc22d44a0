//! `--coalesce MICROS`: under load, the worker sleeps MICROS between its polls for I/O
//! instead of waking for every arrival, the way a network card coalesces interrupts
//! (`ethtool -C rx-usecs`). Frames that arrive during the sleep wait in the sockets; the
//! next poll reads them all, and the relay writes each side's share in one system call.
//! A forwarder that keeps up easily otherwise wakes once per call on each side, and on
//! loopback each small write also runs the peer's TCP receive path: most of its CPU per
//! call is that kernel work.
//!
//! The price is latency: a frame that arrives during a sleep waits for its end (plus
//! the kernel's timer slack), about MICROS more per call over its two hops, and the
//! worker's other tasks (HTTP/3 calls, health checks, the admin API) wait as well. So
//! the worker sleeps only while that is small against how long the calls that just
//! ended took, and while calls end often enough for a sleep to gather more than one
//! ([`pays`]). It starts weighing that every [`PERIOD`] when a call starts or ends
//! with [`MIN_OPEN_CALLS`] open, and parks as usual once sleeping does not pay with
//! fewer open, or once none has ended in a period, so open streams that carry nothing
//! cost nothing.
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

use tokio::{sync::Notify, time::Instant};

/// Calls open, on average over a period, for the worker to sleep; and at any moment,
/// for it to start weighing that.
const MIN_OPEN_CALLS: usize = 8;
/// How often the worker weighs sleeping against not.
const PERIOD: Duration = Duration::from_millis(1);
/// Calls must take at least this many windows on average, as the proxy sees them
/// without the sleeps, for the worker to sleep. A call waits about half a sleep on each
/// hop: about one window more, a quarter at most of what calls that long take here,
/// and less of what their clients see, which includes their own queues and the network.
const LATENCY_IN_WINDOWS: u32 = 4;

/// Whether sleeping `window` between polls pays, when `ends` calls that took `took` in
/// all ended in `elapsed`, `sleeping` or not meanwhile. What they took is weighed
/// without the window each waited more if the worker was sleeping, else the sleeps
/// would keep themselves going. They must have taken `LATENCY_IN_WINDOWS` windows on
/// average; at least one must have ended per window, so that a wake-up after a sleep
/// has more than one call's frames to carry; and `MIN_OPEN_CALLS` must have been open
/// on average (by Little's law, what they took over the time they ended in: a count
/// taken at one moment swings with the waves calls come in).
fn pays(ends: u64, took: Duration, elapsed: Duration, window: Duration, sleeping: bool) -> bool {
    let (ends, took, elapsed, window) = (u128::from(ends), took.as_micros(), elapsed.as_micros(), window.as_micros());
    let took = if sleeping { took.saturating_sub(window * ends) } else { took };
    ends > 0
        && ends * window >= elapsed
        && took >= u128::from(LATENCY_IN_WINDOWS) * window * ends
        && took >= MIN_OPEN_CALLS as u128 * elapsed
}

/// How many calls are open, how many have ended and what they took, and the sleeping
/// task.
#[derive(Debug)]
pub(crate) struct Coalesce {
    window: Duration,
    open: AtomicUsize,
    ends: AtomicU64,
    /// Microseconds the ended calls took, summed.
    took: AtomicU64,
    /// Sleeps taken: `proxy_coalesce_sleeps_total`.
    sleeps: AtomicU64,
    /// Turns of the weighing loop, for tests: none while parked.
    turns: AtomicU64,
    wake: Notify,
}

impl Coalesce {
    /// Starts the sleeping task on the current runtime.
    pub(crate) fn start(window: Duration) -> Arc<Coalesce> {
        let coalesce = Arc::new(Coalesce {
            window,
            open: AtomicUsize::new(0),
            ends: AtomicU64::new(0),
            took: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(coalesce.clone().run());
        coalesce
    }

    /// A count of open calls (one connection's, or one call's) that goes into the
    /// total, and out of it when dropped.
    pub(crate) fn open(self: &Arc<Self>, calls: usize) -> Open {
        let mut open = Open { coalesce: self.clone(), calls: 0 };
        open.set(calls);
        open
    }

    /// One call, open until it ends.
    pub(crate) fn call(self: &Arc<Self>) -> Call {
        Call { open: self.open(1), came: Instant::now() }
    }

    /// A call ended, `took` after it came. Wakes the worker's weighing if enough calls
    /// are open: calls ending while as many start leave the open count where it was.
    pub(crate) fn ended(&self, took: Duration) {
        self.ends.fetch_add(1, Ordering::Relaxed);
        self.took.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if self.enough_open() {
            self.wake.notify_one();
        }
    }

    fn enough_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= MIN_OPEN_CALLS
    }

    /// Calls ended so far, and the microseconds they took.
    fn ends(&self) -> (u64, u64) {
        (self.ends.load(Ordering::Relaxed), self.took.load(Ordering::Relaxed))
    }

    /// Sleeps taken so far.
    pub(crate) fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }

    /// Woken when a call starts or ends with enough open; weighs sleeping every period
    /// while calls keep ending, and parks when they stop, or when it does not pay and
    /// too few are open.
    async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            let mut at = Instant::now();
            let (mut ends_before, mut took_before) = self.ends();
            let mut sleeping = false;
            loop {
                self.turns.fetch_add(1, Ordering::Relaxed);
                if sleeping {
                    self.sleep().await;
                } else {
                    tokio::time::sleep(PERIOD).await;
                }
                let now = Instant::now();
                if now - at < PERIOD {
                    continue;
                }
                let (ends, took) = self.ends();
                if ends == ends_before {
                    break;
                }
                let took_since = Duration::from_micros(took - took_before);
                sleeping = pays(ends - ends_before, took_since, now - at, self.window, sleeping);
                if !sleeping && !self.enough_open() {
                    break;
                }
                (at, ends_before, took_before) = (now, ends, took);
            }
        }
    }

    /// One sleep, then a turn of the runtime, which polls all the I/O that gathered.
    async fn sleep(&self) {
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        // Blocking the worker is the point: arrivals gather in the sockets meanwhile.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(self.window);
        tokio::task::yield_now().await;
    }
}

/// One call counted open in a [`Coalesce`]: ended with what it took, or given back
/// uncounted if dropped.
#[derive(Debug)]
pub(crate) struct Call {
    open: Open,
    came: Instant,
}

impl Call {
    pub(crate) fn ended(self) {
        self.open.coalesce.ended(self.came.elapsed());
    }
}

/// Calls counted open in a [`Coalesce`] until this is dropped.
#[derive(Debug)]
pub(crate) struct Open {
    coalesce: Arc<Coalesce>,
    calls: usize,
}

impl Open {
    /// Now `calls` are open here.
    pub(crate) fn set(&mut self, calls: usize) {
        let c = &self.coalesce;
        if calls > self.calls {
            let total = c.open.fetch_add(calls - self.calls, Ordering::Relaxed) + (calls - self.calls);
            if total >= MIN_OPEN_CALLS {
                c.wake.notify_one();
            }
        } else if calls < self.calls {
            c.open.fetch_sub(self.calls - calls, Ordering::Relaxed);
        }
        self.calls = calls;
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

    const WINDOW: Duration = Duration::from_micros(100);
    const MS: Duration = Duration::from_millis(1);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn sleeping_pays_when_calls_take_four_windows_one_ends_per_window_and_eight_are_open() {
        // The bench's c64, as the relay sees it: 32 calls a millisecond, 0.7 ms each.
        assert!(pays(32, 32 * us(700), MS, WINDOW, false));
        // c8: 20 a millisecond, 0.3 ms each: 0.1 ms more would be a third again.
        assert!(!pays(20, 20 * us(300), MS, WINDOW, false));
        // Each rule at its edge, the others met.
        assert!(pays(30, 30 * us(400), MS, WINDOW, false), "four windows a call");
        assert!(!pays(30, 30 * us(399), MS, WINDOW, false));
        assert!(pays(10, 10 * us(800), MS, WINDOW, false), "one end a window");
        assert!(!pays(9, 9 * us(900), MS, WINDOW, false));
        assert!(pays(12, 12 * us(700), MS, WINDOW, false), "8.4 open on average");
        assert!(!pays(11, 11 * us(700), MS, WINDOW, false), "7.7 open on average");
        // While sleeping, a window of each call's time was the sleeps'.
        assert!(pays(30, 30 * us(500), MS, WINDOW, true));
        assert!(!pays(30, 30 * us(499), MS, WINDOW, true));
        assert!(pays(16, 16 * us(600), MS, WINDOW, true));
        assert!(!pays(16, 16 * us(599), MS, WINDOW, true), "7.98 open on average, the sleeps aside");
        // Long streams ending now and then: nothing to gather.
        assert!(!pays(3, 3 * Duration::from_secs(60), MS, WINDOW, false));
        // Nothing ended: nothing to weigh.
        assert!(!pays(0, Duration::ZERO, MS, WINDOW, false));
    }

    /// Lets the task take the turns it wants without the clock moving.
    async fn let_run() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// `ends` calls that took `took` each end over one period.
    async fn period(c: &Coalesce, ends: u32, took: Duration) {
        for _ in 0..ends {
            c.ended(took);
        }
        tokio::time::advance(PERIOD).await;
        let_run().await;
    }

    /// Two periods of long calls ending often: sleeping by the end of them.
    async fn busy(c: &Coalesce) {
        period(c, 32, us(700)).await;
        period(c, 32, us(700)).await;
        let before = c.sleeps();
        let_run().await;
        assert!(c.sleeps() > before, "calls ending often and taking long: sleeping between polls");
    }

    #[tokio::test(start_paused = true)]
    async fn it_sleeps_while_enough_calls_end_often_and_take_long_and_parks_otherwise() {
        let c = Coalesce::start(WINDOW);
        let turns = || c.turns.load(Ordering::Relaxed);
        let mut open = c.open(MIN_OPEN_CALLS - 1);
        period(&c, 32, us(700)).await;
        period(&c, 32, us(700)).await;
        assert_eq!((c.sleeps(), turns()), (0, 0), "too few calls open: parked");

        open.set(MIN_OPEN_CALLS);
        busy(&c).await;
        period(&c, 32, us(300)).await;
        let short = c.sleeps();
        period(&c, 32, us(300)).await;
        period(&c, 32, us(300)).await;
        assert_eq!(c.sleeps(), short, "calls under four windows long: not sleeping for them");

        busy(&c).await;
        period(&c, 32, us(450)).await;
        let stretched = c.sleeps();
        period(&c, 32, us(300)).await;
        assert_eq!(c.sleeps(), stretched, "450 µs while sleeping, 350 µs without the sleeps: stopped");

        busy(&c).await;
        open.set(MIN_OPEN_CALLS - 1);
        let_run().await;
        let dipped = c.sleeps();
        period(&c, 32, us(700)).await;
        assert!(c.sleeps() > dipped, "fewer open at a moment, 22 on average: sleeping on");
        period(&c, 10, us(700)).await;
        let few = c.sleeps();
        period(&c, 10, us(700)).await;
        let parked = turns();
        period(&c, 10, us(700)).await;
        assert_eq!((c.sleeps(), turns()), (few, parked), "7 open on average and at the moment: parked");

        open.set(MIN_OPEN_CALLS);
        busy(&c).await;
        period(&c, 0, us(0)).await;
        period(&c, 0, us(0)).await;
        let (idle, parked) = (c.sleeps(), turns());
        tokio::time::advance(10 * PERIOD).await;
        let_run().await;
        assert_eq!((c.sleeps(), turns()), (idle, parked), "calls open and none ending: parked");

        // Calls end and as many start: the open count never moves, the ends wake it.
        busy(&c).await;
        drop(open);
        assert_eq!(c.open.load(Ordering::Relaxed), 0, "every count given back");
    }
}
