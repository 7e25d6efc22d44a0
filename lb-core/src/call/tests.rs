//! Every rule of the call state machine as an exact sequence of events and actions.

use std::{net::SocketAddr, time::Duration};

use super::*;
use crate::{
    code::Code,
    retry::{HedgingPolicy, Pushback, RetryPolicy, Throttle, policy::CodeSet},
    rng::tests::Top,
};

const CONNECT: Duration = Duration::from_secs(5);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ep(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 50051))
}

fn id(n: u32) -> AttemptId {
    AttemptId(n)
}

fn unavailable() -> CodeSet {
    [Code::Unavailable].into_iter().collect()
}

fn retry(max_attempts: u32, backoff_ms: u64) -> Policy {
    Policy::Retry(RetryPolicy {
        max_attempts,
        initial_backoff: ms(backoff_ms),
        max_backoff: ms(backoff_ms),
        multiplier: 1.0,
        retryable: unavailable(),
    })
}

fn hedging(max_attempts: u32, delay_ms: u64) -> Policy {
    Policy::Hedging(HedgingPolicy { max_attempts, delay: ms(delay_ms), non_fatal: unavailable() })
}

fn call(policy: Policy, deadline: Option<Duration>, wait_for_ready: bool) -> Call {
    Call::new(Setup { deadline, wait_for_ready, connect_timeout: CONNECT, policy })
}

fn drain(c: &mut Call) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

/// The `Send` a test expects, built field by field.
struct S(Send);

impl S {
    fn new(attempt: u32, previous: u32) -> S {
        S(Send {
            attempt: id(attempt),
            previous_attempts: previous,
            timeout: None,
            wait_until: Some(CONNECT),
            avoid: vec![],
            exclude: vec![],
        })
    }
    fn timeout(mut self, t: u64) -> S {
        self.0.timeout = Some(ms(t));
        self
    }
    fn wait(mut self, until: Option<u64>) -> S {
        self.0.wait_until = until.map(ms);
        self
    }
    fn avoid(mut self, eps: &[u8]) -> S {
        self.0.avoid = eps.iter().map(|n| ep(*n)).collect();
        self
    }
    fn exclude(mut self, eps: &[u8]) -> S {
        self.0.exclude = eps.iter().map(|n| ep(*n)).collect();
        self
    }
    fn done(self) -> Action {
        Action::Send(self.0)
    }
}

fn status(code: Code) -> Ended {
    Ended::Status { code, pushback: Pushback::None }
}

fn end(c: &mut Call, n: u32, how: Ended, now: u64) {
    c.on_ended(id(n), how, ms(now), &mut Top, None);
}

fn finish_status(code: Code, reason: Reason) -> Vec<Action> {
    vec![Action::Finish(Finish::Status(code, reason))]
}

/// A call with one attempt placed on endpoint 1 at time zero.
fn placed(policy: Policy, deadline: Option<u64>) -> Call {
    let mut c = call(policy, deadline.map(ms), true);
    drain(&mut c);
    c.on_placed(id(0), ep(1), ms(0));
    c
}

#[test]
fn a_plain_call_sends_one_attempt_and_commits_on_headers() {
    let mut c = call(Policy::None, None, true);
    assert_eq!(drain(&mut c), [S::new(0, 0).done()]);
    c.on_placed(id(0), ep(1), ms(0));
    assert_eq!(c.poll_timeout(), None);
    c.on_headers(id(0), None);
    assert_eq!(drain(&mut c), [Action::Commit(id(0))]);
    assert!(c.is_done());
    end(&mut c, 0, status(Code::Internal), 5);
    assert_eq!(drain(&mut c), [], "events after the end are ignored");
}

#[test]
fn a_status_without_policy_is_forwarded() {
    let mut c = placed(Policy::None, None);
    end(&mut c, 0, status(Code::Unavailable), 3);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
}

// Defect 2: a call the replica may have executed is never replayed.
#[test]
fn a_connection_lost_after_sending_ends_the_call_without_a_policy() {
    let mut c = placed(Policy::None, None);
    end(&mut c, 0, Ended::Failed { code: Code::Unavailable }, 300);
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::Attempt(id(0))));
    assert_eq!(c.stats().transparent_retries, 0);
}

#[test]
fn a_connection_lost_after_sending_is_retried_only_by_a_policy_listing_unavailable() {
    let mut c = placed(retry(3, 10), None);
    end(&mut c, 0, Ended::Failed { code: Code::Unavailable }, 300);
    assert_eq!(drain(&mut c), []);
    assert_eq!(c.poll_timeout(), Some(ms(310)));
    c.on_timeout(ms(310), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(Some(5310)).avoid(&[1]).done()]);

    let mut c = placed(retry(3, 10), None);
    end(&mut c, 0, Ended::Failed { code: Code::Internal }, 300);
    assert_eq!(drain(&mut c), finish_status(Code::Internal, Reason::Attempt(id(0))), "INTERNAL is not listed");
}

#[test]
fn a_request_that_never_left_is_resent_transparently_up_to_a_bound() {
    let mut c = placed(Policy::None, None);
    for n in 0..MAX_NOT_SENT {
        end(&mut c, 0, Ended::NotSent, 1);
        assert_eq!(drain(&mut c), [S::new(0, 0).wait(Some(5001)).avoid(&[1]).done()], "resend {n}");
        c.on_placed(id(0), ep(1), ms(1));
    }
    end(&mut c, 0, Ended::NotSent, 2);
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::Attempt(id(0))));
    assert_eq!(c.stats().attempts, 1, "transparent resends are not attempts");
    assert_eq!(c.stats().transparent_retries, MAX_NOT_SENT);
}

#[test]
fn a_refused_stream_is_resent_once_then_counts_as_unavailable() {
    let mut c = placed(Policy::None, None);
    end(&mut c, 0, Ended::Refused, 1);
    assert_eq!(drain(&mut c), [S::new(0, 0).wait(Some(5001)).avoid(&[1]).done()]);
    c.on_placed(id(0), ep(2), ms(1));
    end(&mut c, 0, Ended::Refused, 2);
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::Attempt(id(0))));

    // Under a policy listing UNAVAILABLE, the second refusal is an ordinary retry.
    let mut c = placed(retry(3, 10), None);
    end(&mut c, 0, Ended::Refused, 1);
    drain(&mut c);
    c.on_placed(id(0), ep(2), ms(1));
    end(&mut c, 0, Ended::Refused, 2);
    assert_eq!(drain(&mut c), []);
    c.on_timeout(ms(12), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(Some(5012)).avoid(&[1, 2]).done()]);
}

// Defect 3: headers commit the call whatever the policy; nothing waits for a message.
#[test]
fn headers_commit_at_once_under_a_retry_policy() {
    let mut c = placed(retry(3, 10), None);
    c.on_headers(id(0), None);
    assert_eq!(drain(&mut c), [Action::Commit(id(0))]);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn headers_commit_a_hedge_and_cancel_the_others() {
    let mut c = placed(hedging(3, 100), None);
    assert_eq!(c.poll_timeout(), Some(ms(100)));
    c.on_timeout(ms(100), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(None).avoid(&[1]).exclude(&[1]).done()]);
    c.on_placed(id(1), ep(2), ms(100));
    c.on_headers(id(1), None);
    assert_eq!(drain(&mut c), [Action::Cancel(id(0)), Action::Commit(id(1))]);
}

// Defect 4: each attempt carries the time left; the deadline cancels and answers.
#[test]
fn each_attempt_carries_the_time_left_and_the_deadline_cancels_the_last() {
    let mut c = call(retry(5, 10), Some(ms(1000)), true);
    assert_eq!(drain(&mut c), [S::new(0, 0).timeout(1000).wait(Some(1000)).done()]);
    c.on_placed(id(0), ep(1), ms(0));
    end(&mut c, 0, status(Code::Unavailable), 200);
    c.on_timeout(ms(210), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).timeout(790).wait(Some(1000)).avoid(&[1]).done()]);
    c.on_placed(id(1), ep(2), ms(210));
    end(&mut c, 1, status(Code::Unavailable), 410);
    c.on_timeout(ms(420), None);
    assert_eq!(drain(&mut c), [S::new(2, 2).timeout(580).wait(Some(1000)).avoid(&[1, 2]).done()]);
    c.on_placed(id(2), ep(1), ms(420));
    assert_eq!(c.poll_timeout(), Some(ms(1000)));
    c.on_timeout(ms(1000), None);
    let mut want = vec![Action::Cancel(id(2))];
    want.extend(finish_status(Code::DeadlineExceeded, Reason::Deadline));
    assert_eq!(drain(&mut c), want);
}

#[test]
fn a_backoff_that_would_outlive_the_deadline_ends_the_call_with_the_last_status() {
    let mut c = placed(retry(5, 500), Some(1000));
    end(&mut c, 0, status(Code::Unavailable), 600);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
}

#[test]
fn a_call_waiting_for_an_endpoint_at_its_deadline_is_deadline_exceeded() {
    let mut c = call(Policy::None, Some(ms(300)), true);
    drain(&mut c);
    c.on_no_endpoint(id(0), ms(300));
    assert_eq!(drain(&mut c), finish_status(Code::DeadlineExceeded, Reason::Deadline));

    let mut c = call(Policy::None, None, true);
    drain(&mut c);
    c.on_no_endpoint(id(0), CONNECT);
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::NoEndpoint));
}

// Defect 5: fail-fast means UNAVAILABLE at once, and transparent retries still apply.
#[test]
fn a_fail_fast_call_does_not_wait_and_is_unavailable() {
    let mut c = call(Policy::None, Some(ms(1000)), false);
    assert_eq!(drain(&mut c), [S::new(0, 0).timeout(1000).wait(None).done()]);
    c.on_no_endpoint(id(0), ms(0));
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::NoEndpoint));

    let mut c = call(Policy::None, None, false);
    drain(&mut c);
    c.on_placed(id(0), ep(1), ms(0));
    end(&mut c, 0, Ended::Refused, 1);
    assert_eq!(drain(&mut c), [S::new(0, 0).wait(None).avoid(&[1]).done()]);
}

#[test]
fn retries_stop_at_max_attempts_and_on_unlisted_codes() {
    let mut c = placed(retry(2, 10), None);
    end(&mut c, 0, status(Code::Unavailable), 1);
    c.on_timeout(ms(11), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(Some(5011)).avoid(&[1]).done()]);
    c.on_placed(id(1), ep(2), ms(11));
    end(&mut c, 1, status(Code::Unavailable), 12);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(1)))]);
    assert_eq!(c.stats(), Stats { attempts: 2, retries: 1, ..Stats::default() });

    let mut c = placed(retry(5, 10), None);
    end(&mut c, 0, status(Code::NotFound), 1);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
}

#[test]
fn pushback_sets_the_delay_and_a_negative_one_stops_retries() {
    let mut c = placed(retry(5, 10), None);
    end(&mut c, 0, Ended::Status { code: Code::Unavailable, pushback: Pushback::After(ms(700)) }, 100);
    assert_eq!(c.poll_timeout(), Some(ms(800)));
    c.on_timeout(ms(799), None);
    assert_eq!(drain(&mut c), [], "not before the pushback");
    c.on_timeout(ms(800), None);
    assert_eq!(drain(&mut c).len(), 1);
    c.on_placed(id(1), ep(2), ms(800));
    end(&mut c, 1, Ended::Status { code: Code::Unavailable, pushback: Pushback::Stop }, 801);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(1)))]);
}

// Defect 11: every call counts toward the bucket; a stop pushback is a failure.
#[test]
fn the_throttle_counts_successes_of_any_call_and_stops_retries() {
    let t = Throttle::new(4.0, 1.0);
    let mut c = placed(Policy::None, None);
    t.on_failure();
    t.on_failure();
    assert!(!t.allows(), "2 of 4");
    c.on_headers(id(0), Some(&t));
    assert!(t.allows(), "a call without a policy succeeded: 3 of 4");

    let mut c = placed(retry(5, 10), None);
    c.on_ended(id(0), status(Code::Unavailable), ms(1), &mut Top, Some(&t));
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))], "2 of 4 left: throttled");
    assert!(c.stats().throttled);

    let t = Throttle::new(4.0, 1.0);
    let mut c = placed(retry(5, 10), None);
    let stop = Ended::Status { code: Code::NotFound, pushback: Pushback::Stop };
    c.on_ended(id(0), stop, ms(1), &mut Top, Some(&t));
    assert_eq!(t.tokens(), 3000, "a stop pushback counts as a failure");
}

// Defect 8: hedgingDelay 0 does not spin when no endpoint is free or when throttled.
#[test]
fn a_zero_delay_hedge_without_a_free_endpoint_waits_for_an_attempt_to_end() {
    let mut c = placed(hedging(3, 0), None);
    assert_eq!(c.poll_timeout(), Some(ms(0)));
    c.on_timeout(ms(0), None);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(None).avoid(&[1]).exclude(&[1]).done()]);
    c.on_no_endpoint(id(1), ms(0));
    assert_eq!(drain(&mut c), []);
    assert_eq!(c.poll_timeout(), None, "nothing to do until an attempt ends");
    end(&mut c, 0, status(Code::Unavailable), 40);
    assert_eq!(drain(&mut c), [S::new(2, 1).wait(None).avoid(&[1]).done()]);
    c.on_placed(id(2), ep(1), ms(40));
    assert_eq!(c.stats().attempts, 2);
}

#[test]
fn a_throttled_hedge_stops_hedging_without_spinning() {
    let t = Throttle::new(2.0, 0.1);
    t.on_failure();
    let mut c = placed(hedging(3, 0), None);
    c.on_timeout(ms(0), Some(&t));
    assert_eq!(drain(&mut c), []);
    assert_eq!(c.poll_timeout(), None);
    assert!(c.stats().throttled);
    c.on_headers(id(0), Some(&t));
    assert_eq!(drain(&mut c), [Action::Commit(id(0))]);
}

#[test]
fn hedge_pushback_delays_or_stops_new_hedges_but_lets_running_ones_finish() {
    let mut c = placed(hedging(4, 100), None);
    c.on_timeout(ms(100), None);
    drain(&mut c);
    c.on_placed(id(1), ep(2), ms(100));
    end(&mut c, 1, Ended::Status { code: Code::Unavailable, pushback: Pushback::After(ms(500)) }, 120);
    assert_eq!(drain(&mut c), []);
    assert_eq!(c.poll_timeout(), Some(ms(620)), "pushback puts off the next hedge");
    c.on_timeout(ms(620), None);
    assert_eq!(drain(&mut c), [S::new(2, 2).wait(None).avoid(&[1, 2]).exclude(&[1]).done()]);
    c.on_placed(id(2), ep(3), ms(620));
    end(&mut c, 2, Ended::Status { code: Code::Unavailable, pushback: Pushback::Stop }, 630);
    assert_eq!(drain(&mut c), [], "attempt 0 still runs");
    assert_eq!(c.poll_timeout(), None, "no more hedges");
    c.on_headers(id(0), None);
    assert_eq!(drain(&mut c), [Action::Commit(id(0))]);
}

#[test]
fn a_fatal_status_ends_a_hedged_call_and_cancels_the_rest() {
    let mut c = placed(hedging(3, 100), None);
    c.on_timeout(ms(100), None);
    drain(&mut c);
    c.on_placed(id(1), ep(2), ms(100));
    end(&mut c, 1, status(Code::NotFound), 150);
    assert_eq!(drain(&mut c), [Action::Cancel(id(0)), Action::Finish(Finish::Forward(id(1)))]);
}

#[test]
fn when_every_hedge_fails_non_fatally_the_last_status_is_forwarded() {
    let mut c = placed(hedging(2, 100), None);
    end(&mut c, 0, status(Code::Unavailable), 10);
    assert_eq!(drain(&mut c), [S::new(1, 1).wait(None).avoid(&[1]).done()], "the next hedge fires at once");
    c.on_placed(id(1), ep(2), ms(10));
    end(&mut c, 1, status(Code::Unavailable), 20);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(1)))]);
    assert_eq!(c.stats(), Stats { attempts: 2, hedges: 1, ..Stats::default() });
}

// Defect 9 (the driver frees the buffer on Commit) and the buffer limit itself.
#[test]
fn a_request_over_the_buffer_is_never_sent_again() {
    let mut c = placed(retry(5, 10), None);
    c.on_buffer_full();
    end(&mut c, 0, status(Code::Unavailable), 10);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
    assert!(c.stats().committed_by_buffer);

    let mut c = placed(Policy::None, None);
    c.on_buffer_full();
    end(&mut c, 0, Ended::Refused, 10);
    assert_eq!(drain(&mut c), finish_status(Code::Unavailable, Reason::Attempt(id(0))), "not even transparently");
}

#[test]
fn over_the_buffer_a_hedged_call_waits_for_its_last_attempt() {
    let mut c = placed(hedging(3, 100), None);
    c.on_timeout(ms(100), None);
    drain(&mut c);
    c.on_placed(id(1), ep(2), ms(100));
    c.on_buffer_full();
    // The attempt that fell behind loses its body and fails; the other goes on.
    end(&mut c, 0, Ended::Failed { code: Code::Internal }, 120);
    assert_eq!(drain(&mut c), []);
    assert_eq!(c.poll_timeout(), None, "no more hedges");
    c.on_headers(id(1), None);
    assert_eq!(drain(&mut c), [Action::Commit(id(1))]);
}

#[test]
fn a_cancelled_caller_cancels_every_attempt() {
    let mut c = placed(hedging(3, 100), None);
    c.on_timeout(ms(100), None);
    drain(&mut c);
    c.on_cancelled();
    let mut want = vec![Action::Cancel(id(0)), Action::Cancel(id(1))];
    want.extend(finish_status(Code::Cancelled, Reason::Cancelled));
    assert_eq!(drain(&mut c), want);
}

#[test]
fn huge_deadlines_and_delays_saturate() {
    let mut c = call(retry(5, 10), Some(Duration::MAX), true);
    let first = S(Send { timeout: Some(Duration::MAX), wait_until: Some(Duration::MAX), ..S::new(0, 0).0 });
    assert_eq!(drain(&mut c), [first.done()]);
    c.on_placed(id(0), ep(1), ms(5));
    let huge = Ended::Status { code: Code::Unavailable, pushback: Pushback::After(Duration::MAX) };
    c.on_ended(id(0), huge, ms(6), &mut Top, None);
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))], "the pushback outlives the deadline");

    let mut c = placed(retry(5, 10), None);
    c.on_ended(id(0), huge, ms(6), &mut Top, None);
    assert_eq!(c.poll_timeout(), Some(Duration::MAX));
}

// Review findings: a call must never be left with nothing in flight and nothing due.
#[test]
fn a_throttled_hedge_after_a_pushback_ends_the_call_with_the_last_status() {
    let t = Throttle::new(2.0, 0.1);
    let mut c = placed(hedging(3, 200), None);
    let pushed = Ended::Status { code: Code::Unavailable, pushback: Pushback::After(ms(500)) };
    c.on_ended(id(0), pushed, ms(10), &mut Top, Some(&t));
    assert_eq!(drain(&mut c), [], "the next hedge waits for the pushback");
    assert_eq!(c.poll_timeout(), Some(ms(510)));
    c.on_timeout(ms(510), Some(&t));
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))], "throttled, nothing in flight: over");
}

#[test]
fn a_full_buffer_during_a_hedge_pushback_ends_the_call() {
    let mut c = placed(hedging(3, 200), None);
    let pushed = Ended::Status { code: Code::Unavailable, pushback: Pushback::After(ms(500)) };
    c.on_ended(id(0), pushed, ms(10), &mut Top, None);
    c.on_buffer_full();
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn a_full_buffer_during_a_backoff_ends_the_call_with_the_last_status() {
    let mut c = placed(retry(3, 10), None);
    end(&mut c, 0, status(Code::Unavailable), 5);
    c.on_buffer_full();
    assert_eq!(drain(&mut c), [Action::Finish(Finish::Forward(id(0)))]);
}

#[test]
fn a_hedge_that_found_no_endpoint_is_not_counted() {
    let mut c = placed(hedging(3, 0), None);
    c.on_timeout(ms(0), None);
    drain(&mut c);
    c.on_no_endpoint(id(1), ms(0));
    assert_eq!(c.stats().hedges, 0);
    end(&mut c, 0, status(Code::Unavailable), 40);
    drain(&mut c);
    c.on_placed(id(2), ep(1), ms(40));
    assert_eq!(c.stats(), Stats { attempts: 2, hedges: 1, ..Stats::default() });
}
