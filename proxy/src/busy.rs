//! `--busy-poll MICROS`: after a call starts or finishes, the runtime polls for I/O
//! without sleeping for up to MICROS before it parks, as HAProxy's `busy-polling` does.
//! A parked runtime waits in `epoll_wait` and is woken by the kernel; on a virtual
//! machine each wake-up costs an exit to the hypervisor, which dominates the latency of
//! a lone call. The price is CPU: the worker spins instead of sleeping while calls come
//! and go, and for MICROS after the last one.
//!
//! The spin is a task that yields in a loop: tokio then polls its I/O driver with a zero
//! timeout between turns instead of blocking in it. That needs `--threads 1`: with more
//! workers, one that is parked holds the I/O driver, and the spinning one cannot poll it.
//! The window runs from the last call start or end, so a replica slower than MICROS
//! answers a parked proxy.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// When the last call started or finished, and a wake-up for the spinning task.
#[derive(Debug)]
pub(crate) struct BusyPoll {
    window: Duration,
    epoch: Instant,
    /// Microseconds from `epoch` to the last call event.
    last: AtomicU64,
    /// Turns taken without parking, for tests and the curious.
    turns: AtomicU64,
    wake: Notify,
}

impl BusyPoll {
    /// Starts the spinning task on the current runtime.
    pub(crate) fn start(window: Duration) -> Arc<BusyPoll> {
        let busy = Arc::new(BusyPoll {
            window,
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(busy.clone().spin());
        busy
    }

    /// A call started or finished: keep polling for another `window`.
    pub(crate) fn touch(&self) {
        self.last.store(self.since_epoch(Instant::now()), Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn since_epoch(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_micros() as u64
    }

    /// Whether `now` is still within `window` of the last call event.
    fn hot(&self, now: Instant) -> bool {
        self.since_epoch(now).saturating_sub(self.last.load(Ordering::Relaxed)) < self.window.as_micros() as u64
    }

    async fn spin(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            while self.hot(Instant::now()) {
                self.turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    }

    #[cfg(test)]
    fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the spinning task take the turns it wants without the clock moving.
    async fn let_run() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_spins_only_within_the_window_after_a_call_event() {
        let busy = BusyPoll::start(Duration::from_micros(200));
        let_run().await;
        assert_eq!(busy.turns(), 0, "no call yet: parked");

        busy.touch();
        let_run().await;
        let spinning = busy.turns();
        assert!(spinning > 0, "a call started: spinning");

        tokio::time::advance(Duration::from_micros(150)).await;
        let_run().await;
        assert!(busy.turns() > spinning, "150 µs after the event: still spinning");

        busy.touch();
        tokio::time::advance(Duration::from_micros(150)).await;
        let_run().await;
        let before = busy.turns();
        let_run().await;
        assert!(busy.turns() > before, "a second event restarts the window");

        tokio::time::advance(Duration::from_micros(60)).await;
        let_run().await;
        let quiet = busy.turns();
        let_run().await;
        assert_eq!(busy.turns(), quiet, "200 µs after the last event: parked");
    }
}
