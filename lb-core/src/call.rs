//! One call's life as gRFC A6 defines it for a proxy: attempts, transparent retries,
//! retries with backoff, hedges, commit, pushback, throttle and deadline. Pure, in the
//! manner of quinn-proto: the driver feeds events in (`on_*`), takes actions out
//! ([`Call::poll_action`]) and wakes the call at [`Call::poll_timeout`]. Time is the
//! [`Duration`] since the call began; randomness and the throttle are passed in.
//!
//! Call order: [`Call::new`], then drain `poll_action` after every event. An attempt
//! the driver was told to [`Action::Send`] is reported placed ([`Call::on_placed`]) or
//! unplaceable ([`Call::on_no_endpoint`]), then ends with headers ([`Call::on_headers`])
//! or without ([`Call::on_ended`]). Once [`Action::Commit`] or [`Action::Finish`] comes
//! out, the call is over and ignores further events.
//!
//! The rules:
//! - A call commits when an attempt's response headers arrive; from then on it is never
//!   retried, and every other attempt is cancelled.
//! - Transparent retries (counted toward nothing): an attempt that never left the proxy
//!   is sent again up to [`MAX_NOT_SENT`] times; one the server refused (REFUSED_STREAM,
//!   a stream above its GOAWAY) once per call. Anything else that went out is a failure
//!   with a status, retried only if the policy lists it.
//! - Each attempt carries the time left before the deadline. At the deadline every
//!   attempt is cancelled and the call ends with DEADLINE_EXCEEDED.
//! - Fail-fast calls (`waitForReady: false`) end with UNAVAILABLE when no endpoint is
//!   ready; others wait up to their deadline (or the connect timeout without one).
//! - Once the request outgrows the replay buffer, no attempt starts again.

use std::{net::SocketAddr, time::Duration};

use smallvec::SmallVec;

use crate::{
    Code,
    retry::{
        HedgeSchedule, HedgingPolicy, Pushback, RetryPolicy, Throttle, Verdict,
        policy::{RetryState, StopReason},
    },
    rng::Rng,
};

/// Transparent resends of an attempt that never left the proxy, at most, per call.
pub const MAX_NOT_SENT: u32 = 5;

/// Which attempt of a call an event or action is about. Transparent retries keep their
/// attempt's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub u32);

/// The method's policy from the service config.
#[derive(Debug, Clone, Default)]
pub enum Policy {
    #[default]
    None,
    Retry(RetryPolicy),
    Hedging(HedgingPolicy),
}

/// What a call starts with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Since the call began: the caller's `grpc-timeout` or the method's timeout,
    /// whichever is sooner.
    pub deadline: Option<Duration>,
    /// `false` = fail fast: no waiting for a ready endpoint.
    pub wait_for_ready: bool,
    /// How long an attempt waits for a ready endpoint when the call has no deadline.
    pub connect_timeout: Duration,
    pub policy: Policy,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Place an attempt on an endpoint and send it.
    Send(Send),
    /// Reset an attempt's stream (RST_STREAM CANCEL); it reports nothing more.
    Cancel(AttemptId),
    /// Hand this attempt's response to the caller: the call is committed to it, and its
    /// request body needs no replay buffer any more.
    Commit(AttemptId),
    /// The call is over without a committed attempt.
    Finish(Finish),
}

/// An attempt to place and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub attempt: AttemptId,
    /// `grpc-previous-rpc-attempts` to send (0 on the first attempt: no header).
    pub previous_attempts: u32,
    /// `grpc-timeout` to send: the time left before the deadline.
    pub timeout: Option<Duration>,
    /// Wait for a ready endpoint until then; `None` = take one now or none.
    pub wait_until: Option<Duration>,
    /// Endpoints this call already tried: others first, while any is ready.
    pub avoid: Vec<SocketAddr>,
    /// Endpoints never to use: those with one of this call's attempts in flight.
    pub exclude: Vec<SocketAddr>,
}

/// How a call ends when no attempt was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Forward the gRPC status this attempt's server answered with.
    Forward(AttemptId),
    /// Answer with a status of the proxy's own.
    Status(Code, Reason),
}

/// Why the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The deadline passed.
    Deadline,
    /// No endpoint was ready (in time, or at once for a fail-fast call).
    NoEndpoint,
    /// This attempt failed without a gRPC status: reset, lost, refused or an HTTP error.
    Attempt(AttemptId),
    /// The caller went away.
    Cancelled,
}

/// How an attempt ended without response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The request never left the proxy (the connection closed before the stream opened).
    NotSent,
    /// The server refused the stream unprocessed: REFUSED_STREAM, a stream above its
    /// GOAWAY's last stream id, HTTP/3 REQUEST_REJECTED.
    Refused,
    /// The server answered with a gRPC status (trailers-only).
    Status { code: Code, pushback: Pushback },
    /// No gRPC status: a reset, a lost connection or an HTTP error, mapped to `code`.
    Failed { code: Code },
}

/// What the call did, for counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Attempts placed on an endpoint (transparent resends not included).
    pub attempts: u32,
    pub retries: u32,
    pub hedges: u32,
    pub transparent_retries: u32,
    /// A retry or hedge was held back by the throttle.
    pub throttled: bool,
    /// The request outgrew the replay buffer: no attempt could start again.
    pub committed_by_buffer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptState {
    /// Sent to the driver, not yet on an endpoint.
    Placing,
    /// On its endpoint, awaiting its response.
    InFlight,
    Over,
}

#[derive(Debug, Clone)]
struct Attempt {
    state: AttemptState,
    /// Its `grpc-previous-rpc-attempts`.
    number: u32,
    /// Where it was last placed.
    endpoint: Option<SocketAddr>,
    /// Placed at least once, so counted toward `maxAttempts`.
    counted: bool,
}

#[derive(Debug, Clone)]
enum Mode {
    Plain,
    Retry {
        policy: RetryPolicy,
        state: RetryState,
        backoff_until: Option<Duration>,
    },
    /// The schedule starts when the first attempt is placed.
    Hedging {
        policy: HedgingPolicy,
        schedule: Option<HedgeSchedule>,
        blocked: bool,
    },
}

/// One call's state. See the module doc for the rules and the call order.
#[derive(Debug)]
pub struct Call {
    setup: Setup,
    mode: Mode,
    // Inline for the common call of one or two attempts: no allocation per call.
    attempts: SmallVec<[Attempt; 2]>,
    /// Every endpoint an attempt was placed on, in order; retries avoid them.
    tried: SmallVec<[SocketAddr; 2]>,
    /// Attempts placed, counted toward `maxAttempts`.
    placed: u32,
    refused_once: bool,
    not_sent: u32,
    buffer_full: bool,
    /// The failure the call ends with if nothing better comes (hedging).
    last_failure: Option<Finish>,
    done: bool,
    stats: Stats,
    /// Queued for [`Call::poll_action`], oldest first.
    actions: SmallVec<[Action; 2]>,
}

impl Call {
    /// A new call at time zero; its first action sends attempt 0.
    pub fn new(mut setup: Setup) -> Call {
        let mode = match std::mem::take(&mut setup.policy) {
            Policy::None => Mode::Plain,
            Policy::Retry(policy) => Mode::Retry { policy, state: RetryState::default(), backoff_until: None },
            Policy::Hedging(policy) => Mode::Hedging { policy, schedule: None, blocked: false },
        };
        let mut call = Call {
            setup,
            mode,
            attempts: SmallVec::new(),
            tried: SmallVec::new(),
            placed: 0,
            refused_once: false,
            not_sent: 0,
            buffer_full: false,
            last_failure: None,
            done: false,
            stats: Stats::default(),
            actions: SmallVec::new(),
        };
        call.send_new(Duration::ZERO, false);
        call
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        (!self.actions.is_empty()).then(|| self.actions.remove(0))
    }

    /// When [`Call::on_timeout`] is due: the deadline, a backoff's end, the next hedge.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.done {
            return None;
        }
        let timer = match &self.mode {
            Mode::Plain => None,
            Mode::Retry { backoff_until, .. } => *backoff_until,
            Mode::Hedging { schedule, blocked, .. } => {
                schedule.as_ref().and_then(HedgeSchedule::next_due).filter(|_| !*blocked && !self.placing())
            }
        };
        match (timer, self.setup.deadline) {
            (Some(t), Some(d)) => Some(t.min(d)),
            (t, d) => t.or(d),
        }
    }

    /// What is left of the deadline at `now`: the `grpc-timeout` to send.
    pub fn time_left(&self, now: Duration) -> Option<Duration> {
        self.setup.deadline.map(|d| d.saturating_sub(now))
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The endpoint an attempt was placed on, if it was.
    pub fn endpoint(&self, id: AttemptId) -> Option<SocketAddr> {
        self.attempts.get(id.0 as usize)?.endpoint
    }

    /// The attempt is on `endpoint` and its request is on its way.
    pub fn on_placed(&mut self, id: AttemptId, endpoint: SocketAddr, now: Duration) {
        let Some(a) = self.live(id, AttemptState::Placing) else { return };
        a.state = AttemptState::InFlight;
        a.endpoint = Some(endpoint);
        let first_placement = !std::mem::replace(&mut a.counted, true);
        if !self.tried.contains(&endpoint) {
            self.tried.push(endpoint);
        }
        if !first_placement {
            return; // a transparent resend
        }
        match &mut self.mode {
            Mode::Plain => {}
            Mode::Retry { .. } => self.stats.retries += u32::from(self.placed > 0),
            Mode::Hedging { policy, schedule, .. } => match schedule {
                None => *schedule = Some(HedgeSchedule::new(policy, now)),
                Some(s) => {
                    s.on_started(now);
                    self.stats.hedges += 1;
                }
            },
        }
        self.placed += 1;
        self.stats.attempts = self.placed;
    }

    /// No endpoint could take the attempt (by its `wait_until`).
    pub fn on_no_endpoint(&mut self, id: AttemptId, now: Duration) {
        self.no_endpoint(id, now);
        self.settle();
    }

    fn no_endpoint(&mut self, id: AttemptId, now: Duration) {
        if self.live(id, AttemptState::Placing).is_none() {
            return;
        }
        let a = &mut self.attempts[id.0 as usize];
        a.state = AttemptState::Over;
        let hedge = matches!(self.mode, Mode::Hedging { .. }) && self.placed > 0;
        if hedge && a.counted {
            // A hedge's transparent resend found no endpoint: that attempt failed.
            self.last_failure = Some(Finish::Status(Code::Unavailable, Reason::Attempt(id)));
        }
        if hedge && self.in_flight().next().is_some() {
            // Every ready endpoint has an attempt: the next hedge waits for one to end.
            if let Mode::Hedging { blocked, .. } = &mut self.mode {
                *blocked = true;
            }
            return;
        }
        if let Some(last) = self.last_failure.filter(|_| hedge) {
            return self.finish(last);
        }
        let code = if self.deadline_passed(now) { Code::DeadlineExceeded } else { Code::Unavailable };
        let reason = if code == Code::DeadlineExceeded { Reason::Deadline } else { Reason::NoEndpoint };
        self.finish(Finish::Status(code, reason));
    }

    /// Response headers arrived: the call commits to this attempt.
    pub fn on_headers(&mut self, id: AttemptId, throttle: Option<&Throttle>) {
        if self.live(id, AttemptState::InFlight).is_none() {
            return;
        }
        if let Some(t) = throttle {
            t.on_success();
        }
        self.attempts[id.0 as usize].state = AttemptState::Over;
        self.cancel_others();
        self.done = true;
        self.actions.push(Action::Commit(id));
    }

    /// The attempt ended without response headers.
    pub fn on_ended(
        &mut self,
        id: AttemptId,
        how: Ended,
        now: Duration,
        rng: &mut dyn Rng,
        throttle: Option<&Throttle>,
    ) {
        self.ended(id, how, now, rng, throttle);
        self.settle();
    }

    fn ended(&mut self, id: AttemptId, how: Ended, now: Duration, rng: &mut dyn Rng, throttle: Option<&Throttle>) {
        if self.live(id, AttemptState::InFlight).is_none() {
            return;
        }
        self.attempts[id.0 as usize].state = AttemptState::Over;
        let transparent = match how {
            Ended::NotSent if self.not_sent < MAX_NOT_SENT => {
                self.not_sent += 1;
                true
            }
            Ended::Refused if !self.refused_once => {
                self.refused_once = true;
                true
            }
            _ => false,
        };
        if transparent && !self.buffer_full && !self.deadline_passed(now) {
            self.stats.transparent_retries += 1;
            return self.resend(id, now);
        }
        let (code, pushback, finish) = match how {
            Ended::Status { code, pushback } => (code, pushback, Finish::Forward(id)),
            Ended::Failed { code } => (code, Pushback::None, Finish::Status(code, Reason::Attempt(id))),
            Ended::NotSent | Ended::Refused => {
                (Code::Unavailable, Pushback::None, Finish::Status(Code::Unavailable, Reason::Attempt(id)))
            }
        };
        if code == Code::Ok {
            if let Some(t) = throttle {
                t.on_success();
            }
            return self.finish(finish);
        }
        match &self.mode {
            Mode::Plain => self.finish(finish),
            Mode::Retry { .. } => self.retry_after(code, pushback, finish, now, rng, throttle),
            Mode::Hedging { .. } => self.hedge_after(code, pushback, finish, now, throttle),
        }
    }

    /// A timer from [`Call::poll_timeout`] fired.
    pub fn on_timeout(&mut self, now: Duration, throttle: Option<&Throttle>) {
        self.timeout(now, throttle);
        self.settle();
    }

    fn timeout(&mut self, now: Duration, throttle: Option<&Throttle>) {
        if self.done {
            return;
        }
        if self.deadline_passed(now) {
            self.cancel_others();
            return self.finish(Finish::Status(Code::DeadlineExceeded, Reason::Deadline));
        }
        match &mut self.mode {
            Mode::Plain => {}
            Mode::Retry { backoff_until, .. } => {
                if backoff_until.is_some_and(|t| t <= now) {
                    *backoff_until = None;
                    self.send_new(now, false);
                }
            }
            Mode::Hedging { .. } => self.try_hedge(now, throttle),
        }
    }

    /// The request outgrew the replay buffer: no attempt can start again.
    pub fn on_buffer_full(&mut self) {
        if !self.buffer_full && !self.done {
            self.buffer_full = true;
            self.stats.committed_by_buffer = true;
            match &mut self.mode {
                Mode::Plain => {}
                Mode::Retry { backoff_until, .. } => *backoff_until = None,
                Mode::Hedging { schedule, .. } => schedule.iter_mut().for_each(HedgeSchedule::stop),
            }
            self.settle();
        }
    }

    /// Ends the call when nothing is in flight or being placed and nothing is due:
    /// whatever stopped the last attempt (throttle, buffer, pushback), its failure is
    /// the answer.
    fn settle(&mut self) {
        if self.done || self.placing() || self.in_flight().next().is_some() {
            return;
        }
        let pending = match &self.mode {
            Mode::Plain => false,
            Mode::Retry { backoff_until, .. } => backoff_until.is_some(),
            Mode::Hedging { schedule, .. } => schedule.as_ref().and_then(HedgeSchedule::next_due).is_some(),
        };
        if let Some(last) = self.last_failure.filter(|_| !pending) {
            self.finish(last);
        }
    }

    /// The caller went away.
    pub fn on_cancelled(&mut self) {
        if !self.done {
            self.cancel_others();
            self.finish(Finish::Status(Code::Cancelled, Reason::Cancelled));
        }
    }

    fn retry_after(
        &mut self,
        code: Code,
        pushback: Pushback,
        finish: Finish,
        now: Duration,
        rng: &mut dyn Rng,
        throttle: Option<&Throttle>,
    ) {
        let Mode::Retry { policy, state, backoff_until } = &mut self.mode else { return };
        if let Some(t) = throttle.filter(|_| policy.retryable.contains(code) || pushback == Pushback::Stop) {
            t.on_failure();
        }
        if self.buffer_full {
            return self.finish(finish);
        }
        let allowed = throttle.is_none_or(Throttle::allows);
        match state.next(policy, code, pushback, allowed, &mut RngRef(rng)) {
            Verdict::Retry { after } => {
                let at = now.saturating_add(after);
                if self.setup.deadline.is_some_and(|d| at >= d) {
                    return self.finish(finish); // the backoff would outlive the deadline
                }
                *backoff_until = Some(at);
                self.last_failure = Some(finish);
            }
            Verdict::Stop(reason) => {
                self.stats.throttled |= reason == StopReason::Throttled;
                self.finish(finish);
            }
        }
    }

    fn hedge_after(
        &mut self,
        code: Code,
        pushback: Pushback,
        finish: Finish,
        now: Duration,
        throttle: Option<&Throttle>,
    ) {
        let Mode::Hedging { policy, schedule, blocked } = &mut self.mode else { return };
        if policy.is_fatal(code) && !self.buffer_full {
            self.cancel_others();
            return self.finish(finish);
        }
        if let Some(t) = throttle.filter(|_| !policy.is_fatal(code) || pushback == Pushback::Stop) {
            t.on_failure();
        }
        self.last_failure = Some(finish);
        *blocked = false; // an endpoint is free again
        if let Some(s) = schedule {
            match pushback {
                Pushback::Stop => s.stop(),
                Pushback::After(d) => s.push_back(now.saturating_add(d)),
                Pushback::None => s.on_nonfatal_failure(now),
            }
        }
        self.try_hedge(now, throttle);
    }

    /// Starts the hedge that is due, if the throttle allows.
    fn try_hedge(&mut self, now: Duration, throttle: Option<&Throttle>) {
        let placing = self.placing();
        let Mode::Hedging { schedule: Some(s), blocked: false, .. } = &mut self.mode else { return };
        if !s.is_due(now) || self.buffer_full || placing {
            return;
        }
        if throttle.is_some_and(|t| !t.allows()) {
            s.stop();
            self.stats.throttled = true;
            return;
        }
        self.send_new(now, true);
    }

    /// A new attempt, counted toward `maxAttempts` once placed.
    fn send_new(&mut self, now: Duration, hedge: bool) {
        let id = AttemptId(self.attempts.len() as u32);
        self.attempts.push(Attempt {
            state: AttemptState::Placing,
            number: self.placed,
            endpoint: None,
            counted: false,
        });
        let send = self.send(id, now, hedge);
        self.actions.push(Action::Send(send));
    }

    /// The same attempt again, transparently: no attempt counted, same number.
    fn resend(&mut self, id: AttemptId, now: Duration) {
        let hedge = matches!(self.mode, Mode::Hedging { .. }) && self.attempts[id.0 as usize].number > 0;
        self.attempts[id.0 as usize].state = AttemptState::Placing;
        let send = self.send(id, now, hedge);
        self.actions.push(Action::Send(send));
    }

    fn send(&self, id: AttemptId, now: Duration, hedge: bool) -> Send {
        let left = self.time_left(now);
        let wait_until = match (self.setup.wait_for_ready && !hedge, self.setup.deadline) {
            (false, _) => None,
            (true, Some(d)) => Some(d),
            (true, None) => Some(now.saturating_add(self.setup.connect_timeout)),
        };
        Send {
            attempt: id,
            previous_attempts: self.attempts[id.0 as usize].number,
            timeout: left,
            wait_until,
            avoid: self.tried.to_vec(),
            exclude: if hedge { self.in_flight().map(|(_, e)| e).collect() } else { Vec::new() },
        }
    }

    fn finish(&mut self, how: Finish) {
        if !self.done {
            self.done = true;
            self.actions.push(Action::Finish(how));
        }
    }

    fn cancel_others(&mut self) {
        for (i, a) in self.attempts.iter_mut().enumerate() {
            if a.state != AttemptState::Over {
                a.state = AttemptState::Over;
                self.actions.push(Action::Cancel(AttemptId(i as u32)));
            }
        }
    }

    fn in_flight(&self) -> impl Iterator<Item = (AttemptId, SocketAddr)> + '_ {
        let running = self.attempts.iter().enumerate().filter(|(_, a)| a.state == AttemptState::InFlight);
        running.filter_map(|(i, a)| Some((AttemptId(i as u32), a.endpoint?)))
    }

    fn placing(&self) -> bool {
        self.attempts.iter().any(|a| a.state == AttemptState::Placing)
    }

    fn live(&mut self, id: AttemptId, state: AttemptState) -> Option<&mut Attempt> {
        if self.done {
            return None;
        }
        self.attempts.get_mut(id.0 as usize).filter(|a| a.state == state)
    }

    fn deadline_passed(&self, now: Duration) -> bool {
        self.setup.deadline.is_some_and(|d| now >= d)
    }
}

/// `&mut dyn Rng` as an `impl Rng`.
struct RngRef<'a>(&'a mut dyn Rng);

impl Rng for RngRef<'_> {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

#[cfg(test)]
mod tests;
