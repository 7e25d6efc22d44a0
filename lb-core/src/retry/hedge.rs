//! When hedged attempts start (gRFC A6): the first at once, one more every
//! `hedgingDelay` up to `maxAttempts`; a non-fatal failure brings the next one forward
//! to now, a pushback puts it off or stops it. Pure: time is passed in, as time since
//! the call began.

use std::time::Duration;

use super::policy::HedgingPolicy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HedgeSchedule {
    max_attempts: u32,
    delay: Duration,
    /// Attempts started, the first included.
    started: u32,
    /// When the next attempt is due; `None` once all have started or hedging stopped.
    next: Option<Duration>,
}

impl HedgeSchedule {
    /// The schedule right after the first attempt started at `now`.
    pub fn new(p: &HedgingPolicy, now: Duration) -> Self {
        HedgeSchedule {
            max_attempts: p.max_attempts,
            delay: p.delay,
            started: 1,
            next: (p.max_attempts > 1).then(|| now.saturating_add(p.delay)),
        }
    }

    pub fn started(&self) -> u32 {
        self.started
    }

    pub fn next_due(&self) -> Option<Duration> {
        self.next
    }

    pub fn is_due(&self, now: Duration) -> bool {
        self.next.is_some_and(|t| t <= now)
    }

    /// An attempt started at `now`.
    pub fn on_started(&mut self, now: Duration) {
        self.started += 1;
        self.next = (self.started < self.max_attempts).then(|| now.saturating_add(self.delay));
    }

    /// An attempt failed with a non-fatal status: the next one is due at once.
    pub fn on_nonfatal_failure(&mut self, now: Duration) {
        if let Some(t) = &mut self.next {
            *t = (*t).min(now);
        }
    }

    /// The server asked for a pause (`grpc-retry-pushback-ms`): nothing starts before `until`.
    pub fn push_back(&mut self, until: Duration) {
        if let Some(t) = &mut self.next {
            *t = (*t).max(until);
        }
    }

    /// No more attempts start (a pushback said not to retry, the throttle, the buffer).
    pub fn stop(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::policy::CodeSet;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn schedule(max_attempts: u32, delay_ms: u64) -> HedgeSchedule {
        HedgeSchedule::new(&HedgingPolicy { max_attempts, delay: ms(delay_ms), non_fatal: CodeSet::default() }, ms(10))
    }

    #[test]
    fn one_more_every_delay_up_to_max_attempts() {
        let mut s = schedule(3, 50);
        assert_eq!(s.next_due(), Some(ms(60)), "the first started at 10 ms");
        assert!(!s.is_due(ms(59)));
        assert!(s.is_due(ms(60)));
        s.on_started(ms(60));
        assert_eq!((s.started(), s.next_due()), (2, Some(ms(110))));
        s.on_started(ms(111));
        assert_eq!((s.started(), s.next_due()), (3, None));
        assert!(!s.is_due(ms(10_000)));
    }

    #[test]
    fn a_non_fatal_failure_fires_the_next_at_once() {
        let mut s = schedule(3, 50);
        s.on_nonfatal_failure(ms(20));
        assert!(s.is_due(ms(20)));
        s.on_started(ms(20));
        assert_eq!(s.next_due(), Some(ms(70)));
        s.on_nonfatal_failure(ms(90)); // later than due: stays due at 70
        assert_eq!(s.next_due(), Some(ms(70)));
    }

    #[test]
    fn pushback_delays_the_next_and_stop_ends_hedging() {
        let mut s = schedule(3, 50);
        s.push_back(ms(500));
        assert_eq!(s.next_due(), Some(ms(500)));
        s.push_back(ms(100));
        assert_eq!(s.next_due(), Some(ms(500)), "a pushback never brings the next one forward");
        s.stop();
        assert_eq!(s.next_due(), None);
        s.on_nonfatal_failure(ms(600));
        assert_eq!(s.next_due(), None, "stopped stays stopped");
    }

    #[test]
    fn zero_delay_hedges_at_once_and_one_attempt_never_hedges() {
        assert!(schedule(2, 0).is_due(ms(10)));
        assert_eq!(schedule(1, 0).next_due(), None);
    }

    #[test]
    fn a_huge_delay_saturates() {
        let s = HedgeSchedule::new(
            &HedgingPolicy { max_attempts: 2, delay: Duration::MAX, non_fatal: CodeSet::default() },
            ms(1),
        );
        assert_eq!(s.next_due(), Some(Duration::MAX));
    }
}
