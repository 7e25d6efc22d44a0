//! The driver of one call: runs [`lb_core::call::Call`], turning its actions into IO
//! (placing attempts on endpoints, sending them, cancelling them, sleeping until its
//! timers) and the IO's outcomes into its events. Every decision is the state
//! machine's; this module only waits and sends.

use std::{net::SocketAddr, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use lb_core::{
    Code,
    call::{self, Action, AttemptId, Call, Ended, Finish, Policy, Reason, Setup},
    retry::{MethodConfig, ServiceConfig, Throttle},
    rng::SplitMix64,
};
use smallvec::SmallVec;
use tokio::time::Instant;
use tracing::debug;

use crate::{
    counters::Counters,
    error::Error,
    pool::{Outcome, Picked, Pool},
    replay::{BoxError, Budget, ReplayBody},
    response::CallEnd,
    response::UpstreamBody,
    transport::{self, Failure},
    wire::{Head as ResponseHead, absolute, encode_timeout, grpc_timeout},
};

/// Everything calls share: the pool, the limits, the policies and their state.
pub(crate) struct Shared<B> {
    /// The endpoints and their connections.
    pub pool: Arc<Pool<ReplayBody<B>>>,
    /// Request bytes one call may keep for replays and retries.
    pub replay_limit: usize,
    /// Larger request messages fail with RESOURCE_EXHAUSTED.
    pub max_message: u32,
    /// Request bytes all calls together may keep.
    pub budget: Budget,
    /// Per-method timeouts and policies.
    pub config: ServiceConfig,
    /// One bucket for the target, when the config has `retryThrottling`.
    pub throttle: Option<Throttle>,
    pub counters: Counters,
    /// Record per-method counters and histograms (`Settings::metrics`).
    pub metrics: bool,
}

/// The parts of a request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn request<T>(&self, body: T, send: &call::Send) -> Request<T> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        if let Some(left) = send.timeout {
            req.headers_mut().insert("grpc-timeout", encode_timeout(left));
        }
        if send.previous_attempts > 0 {
            req.headers_mut().insert("grpc-previous-rpc-attempts", HeaderValue::from(send.previous_attempts));
        }
        req
    }
}

const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What an attempt's future reports.
enum Step<B> {
    /// Waited for and found an endpoint.
    Placed(Picked<ReplayBody<B>>, call::Send),
    /// No endpoint became ready in time.
    NoEndpoint,
    /// The response headers.
    Response(Response<transport::Body>),
    /// No response headers.
    Failed(Failure),
}

type AttemptFuture<B> = BoxFuture<'static, Step<B>>;

/// What the driver knows about each attempt beyond the state machine.
struct Slot<B> {
    /// The attempt's IO while it runs; dropping it resets the stream (RST_STREAM CANCEL).
    io: Option<AttemptFuture<B>>,
    /// A status response kept to forward, or the headers that committed.
    response: Option<Response<transport::Body>>,
    /// Why it failed, for the caller's message.
    error: Option<String>,
    /// Its request body reader, for the commit.
    reader: usize,
    /// Where its outcome goes once known (taken when recorded): outlier detection.
    outcome: Option<Outcome>,
}

struct Driver<'a, B> {
    shared: &'a Shared<B>,
    head: Head,
    body: ReplayBody<B>,
    started: Instant,
    call: Call,
    /// The method's `waitForReady`, for the message when no endpoint was ready.
    wait_for_ready: bool,
    /// By attempt id; inline for the usual one or two attempts.
    slots: SmallVec<[Slot<B>; 2]>,
    /// Backoff jitter, seeded when first needed.
    rng: Option<SplitMix64>,
    /// Since `started`, read once per wake-up: every event of that wake-up shares it.
    now: Duration,
    /// The call's metrics were recorded (or handed to the response body).
    recorded: bool,
}

/// Dropped unrecorded: the caller went away mid-call. Its attempts and the call count
/// as CANCELLED; outlier detection hears nothing.
impl<B> Drop for Driver<'_, B> {
    fn drop(&mut self) {
        if !self.shared.metrics || (self.recorded && self.slots.iter().all(|s| s.outcome.is_none())) {
            return;
        }
        let counters = &self.shared.counters;
        let row = counters.method(self.head.uri.path(), false);
        for slot in &mut self.slots {
            if let Some(outcome) = slot.outcome.take() {
                outcome.cancelled(Some(row.0));
            }
        }
        if !self.recorded {
            counters.record_row(row, &self.call.stats(), Code::Cancelled, self.started.elapsed());
        }
    }
}

pub(crate) async fn forward<B>(shared: &Shared<B>, req: Request<B>) -> Result<Response<UpstreamBody>, tonic::Status>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let uri = absolute(parts.uri, &shared.pool.authority);
    let head = Head { method: parts.method, uri, version: parts.version, headers: parts.headers };
    let method = shared.config.lookup(head.uri.path());
    let deadline = match (grpc_timeout(&head.headers), method.and_then(|m| m.timeout)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let policy = match method.map(|m| (&m.retry, &m.hedging)) {
        Some((Some(retry), _)) => Policy::Retry(retry.clone()),
        Some((None, Some(hedging))) => Policy::Hedging(hedging.clone()),
        _ => Policy::None,
    };
    let wait_for_ready = MethodConfig::waits_for_ready(method);
    let setup = Setup { deadline, wait_for_ready, connect_timeout: shared.pool.connector.connect_timeout, policy };
    let body = ReplayBody::new(body, shared.replay_limit, shared.max_message, shared.budget.clone());
    let mut driver = Driver {
        shared,
        head,
        body,
        started,
        call: Call::new(setup),
        wait_for_ready,
        slots: SmallVec::new(),
        rng: None,
        now: Duration::ZERO,
        recorded: false,
    };
    let mut result = driver.run().await;
    let stats = driver.call.stats();
    driver.recorded = true;
    match &mut result {
        _ if !shared.metrics => {}
        // Committed on headers: the status comes at the end of the body, which records.
        Ok(resp) if !resp.headers().contains_key("grpc-status") => {
            let uri = std::mem::take(&mut driver.head.uri);
            let call = CallEnd { counters: shared.counters.clone(), uri, stats, started };
            resp.body_mut().record_call_at_end(call);
        }
        Ok(resp) => {
            let code = resp.headers().get("grpc-status").map_or(Code::Ok, |c| Code::from_header(c.as_bytes()));
            shared.counters.record(driver.method(), &stats, code, started.elapsed());
        }
        Err(s) => {
            let code = crate::code::from_tonic(s.code());
            shared.counters.record(driver.method(), &stats, code, started.elapsed());
        }
    }
    let previous = stats.attempts.saturating_sub(1);
    match result {
        Ok(mut resp) => {
            if previous > 0 {
                resp.headers_mut().insert("grpc-previous-rpc-attempts", HeaderValue::from(previous));
            }
            Ok(resp)
        }
        Err(mut status) => {
            if previous > 0 {
                status.metadata_mut().insert("grpc-previous-rpc-attempts", previous.into());
            }
            Err(status)
        }
    }
}

impl<B> Driver<'_, B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    async fn run(&mut self) -> Result<Response<UpstreamBody>, tonic::Status> {
        loop {
            while let Some(action) = self.call.poll_action() {
                match action {
                    Action::Send(send) => self.send(send),
                    Action::Cancel(id) => {
                        let slot = &mut self.slots[id.0 as usize];
                        slot.io = None; // resets the stream with CANCEL
                        if let Some(outcome) = slot.outcome.take()
                            && self.shared.metrics
                        {
                            outcome.cancelled(Some(self.shared.counters.method(self.head.uri.path(), false).0));
                        }
                    }
                    Action::Commit(id) => return Ok(self.commit(id)),
                    Action::Finish(how) => return self.finish(how),
                }
            }
            if let Some(too_large) = self.body.too_large() {
                return Err(Error::TooLarge(too_large).into());
            }
            let timer = self.call.poll_timeout().and_then(|d| self.started.checked_add(d));
            tokio::select! {
                Some((id, step)) = next_step(&mut self.slots) => {
                    self.now = self.started.elapsed();
                    self.check_buffer(); // before the event: it decides whether to retry
                    self.on_step(id, step);
                }
                () = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    self.now = self.started.elapsed();
                    self.check_buffer();
                    self.call.on_timeout(self.now, self.shared.throttle.as_ref());
                }
                // The state machine always leaves something in flight or due until it
                // finishes; if that ever broke, fail the call rather than the process.
                else => return Err(tonic::Status::internal("call engine stalled with nothing in flight")),
            }
        }
    }

    /// The body outgrew the replay buffer while attempts read it: tell the call.
    fn check_buffer(&mut self) {
        if !self.body.is_replayable() {
            self.call.on_buffer_full();
        }
    }

    /// Where the attempt was placed: every attempt that ends or commits was.
    fn endpoint(&self, id: AttemptId) -> SocketAddr {
        self.call.endpoint(id).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn method(&self) -> &str {
        self.head.uri.path()
    }

    /// Places the attempt now if an endpoint is ready, else waits for one when allowed.
    fn send(&mut self, send: call::Send) {
        let id = send.attempt;
        if self.slots.len() <= id.0 as usize {
            self.slots.resize_with(id.0 as usize + 1, || Slot {
                io: None,
                reader: 0,
                response: None,
                error: None,
                outcome: None,
            });
        }
        let may_wait = send.wait_until.is_some();
        match self.shared.pool.pick(self.method(), &send.avoid, &send.exclude, may_wait) {
            Ok(picked) => self.start(send, picked),
            Err(_) => match send.wait_until {
                None => self.call.on_no_endpoint(id, self.now),
                Some(d) => {
                    // Beyond what an Instant holds: a century is forever enough.
                    let until = self.started.checked_add(d).unwrap_or_else(|| Instant::now() + CENTURY);
                    self.wait(send, until);
                }
            },
        }
    }

    fn wait(&mut self, send: call::Send, until: Instant) {
        let pool = self.shared.pool.clone();
        let method = self.method().to_owned();
        let id = send.attempt;
        let fut = async move {
            match pool.wait_pick(&method, &send.avoid, &send.exclude, until).await {
                Some(picked) => Step::Placed(picked, send),
                None => Step::NoEndpoint,
            }
        };
        self.push(id, fut);
    }

    /// Sends the attempt on the endpoint picked for it.
    fn start(&mut self, send: call::Send, picked: Picked<ReplayBody<B>>) {
        let id = send.attempt;
        debug!(addr = %picked.addr, tier = ?picked.tier, attempt = send.previous_attempts + 1, "Sending");
        self.call.on_placed(id, picked.addr, self.now);
        let body = self.body.replay();
        let slot = &mut self.slots[id.0 as usize];
        slot.reader = body.reader();
        slot.outcome = Some(picked.outcome);
        let req = self.head.request(body, &send);
        // `map`, not an async block: a block holding the send across its await would
        // keep the connection and the request twice in every attempt's state.
        let fut = picked.upstream.send(req).map(|sent| match sent {
            Ok(resp) => Step::Response(resp),
            Err(failure) => Step::Failed(failure),
        });
        self.push(id, fut);
    }

    fn push(&mut self, id: AttemptId, fut: impl Future<Output = Step<B>> + Send + 'static) {
        self.slots[id.0 as usize].io = Some(Box::pin(fut));
    }

    fn on_step(&mut self, id: AttemptId, step: Step<B>) {
        let now = self.now;
        let throttle = self.shared.throttle.as_ref();
        match step {
            Step::Placed(picked, mut send) => {
                send.timeout = self.call.time_left(now); // the wait used some of it
                self.start(send, picked);
            }
            Step::NoEndpoint => self.call.on_no_endpoint(id, now),
            Step::Response(resp) => match ResponseHead::read(&resp) {
                ResponseHead::Headers => {
                    self.slots[id.0 as usize].response = Some(resp);
                    self.call.on_headers(id, throttle);
                }
                ResponseHead::TrailersOnly { code, pushback } => {
                    self.slots[id.0 as usize].response = Some(resp);
                    self.ended(id, Ended::Status { code, pushback }, now);
                }
                ResponseHead::NotGrpc { code } => {
                    let status = resp.status();
                    self.slots[id.0 as usize].error = Some(format!("answered HTTP {status} without a grpc-status"));
                    self.ended(id, Ended::Failed { code }, now);
                }
            },
            Step::Failed(Failure { ended, error }) => {
                debug!(addr = ?self.call.endpoint(id), ?ended, %error, "Attempt failed");
                self.slots[id.0 as usize].error = Some(error.to_string());
                self.ended(id, ended, now);
            }
        }
    }

    fn ended(&mut self, id: AttemptId, how: Ended, now: Duration) {
        // Outlier detection hears every end but those the endpoint is not to blame for:
        // a request never sent or refused unprocessed, or one that failed on its own.
        if let Some(outcome) = self.slots[id.0 as usize].outcome.take()
            && !self.body.failed_by_caller()
        {
            let method = |code| {
                let shared = self.shared;
                shared.metrics.then(|| shared.counters.method(self.head.uri.path(), code == Code::Ok).0)
            };
            match how {
                Ended::NotSent | Ended::Refused => {}
                // A lost connection (or an HTTP 502/503/504) always counts.
                Ended::Failed { code: Code::Unavailable } => outcome.lost(method(Code::Unavailable)),
                Ended::Status { code, .. } | Ended::Failed { code } => outcome.status(code, method(code)),
            }
        }
        // Seeded on first use: only a retry's backoff needs randomness.
        let rng = self.rng.get_or_insert_with(SplitMix64::from_entropy);
        self.call.on_ended(id, how, now, rng, self.shared.throttle.as_ref());
    }

    fn commit(&mut self, id: AttemptId) -> Response<UpstreamBody> {
        let slot = &mut self.slots[id.0 as usize];
        self.body.commit(slot.reader); // other attempts' readers fail; the buffer goes
        let resp = slot.response.take().unwrap_or_else(|| unreachable!("committed on its response"));
        // Committed on headers, the status comes in the trailers: the body records it.
        let outcome = slot.outcome.take();
        resp.map(|b| UpstreamBody::new(b, self.endpoint(id), outcome))
    }

    fn finish(&mut self, how: Finish) -> Result<Response<UpstreamBody>, tonic::Status> {
        if let Some(too_large) = self.body.too_large() {
            return Err(Error::TooLarge(too_large).into()); // why the attempt failed
        }
        let pool = &self.shared.pool;
        let target = pool.target.clone();
        let error = match how {
            Finish::Forward(id) => return Ok(self.commit(id)),
            Finish::Status(_, Reason::Deadline) => {
                Error::Deadline { target, attempts: self.call.stats().attempts, tried: pool.describe() }
            }
            Finish::Status(_, Reason::NoEndpoint) => {
                let waited = if self.wait_for_ready { pool.connector.connect_timeout } else { Duration::ZERO };
                Error::NoEndpoint { target, waited, tried: pool.describe() }
            }
            Finish::Status(code, Reason::Attempt(id)) => {
                let why = self.slots[id.0 as usize].error.take().unwrap_or_default();
                Error::Upstream { code, addr: self.endpoint(id), why }
            }
            Finish::Status(_, Reason::Cancelled) => Error::Cancelled,
        };
        Err(error.into())
    }
}

/// The next step of any running attempt; `None` when none runs. A scan rather than a
/// `FuturesUnordered`: calls have one attempt or a few, and this costs no allocation.
async fn next_step<B>(slots: &mut [Slot<B>]) -> Option<(AttemptId, Step<B>)> {
    std::future::poll_fn(|cx| {
        let mut running = false;
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(io) = &mut slot.io else { continue };
            running = true;
            if let Poll::Ready(step) = io.as_mut().poll(cx) {
                slot.io = None;
                return Poll::Ready(Some((AttemptId(i as u32), step)));
            }
        }
        if running { Poll::Pending } else { Poll::Ready(None) }
    })
    .await
}
