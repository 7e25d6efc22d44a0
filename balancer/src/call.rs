//! One call through the balancer: wait for an endpoint (local first), replay attempts
//! the endpoint never processed, and apply the method's retry or hedging policy
//! (gRFC A6) from the service config. The decisions are the pure ones in
//! [`crate::retry`]; this module does the waiting and sending.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use lb_core::Code;
use tokio::time::Instant;
use tracing::debug;

use crate::{
    connect::Upstream,
    counters::{CallStats, Counters},
    error::Error,
    pool::Pool,
    replay::{BoxError, Budget, ReplayBody},
    response::{Inner, UpstreamBody},
    retry::{
        HedgeSchedule, HedgingPolicy, Pushback, RetryPolicy, ServiceConfig, Throttle, Verdict,
        policy::{RetryState, StopReason},
    },
    rng::SplitMix64,
    wire::{absolute, encode_timeout, grpc_timeout, pushback, status_code, unprocessed},
};

/// Transparent replays of unprocessed attempts, at most, per call.
const MAX_REPLAYS: u64 = 5;

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
    pub throttle: Option<Mutex<Throttle>>,
    pub counters: Counters,
    /// Backoff jitter.
    pub rng: Mutex<SplitMix64>,
}

/// The parts of a request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn request<T>(&self, body: T, previous_attempts: u64) -> Request<T> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        if previous_attempts > 0 {
            req.headers_mut().insert("grpc-previous-rpc-attempts", HeaderValue::from(previous_attempts));
        }
        req
    }
}

/// How an attempt ended.
enum Outcome {
    /// Response headers (and, when peeking, a first message) arrived: the call is
    /// committed to this attempt.
    Committed(Response<UpstreamBody>),
    /// The attempt ended with a status and no message: retryable if the policy says so.
    Status { code: Code, pushback: Pushback, resp: Response<UpstreamBody> },
}

struct Call<'a, B> {
    shared: &'a Shared<B>,
    head: Head,
    body: ReplayBody<B>,
    deadline: Option<Instant>,
    /// When waiting for an endpoint gives up.
    until: Instant,
    /// Endpoints this call was sent to, so retries prefer others.
    tried: Vec<SocketAddr>,
    stats: CallStats,
}

pub(crate) async fn forward<B>(shared: &Shared<B>, req: Request<B>) -> Result<Response<UpstreamBody>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let uri = absolute(parts.uri, &shared.pool.authority);
    let mut head = Head { method: parts.method, uri, version: parts.version, headers: parts.headers };
    let method = shared.config.lookup(head.uri.path());
    let mut deadline = grpc_timeout(&head.headers).map(|t| started + t);
    if let Some(t) = method.and_then(|m| m.timeout)
        && deadline.is_none_or(|d| started + t < d)
    {
        deadline = Some(started + t);
        head.headers.insert("grpc-timeout", encode_timeout(t));
    }
    let wait = method.and_then(|m| m.wait_for_ready) != Some(false);
    let until = if wait { deadline.unwrap_or(started + shared.pool.connector.connect_timeout) } else { started };
    let body = ReplayBody::new(body, shared.replay_limit, shared.max_message, shared.budget.clone());
    let mut call = Call { shared, head, body, deadline, until, tried: Vec::new(), stats: CallStats::default() };
    let result = match (method.and_then(|m| m.retry.as_ref()), method.and_then(|m| m.hedging.as_ref())) {
        (Some(p), _) => call.retry(p).await,
        (None, Some(h)) => call.hedge(h).await,
        (None, None) => call.attempt(0, false).await,
    };
    let (outcome, resp) = match result {
        Ok(Outcome::Committed(resp)) => ("RESPONSE", Ok(resp)),
        Ok(Outcome::Status { code, resp, .. }) => (code.name(), Ok(resp)),
        Err(e) => (crate::code::code_name(e.code()), Err(e)),
    };
    shared.counters.record(call.head.uri.path(), &call.stats, outcome);
    resp.map(|mut r| {
        if call.stats.attempts > 1 {
            r.headers_mut().insert("grpc-previous-rpc-attempts", HeaderValue::from(call.stats.attempts - 1));
        }
        r
    })
}

impl<B> Call<'_, B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// One attempt, replayed transparently on another endpoint while the endpoint
    /// certainly did not process it. `peek` reads ahead to the first message so a
    /// status in trailers after headers is seen before committing.
    async fn attempt(&mut self, previous: u64, peek: bool) -> Result<Outcome, Error> {
        loop {
            let (addr, send) = self.wait_pick().await?;
            self.stats.attempts += 1;
            let req = self.head.request(self.body.replay(), previous);
            match send_once(send, req, addr, peek).await {
                Ok(outcome) => {
                    // The request pump may have refused an oversized message after the
                    // endpoint answered the reset.
                    if let Some(too_large) = self.body.too_large() {
                        return Err(Error::TooLarge(too_large));
                    }
                    return Ok(outcome);
                }
                Err(AttemptError { err, unprocessed, .. }) => {
                    if let Some(too_large) = self.body.too_large() {
                        return Err(Error::TooLarge(too_large));
                    }
                    if !unprocessed || !self.body.is_replayable() || self.stats.replays >= MAX_REPLAYS {
                        return Err(Error::Upstream { addr, source: err });
                    }
                    self.shared.pool.mark_failed(addr, &format!("unprocessed call: {err}"));
                    if Instant::now() >= self.until {
                        return Err(self.no_endpoint());
                    }
                    debug!(%addr, error = %err, "Unprocessed by endpoint; replaying elsewhere");
                    self.stats.replays += 1;
                    self.stats.attempts -= 1; // transparent: counts toward nothing
                }
            }
        }
    }

    async fn wait_pick(&mut self) -> Result<(SocketAddr, Upstream<ReplayBody<B>>), Error> {
        let Some((addr, tier, send)) = self.shared.pool.wait_pick(&self.tried, self.until).await else {
            return Err(self.no_endpoint());
        };
        debug!(%addr, ?tier, attempt = self.stats.attempts + 1, "Sending");
        self.tried.push(addr);
        Ok((addr, send))
    }

    /// No endpoint took the call in time: names the target and what each address did.
    fn no_endpoint(&self) -> Error {
        let tried = self.shared.pool.describe();
        let target = self.shared.pool.target.clone();
        match self.deadline {
            Some(_) => Error::Deadline { target, tried },
            None => Error::NoEndpoint { target, waited: self.shared.pool.connector.connect_timeout, tried },
        }
    }

    async fn retry(&mut self, p: &RetryPolicy) -> Result<Outcome, Error> {
        let mut state = RetryState::default();
        loop {
            let outcome = self.attempt(u64::from(state.attempts - 1), true).await?;
            let Outcome::Status { code, pushback, .. } = &outcome else {
                self.on_success();
                return Ok(outcome);
            };
            let (code, pushback) = (*code, *pushback);
            if code == Code::Ok {
                self.on_success();
                return Ok(outcome);
            }
            if p.retryable.contains(code) {
                self.on_failure();
            }
            if !self.body.is_replayable() {
                self.stats.committed_by_buffer = true;
                return Ok(outcome);
            }
            let allowed = self.throttle_allows();
            let verdict = {
                let mut rng = self.shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                state.next(p, code, pushback, allowed, &mut *rng)
            };
            match verdict {
                Verdict::Retry { after } if self.deadline.is_none_or(|d| Instant::now() + after < d) => {
                    debug!(code = code.name(), after_ms = after.as_millis() as u64, "Retrying");
                    self.stats.retries += 1;
                    drop(outcome); // the failed attempt is over: free its stream before waiting
                    tokio::time::sleep(after).await;
                }
                Verdict::Stop(StopReason::Throttled) => {
                    self.stats.throttled = true;
                    return Ok(outcome);
                }
                _ => return Ok(outcome),
            }
        }
    }

    /// Attempts on the [`HedgeSchedule`], each on another endpoint; the first response
    /// commits, a fatal status ends the call, the rest are cancelled by being dropped.
    async fn hedge(&mut self, h: &HedgingPolicy) -> Result<Outcome, Error> {
        let mut running = FuturesUnordered::new();
        let (addr, send) = self.wait_pick().await?;
        let begun = Instant::now();
        self.stats.attempts += 1;
        running.push(send_once(send, self.head.request(self.body.replay(), 0), addr, true));
        let mut schedule = HedgeSchedule::new(h);
        let mut last: Option<Result<Outcome, Error>>;
        loop {
            let due = schedule.next_due().filter(|_| self.body.is_replayable()).map(|d| begun + d);
            tokio::select! {
                () = tokio::time::sleep_until(due.unwrap_or(begun)), if due.is_some() => {
                    self.try_hedge(&mut running, &mut schedule, begun.elapsed());
                    continue;
                }
                Some(res) = running.next() => {
                    match res {
                        Ok(Outcome::Status { code, pushback, resp }) if code != Code::Ok && !h.is_fatal(code) => {
                            self.on_failure();
                            if pushback == Pushback::Stop {
                                return Ok(Outcome::Status { code, pushback, resp });
                            }
                            last = Some(Ok(Outcome::Status { code, pushback, resp }));
                        }
                        Ok(outcome) => {
                            if !matches!(&outcome, Outcome::Status { code, .. } if *code != Code::Ok) {
                                self.on_success();
                            }
                            return Ok(outcome); // dropping `running` cancels the others
                        }
                        Err(AttemptError { addr, err, .. }) => {
                            self.on_failure();
                            last = Some(Err(Error::Upstream { addr, source: err }));
                        }
                    }
                }
            }
            let now = begun.elapsed();
            schedule.on_nonfatal_failure(now);
            if running.is_empty() && !(self.body.is_replayable() && self.try_hedge(&mut running, &mut schedule, now)) {
                self.stats.committed_by_buffer |= !self.body.is_replayable();
                return last.take().expect("an attempt ended");
            }
        }
    }

    /// Starts the hedge that is due, if the throttle and the endpoints allow, and tells
    /// the schedule either way.
    fn try_hedge(
        &mut self,
        running: &mut FuturesUnordered<AttemptFuture>,
        schedule: &mut HedgeSchedule,
        now: Duration,
    ) -> bool {
        if !schedule.is_due(now) {
            return false;
        }
        let started = self.start_hedge(running, schedule.started());
        if started {
            schedule.on_started(now);
        } else {
            schedule.on_deferred(now);
        }
        started
    }

    /// Starts one more hedged attempt on an endpoint not yet tried, if the throttle and
    /// the endpoints allow. Hedges never wait for an endpoint.
    fn start_hedge(&mut self, running: &mut FuturesUnordered<AttemptFuture>, started: u32) -> bool {
        if !self.throttle_allows() {
            self.stats.throttled = true;
            return false;
        }
        let Some((addr, _, send)) = self.shared.pool.pick(&self.tried) else { return false };
        if self.tried.contains(&addr) {
            return false; // every ready endpoint already has an attempt
        }
        self.tried.push(addr);
        self.stats.attempts += 1;
        self.stats.hedges += 1;
        debug!(%addr, attempt = started + 1, "Hedging");
        running.push(send_once(send, self.head.request(self.body.replay(), u64::from(started)), addr, true));
        true
    }

    fn throttle_allows(&self) -> bool {
        self.shared.throttle.as_ref().is_none_or(|t| t.lock().unwrap_or_else(|e| e.into_inner()).allows())
    }

    fn on_failure(&self) {
        if let Some(t) = &self.shared.throttle {
            t.lock().unwrap_or_else(|e| e.into_inner()).on_failure();
        }
    }

    fn on_success(&self) {
        if let Some(t) = &self.shared.throttle {
            t.lock().unwrap_or_else(|e| e.into_inner()).on_success();
        }
    }
}

/// An attempt that failed without a response.
struct AttemptError {
    addr: SocketAddr,
    err: BoxError,
    /// The endpoint certainly did not process it.
    unprocessed: bool,
}

type AttemptFuture = std::pin::Pin<Box<dyn Future<Output = Result<Outcome, AttemptError>> + Send>>;

/// Sends one attempt and classifies its response. On failure, says whether the
/// endpoint certainly did not process it.
fn send_once<B>(
    send: Upstream<ReplayBody<B>>,
    req: Request<ReplayBody<B>>,
    addr: SocketAddr,
    peek: bool,
) -> AttemptFuture
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(async move {
        match send {
            Upstream::H2(mut send) => match send.try_send_request(req).await {
                Ok(resp) => Ok(classify(resp.map(Inner::H2), addr, peek).await),
                Err(mut e) => {
                    let unsent = e.take_message().is_some();
                    let err = e.into_error();
                    let unprocessed = unsent || unprocessed(&err);
                    Err(AttemptError { addr, err: err.into(), unprocessed })
                }
            },
            Upstream::H3(mut client) => match client.send(req).await {
                Ok(resp) => Ok(classify(resp.map(Inner::H3), addr, peek).await),
                Err(e) => Err(AttemptError { addr, unprocessed: e.unprocessed, err: e.into() }),
            },
        }
    })
}

async fn classify(resp: Response<Inner>, addr: SocketAddr, peek: bool) -> Outcome {
    let (parts, body) = resp.into_parts();
    let mut body = UpstreamBody::new(body, addr);
    if let Some(code) = parts.headers.get("grpc-status") {
        // Trailers-only: the whole response is these headers.
        let (code, pushback) = (status_code(code), pushback(&parts.headers));
        return Outcome::Status { code, pushback, resp: Response::from_parts(parts, body) };
    }
    if !peek {
        return Outcome::Committed(Response::from_parts(parts, body));
    }
    let status = match body.peek().await.and_then(|f| f.trailers_ref()) {
        Some(t) => t.get("grpc-status").map(|c| (status_code(c), pushback(t))),
        None => None,
    };
    let resp = Response::from_parts(parts, body);
    match status {
        Some((code, pushback)) => Outcome::Status { code, pushback, resp },
        None => Outcome::Committed(resp),
    }
}
