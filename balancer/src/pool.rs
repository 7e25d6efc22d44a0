//! The IO around the pure picker. One task owns membership, connection, health and
//! ejection state: it applies the [`Update`]s that discovery, the connection tasks
//! ([`crate::connect`]) and their health watches ([`crate::health`]) send it, runs
//! outlier detection ([`Outliers`]) every interval and whenever a call signals a run of
//! failures, opens and closes connections, and publishes an immutable [`Snapshot`] after
//! each change. Calls pick from the latest snapshot without any lock, record each
//! attempt's outcome in its endpoint's [`Tally`] (atomics), and never wait on that task.
//! It holds only a `Weak` to the pool, so dropping the last [`crate::Balancer`] stops
//! everything.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use lb_core::{
    health::Health,
    outlier::{Event, OutlierConfig, Outliers, Tally, Why},
    rng::SplitMix64,
};
use tokio::{
    sync::{Notify, mpsc, watch},
    task::AbortHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    connect::{Connector, connect_loop},
    discover::{Discovery, Lookup},
    pick::{Constraints, Cursors, EndpointSet, Pick, Snapshot, Tier},
    transport::{FromBytes, Upstream},
};

pub(crate) struct Pool<B> {
    pub(crate) target: String,
    /// The target as an HTTP authority, for requests that come without one.
    pub(crate) authority: http::uri::Authority,
    pub(crate) connector: Arc<Connector>,
    /// The ready endpoints as of the last change: what calls pick from.
    snapshot: ArcSwap<Snapshot<Handle<B>>>,
    /// Round-robin positions per method, kept across snapshots.
    cursors: Cursors,
    /// Each endpoint and why it is not ready, for error messages.
    status: ArcSwap<String>,
    /// Each endpoint's state, for the admin API.
    view: ArcSwap<View>,
    /// What happens to the endpoints, as it happens.
    events: tokio::sync::broadcast::Sender<PoolEvent>,
    /// Bumped whenever an endpoint comes or goes, for calls waiting for one.
    changed: watch::Sender<()>,
    /// Number of ready endpoints, for health reporting.
    ready: watch::Sender<usize>,
    /// Asks discovery to resolve now.
    pub(crate) refresh: Arc<Notify>,
    /// A call's outcome made a run of failures long enough to eject: check now.
    pub(crate) nudge: Arc<Notify>,
}

/// What a call gets for an endpoint it picks: the connection, and where its outcome goes.
pub(crate) struct Handle<B> {
    upstream: Upstream<B>,
    tally: Arc<Tally>,
}
/// An endpoint picked for an attempt.
pub(crate) struct Picked<B> {
    pub addr: SocketAddr,
    pub tier: Tier,
    pub upstream: Upstream<B>,
    pub outcome: Outcome,
}

/// Where an attempt's outcome goes, once: its endpoint's tally, and a nudge to the
/// membership task when it makes a run of failures long enough to eject.
pub(crate) struct Outcome {
    tally: Arc<Tally>,
    nudge: Arc<Notify>,
    /// When the attempt was placed: its latency, for the endpoint's window.
    started: Instant,
}

/// The second a time falls in, counted from the first time anyone asked: the clock of
/// every endpoint's window.
fn second(t: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now)).as_secs()
}

impl Outcome {
    fn new(tally: Arc<Tally>, nudge: Arc<Notify>) -> Self {
        tally.started();
        Outcome { tally, nudge, started: Instant::now() }
    }

    /// The attempt's latency, into its endpoint's window and, with metrics on, its
    /// histogram for the method (`method`, a row of [`crate::counters::Counters`]) and
    /// status.
    fn clock(&self, method: Option<u16>, code: lb_core::Code) {
        let now = Instant::now();
        let micros = now.saturating_duration_since(self.started).as_micros() as u64;
        self.tally.window.record(second(now), micros);
        if let Some(method) = method {
            self.tally.attempts.record(lb_core::outlier::attempt_key(method, code), micros);
        }
    }

    /// Ended with `code` (a status, or what a reset or an HTTP error maps to): a
    /// failure if outlier detection lists it.
    pub(crate) fn status(self, code: lb_core::Code, method: Option<u16>) {
        self.clock(method, code);
        if self.tally.record_status(code) {
            self.nudge.notify_one();
        }
    }

    /// The connection was lost mid-response: a failure, whatever the list says.
    pub(crate) fn lost(self, method: Option<u16>) {
        self.clock(method, lb_core::Code::Unavailable);
        if self.tally.record(true) {
            self.nudge.notify_one();
        }
    }

    /// Cancelled by the caller or the call (a hedge that lost): its duration, as
    /// CANCELLED, and nothing for outlier detection.
    pub(crate) fn cancelled(self, method: Option<u16>) {
        if let Some(method) = method {
            let micros = self.started.elapsed().as_micros() as u64;
            self.tally.attempts.record(lb_core::outlier::attempt_key(method, lb_core::Code::Cancelled), micros);
        }
    }
}

/// What an endpoint is doing, as the admin API says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// No connection yet.
    Connecting,
    /// Connected, healthy, not ejected: takes calls.
    Ready,
    /// Sent GOAWAY: takes no new calls while its open ones finish.
    Draining,
    /// Its connection failed or could not be made.
    Failed,
    /// Outlier detection took it out; it keeps its connection.
    Ejected,
    /// Its health watch says it is not SERVING.
    Unhealthy,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Connecting => "connecting",
            EndpointState::Ready => "ready",
            EndpointState::Draining => "draining",
            EndpointState::Failed => "failed",
            EndpointState::Ejected => "ejected",
            EndpointState::Unhealthy => "unhealthy",
        }
    }

    pub const ALL: [EndpointState; 6] = [
        EndpointState::Connecting,
        EndpointState::Ready,
        EndpointState::Draining,
        EndpointState::Failed,
        EndpointState::Ejected,
        EndpointState::Unhealthy,
    ];
}

/// One endpoint for the admin API: its state, and counts since it appeared.
#[derive(Debug, Clone)]
pub struct EndpointView {
    pub address: SocketAddr,
    /// On this node (an address of the local name), in this zone, or elsewhere.
    pub tier: Tier,
    pub state: EndpointState,
    /// `h2` or `h3` while connected.
    pub protocol: Option<&'static str>,
    /// When it entered its state.
    pub since: SystemTime,
    /// Why it is not ready, when it is not.
    pub last_error: Option<String>,
    /// Attempts that ended with an outcome, and those of them that failed (as outlier
    /// detection counts them).
    pub calls: u64,
    pub failures: u64,
    /// Attempts placed on it and not yet ended.
    pub in_flight: u32,
    /// Times outlier detection ejected it.
    pub ejections: u32,
    /// Attempts ended per second over the last ten seconds, and their latency
    /// percentiles (until the response's end), `None` without any.
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Attempt durations (µs) by method row (see [`crate::counters::Counters::name`])
    /// and status.
    pub attempts: Vec<(crate::counters::MethodRow, lb_core::Code, lb_core::histogram::Reading)>,
}

/// Something that happened to the endpoints, for the admin API's event stream.
#[derive(Debug, Clone)]
pub struct PoolEvent {
    pub at: SystemTime,
    /// `added`, `removed`, `state`, `goaway`, `ejected`, `returned`, `failover`,
    /// `failback`, `throttle`.
    pub kind: &'static str,
    pub endpoint: Option<SocketAddr>,
    /// What changed and why, in words.
    pub detail: String,
}

/// Why a new connection is not picked yet, with health checking on.
const WAITING_FOR_HEALTH: &str = "waiting for the first health answer";

/// Events a slow reader may fall behind by before it misses some (it never holds the
/// membership task up).
const EVENTS: usize = 1024;

/// Every endpoint of the target, and the last resolution.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub target: String,
    /// Connections made, failed and lost since the start.
    pub links: Links,
    /// When discovery last answered.
    pub resolved_at: Option<SystemTime>,
    /// The last discovery failure, until the next answer.
    pub dns_error: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

/// What the membership task publishes for [`Pool::endpoints`]; counts are read live.
#[derive(Default)]
struct View {
    resolved_at: Option<SystemTime>,
    dns_error: Option<String>,
    endpoints: Vec<Row>,
    links: Links,
}

/// gRFC A94's `grpc.disconnect_error` for why a connection ended.
fn disconnect_error(why: &str) -> &'static str {
    if let Some(rest) = why.strip_prefix("replica sent GOAWAY") {
        return if rest.starts_with(" ENHANCE_YOUR_CALM") {
            "GOAWAY ENHANCE_YOUR_CALM"
        } else if rest.starts_with(" (code 0)") {
            "GOAWAY NO_ERROR"
        } else {
            "GOAWAY UNKNOWN"
        };
    }
    let why = why.to_ascii_lowercase();
    if why.contains("timed out") || why.contains("timeout") {
        "connection timed out"
    } else if why.contains("reset") {
        "connection reset"
    } else if why.contains("aborted") {
        "connection aborted"
    } else if why.contains("os error") || why.contains("broken pipe") {
        "socket error"
    } else {
        "unknown"
    }
}

struct Row {
    address: SocketAddr,
    tier: Tier,
    state: EndpointState,
    protocol: Option<&'static str>,
    since: SystemTime,
    last_error: Option<String>,
    ejections: u32,
    tally: Arc<Tally>,
}

/// An attempt is in flight until its outcome is recorded or it is let go.
impl Drop for Outcome {
    fn drop(&mut self) {
        self.tally.finished();
    }
}

/// What changes membership or connection state, sent to the task that owns them.
pub(crate) enum Update<B> {
    /// Discovery answered (or failed).
    Resolved(Lookup),
    /// A connection to `addr` is up and takes requests.
    Connected { addr: SocketAddr, upstream: Upstream<B> },
    /// The connection to `addr` is gone or could not be made.
    Disconnected { addr: SocketAddr, why: String },
    /// The health watch on `addr`'s connection answered or ended.
    Health { addr: SocketAddr, health: Health },
}

/// Owned by the membership task alone.
struct State<B> {
    set: EndpointSet,
    conns: HashMap<SocketAddr, Conn<B>>,
    /// The last DNS failure, for error messages; cleared by the next answer.
    dns_error: Option<String>,
    /// Discovery has answered at least once.
    resolved_once: bool,
    /// When discovery last answered with addresses (or none).
    resolved_at: Option<SystemTime>,
    /// Outcomes and ejections; `detect` says whether the config asked for detection.
    outliers: Outliers,
    detect: bool,
    /// When the pool started: outlier detection's clock counts from it.
    started: Instant,
    /// Where events go (a clone of the pool's sender).
    events: tokio::sync::broadcast::Sender<PoolEvent>,
    /// The tier calls go to, as last published: local, remote (failed over) or none.
    serving: Option<Tier>,
    /// When calls last moved to a worse tier or to none (cleared when they move back):
    /// discovery resolves more often meanwhile.
    failed_over: watch::Sender<Option<Instant>>,
    /// Connections made, failed and lost, for metrics.
    links: Links,
    rng: SplitMix64,
}

/// Connection counts since the pool started (gRFC A94's subchannel metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    pub attempts_succeeded: u64,
    pub attempts_failed: u64,
    /// By locality and A94's `grpc.disconnect_error`.
    pub disconnections: std::collections::BTreeMap<(Tier, &'static str), u64>,
}

struct Conn<B> {
    /// Where it sits, as discovery said when it appeared.
    tier: Tier,
    send: Option<Upstream<B>>,
    last_error: Option<String>,
    /// Healthy until a health watch says otherwise; with health checking on, a new
    /// connection is not until its first SERVING.
    health: Health,
    tally: Arc<Tally>,
    /// A connect attempt failed since the last connection: the replica went away (a
    /// restart), not just its connection (a GOAWAY, a connection age limit).
    went_away: bool,
    /// The state as last published, and since when.
    state: EndpointState,
    since: SystemTime,
    /// The replica sent GOAWAY and no connect attempt has ended since.
    draining: bool,
    /// Times outlier detection ejected it.
    ejections: u32,
    task: AbortHandle,
}

impl<B> Conn<B> {
    /// Connected and waiting for its first health answer: on its way in, neither ready
    /// nor failed.
    fn awaiting_health(&self) -> bool {
        self.send.is_some() && matches!(&self.health, Health::Unhealthy(why) if why == WAITING_FOR_HEALTH)
    }
}

impl<B> Drop for State<B> {
    fn drop(&mut self) {
        for conn in self.conns.values() {
            conn.task.abort();
        }
    }
}

impl<B> Pool<B>
where
    B: http_body::Body<Data = bytes::Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    /// Starts discovery and the membership task; connections open as endpoints appear.
    /// With `outlier`, endpoints are ejected as it says; without, outcomes are only
    /// counted.
    pub(crate) fn spawn(
        discovery: Discovery,
        interval: Duration,
        connector: Connector,
        outlier: Option<OutlierConfig>,
    ) -> Arc<Self> {
        let target = discovery.target();
        let pool = Arc::new(Pool {
            authority: connector.authority.clone(),
            target,
            connector: Arc::new(connector),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            cursors: Cursors::new(),
            status: ArcSwap::from_pointee("not resolved yet".to_owned()),
            view: ArcSwap::from_pointee(View::default()),
            events: tokio::sync::broadcast::Sender::new(EVENTS),
            changed: watch::Sender::new(()),
            ready: watch::Sender::new(0),
            refresh: Arc::new(Notify::new()),
            nudge: Arc::new(Notify::new()),
        });
        let (updates, rx) = mpsc::unbounded_channel();
        let tell = updates.clone();
        let (failed_over, failed_over_rx) = watch::channel(None);
        tokio::spawn(discovery.run(
            move |lookup| tell.send(Update::Resolved(lookup)).is_ok(),
            pool.refresh.clone(),
            interval,
            failed_over_rx,
        ));
        let state = State {
            set: EndpointSet::default(),
            conns: HashMap::new(),
            dns_error: None,
            resolved_once: false,
            resolved_at: None,
            detect: outlier.is_some(),
            outliers: Outliers::new(outlier.unwrap_or_default()),
            started: Instant::now(),
            events: pool.events.clone(),
            serving: None,
            failed_over,
            links: Links::default(),
            rng: SplitMix64::from_entropy(),
        };
        tokio::spawn(own(Arc::downgrade(&pool), state, updates, rx));
        pool
    }

    /// Picks a ready endpoint for `method` now: local first, round-robin per method,
    /// endpoints in `avoid` only when no other is ready, those in `exclude` never. When
    /// none is ready and `may_wait`, says until when a new local endpoint is being
    /// waited for, if one is; a caller that may not wait goes remote at once instead.
    pub(crate) fn pick(
        &self,
        method: &str,
        avoid: &[SocketAddr],
        exclude: &[SocketAddr],
        may_wait: bool,
    ) -> Result<Picked<B>, Option<Instant>> {
        let snapshot = self.snapshot.load();
        let constraints = Constraints { avoid, exclude, may_wait };
        match snapshot.pick_with(&self.cursors, method, &constraints, Instant::now().into_std()) {
            Pick::Endpoint { addr, tier, handle } => {
                let outcome = Outcome::new(handle.tally.clone(), self.nudge.clone());
                Ok(Picked { addr, tier, upstream: handle.upstream.clone(), outcome })
            }
            Pick::WaitUntil(t) => Err(Some(Instant::from_std(t))),
            Pick::NoneReady => Err(None),
        }
    }

    /// Like [`Pool::pick`], waiting until an endpoint is ready or `until` passes.
    pub(crate) async fn wait_pick(
        &self,
        method: &str,
        avoid: &[SocketAddr],
        exclude: &[SocketAddr],
        until: Instant,
    ) -> Option<Picked<B>> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let grace = match self.pick(method, avoid, exclude, true) {
                Ok(p) => return Some(p),
                Err(grace) => grace,
            };
            // Wake when something changes, or when a new local endpoint's grace ends.
            let wake = grace.map_or(until, |g| g.min(until));
            match tokio::time::timeout_at(wake, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return None,
                Err(_) if wake >= until => return None,
                Err(_) => {}
            }
        }
    }

    pub(crate) fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub(crate) fn ready_count(&self) -> watch::Receiver<usize> {
        self.ready.subscribe()
    }

    /// What the pool knows, for an error message: each endpoint and why it is not ready.
    pub(crate) fn describe(&self) -> String {
        self.status.load().as_ref().clone()
    }

    /// The retry throttle stopped or started allowing retries and hedges.
    pub(crate) fn throttle_changed(&self, allows: bool, tokens: u32) {
        let tokens = f64::from(tokens) / 1000.0;
        let detail = if allows {
            info!(tokens, "Retry throttle released: retries and hedges allowed again");
            format!("released: {tokens} tokens, retries and hedges allowed again")
        } else {
            warn!(tokens, "Retry throttle engaged: no retries or hedges until calls succeed again");
            format!("engaged: {tokens} tokens, at most half the bucket: no retries or hedges")
        };
        let _ = self.events.send(PoolEvent { at: SystemTime::now(), kind: "throttle", endpoint: None, detail });
    }

    /// The events from now on.
    pub(crate) fn events(&self) -> tokio::sync::broadcast::Receiver<PoolEvent> {
        self.events.subscribe()
    }

    /// Every endpoint as the admin API shows it, with live counts.
    pub(crate) fn endpoints(&self) -> Endpoints {
        let view = self.view.load();
        let now = second(Instant::now());
        let endpoints = view
            .endpoints
            .iter()
            .map(|r| {
                let (ok, failed) = r.tally.totals();
                let window = r.tally.window.summary(now);
                EndpointView {
                    rps: window.rate,
                    p50_ms: window.p50_ms,
                    p99_ms: window.p99_ms,
                    address: r.address,
                    tier: r.tier,
                    state: r.state,
                    protocol: r.protocol,
                    since: r.since,
                    last_error: r.last_error.clone(),
                    calls: ok + failed,
                    failures: failed,
                    in_flight: r.tally.in_flight(),
                    ejections: r.ejections,
                    attempts: r
                        .tally
                        .attempts
                        .read()
                        .into_iter()
                        .filter_map(|(key, reading)| {
                            let (row, code) = lb_core::outlier::split_attempt_key(key);
                            Some((crate::counters::MethodRow(row), code?, reading))
                        })
                        .collect(),
                }
            })
            .collect();
        Endpoints {
            target: self.target.clone(),
            links: view.links.clone(),
            resolved_at: view.resolved_at,
            dns_error: view.dns_error.clone(),
            endpoints,
        }
    }

    fn publish(&self, st: &State<B>) {
        self.view.store(Arc::new(st.view()));
        let snapshot = st.set.snapshot(|addr| {
            let conn = st.conns.get(&addr)?;
            Some(Handle { upstream: conn.send.clone()?, tally: conn.tally.clone() })
        });
        self.snapshot.store(Arc::new(snapshot));
        self.status.store(Arc::new(st.describe()));
        self.ready.send_if_modified(|n| std::mem::replace(n, st.set.ready_count()) != *n);
        self.changed.send_replace(());
    }
}

impl<B> State<B>
where
    B: http_body::Body<Data = bytes::Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.dns_error {
            parts.push(e.clone());
        } else if self.set.is_empty() {
            parts.push(if self.resolved_once { "the name has no addresses" } else { "not resolved yet" }.to_owned());
        }
        for (addr, tier) in self.set.addrs() {
            parts.push(format!("{addr} ({}): {}", tier.as_str(), self.state_of(addr)));
        }
        parts.join("; ")
    }

    /// Why `addr` takes calls or not, in a few words.
    fn state_of(&self, addr: SocketAddr) -> &str {
        match self.conns.get(&addr) {
            Some(c) if c.send.is_some() => match &c.health {
                Health::Unhealthy(why) => why.as_str(),
                Health::Healthy if self.outliers.is_ejected(addr) => "ejected",
                Health::Healthy if self.set.is_terminating(addr) => {
                    "terminating (its EndpointSlice says so): takes calls only while its tier has no other"
                }
                Health::Healthy => "ready",
            },
            Some(Conn { last_error: Some(e), .. }) => e.as_str(),
            _ => "connecting",
        }
    }

    /// What `addr` is now, for the admin API.
    fn classify(&self, addr: SocketAddr) -> EndpointState {
        match self.conns.get(&addr) {
            Some(c) if c.awaiting_health() => EndpointState::Connecting,
            Some(c) if c.send.is_some() => match &c.health {
                Health::Unhealthy(_) => EndpointState::Unhealthy,
                Health::Healthy if self.outliers.is_ejected(addr) => EndpointState::Ejected,
                Health::Healthy if self.set.is_terminating(addr) => EndpointState::Draining,
                Health::Healthy => EndpointState::Ready,
            },
            Some(c) if c.draining => EndpointState::Draining,
            Some(Conn { last_error: Some(_), .. }) => EndpointState::Failed,
            _ => EndpointState::Connecting,
        }
    }

    fn emit(&self, kind: &'static str, endpoint: Option<SocketAddr>, detail: String) {
        let _ = self.events.send(PoolEvent { at: SystemTime::now(), kind, endpoint, detail });
    }

    /// Brings each endpoint's state and its start time up to date, logging each one
    /// entering or leaving rotation (ready), with why: one line per change, whatever
    /// caused it.
    fn refresh_states(&mut self) {
        let addrs: Vec<SocketAddr> = self.set.addrs().map(|(a, _)| a).collect();
        for addr in addrs {
            let now = self.classify(addr);
            let Some(conn) = self.conns.get(&addr) else { continue };
            let was = conn.state;
            if now == was {
                continue;
            }
            if now == EndpointState::Ready {
                info!(%addr, "Endpoint in rotation");
            } else if was == EndpointState::Ready {
                warn!(%addr, why = %self.state_of(addr), "Endpoint out of rotation");
            }
            let why = if now == EndpointState::Ready { String::new() } else { format!(": {}", self.state_of(addr)) };
            self.emit("state", Some(addr), format!("{} -> {}{why}", was.as_str(), now.as_str()));
            if let Some(conn) = self.conns.get_mut(&addr) {
                conn.state = now;
                conn.since = SystemTime::now();
            }
        }
        // Which tier calls go to: failover when the last endpoint of the tier serving
        // leaves, failback when one of a better tier is back.
        let ready = |tier: Tier| {
            self.set
                .addrs()
                .any(|(a, t)| t == tier && self.conns.get(&a).is_some_and(|c| c.state == EndpointState::Ready))
        };
        let serving = Tier::ALL.into_iter().find(|&t| ready(t));
        if serving != self.serving {
            match (self.serving, serving) {
                (Some(was), Some(now)) if now > was => {
                    let (was, now) = (was.as_str(), now.as_str());
                    warn!(from = was, to = now, "No {was} endpoint ready; failing over to {now} ones");
                    self.emit("failover", None, format!("no {was} endpoint ready: calls go to {now} ones"));
                    self.failed_over.send_replace(Some(Instant::now()));
                }
                (Some(was), Some(now)) if now < was => {
                    let (was, now) = (was.as_str(), now.as_str());
                    info!(from = was, to = now, "A {now} endpoint is ready again; failing back");
                    self.emit("failback", None, format!("a {now} endpoint is ready again: calls go to it"));
                    self.failed_over.send_replace(None);
                }
                // Every endpoint gone is a failover too; one coming back from there is
                // no failback unless it is of the tier that was lost.
                (Some(_), None) => {
                    self.failed_over.send_replace(Some(Instant::now()));
                }
                _ => {}
            }
            self.serving = serving;
        }
    }

    /// Every endpoint for the admin API, in address order.
    fn view(&self) -> View {
        let endpoints = self
            .set
            .addrs()
            .filter_map(|(addr, tier)| {
                let c = self.conns.get(&addr)?;
                Some(Row {
                    address: addr,
                    tier,
                    state: c.state,
                    protocol: c.send.as_ref().map(Upstream::protocol),
                    since: c.since,
                    last_error: c.last_error.clone().or_else(|| match &c.health {
                        Health::Unhealthy(why) => Some(why.clone()),
                        Health::Healthy => None,
                    }),
                    ejections: c.ejections,
                    tally: c.tally.clone(),
                })
            })
            .collect();
        View { resolved_at: self.resolved_at, dns_error: self.dns_error.clone(), endpoints, links: self.links.clone() }
    }

    /// Applies one update; says whether anything changed.
    fn apply(&mut self, update: Update<B>, pool: &Pool<B>, updates: &mpsc::UnboundedSender<Update<B>>) -> bool {
        match update {
            Update::Resolved(Lookup::Failed(e)) => {
                if self.dns_error.as_ref() != Some(&e) {
                    warn!(target = %pool.target, error = %e, "Discovery failed; keeping known endpoints");
                }
                self.dns_error = Some(e);
            }
            Update::Resolved(Lookup::Found(resolved)) => {
                self.dns_error = None;
                if !self.resolved_once && resolved.all.is_empty() {
                    warn!(target = %pool.target, "Target has no addresses yet");
                }
                self.resolved_once = true;
                self.resolved_at = Some(SystemTime::now());
                let newly_terminating: Vec<SocketAddr> =
                    resolved.terminating.iter().copied().filter(|a| !self.set.is_terminating(*a)).collect();
                let changes = self.set.apply(&resolved, Instant::now().into_std());
                for addr in newly_terminating.into_iter().filter(|a| self.conns.contains_key(a)) {
                    info!(%addr, "Endpoint terminating (its EndpointSlice says so); no new calls while its tier has another");
                    self.emit("terminating", Some(addr), "its EndpointSlice says terminating".to_owned());
                }
                self.outliers.sync(&resolved.all);
                for addr in &changes.removed {
                    self.emit("removed", Some(*addr), "no longer in the target's addresses".to_owned());
                }
                for addr in &changes.added {
                    let place = resolved.tier(addr).as_str();
                    self.emit("added", Some(*addr), format!("new {place} address of the target"));
                }
                for addr in changes.removed {
                    info!(%addr, "Removing endpoint");
                    if let Some(conn) = self.conns.remove(&addr) {
                        conn.task.abort(); // in-flight calls keep their streams
                        if conn.send.is_some() {
                            *self.links.disconnections.entry((conn.tier, "subchannel shutdown")).or_default() += 1;
                        }
                    }
                }
                for addr in changes.added {
                    let tier = resolved.tier(&addr);
                    info!(%addr, tier = tier.as_str(), "Adding endpoint");
                    let task = tokio::spawn(connect_loop(pool.connector.clone(), addr, updates.clone()));
                    let tally = self.outliers.tally(addr).unwrap_or_else(|| unreachable!("synced above"));
                    let health = Health::Healthy;
                    let task = task.abort_handle();
                    let conn = Conn {
                        tier,
                        send: None,
                        last_error: None,
                        health,
                        tally,
                        went_away: false,
                        state: EndpointState::Connecting,
                        since: SystemTime::now(),
                        draining: false,
                        ejections: 0,
                        task,
                    };
                    self.conns.insert(addr, conn);
                }
                debug!(endpoints = self.set.len(), local = resolved.local.len(), "Membership updated");
            }
            Update::Connected { addr, upstream } => {
                let Some(conn) = self.conns.get_mut(&addr) else { return false };
                self.links.attempts_succeeded += 1;
                // A new connection waits for its first SERVING (A17); one replacing a
                // live connection (HTTP/3 taking over) keeps the health known so far.
                let fresh = conn.send.is_none();
                let came_back = fresh && std::mem::take(&mut conn.went_away);
                if fresh && conn.last_error.is_some() {
                    info!(%addr, protocol = upstream.protocol(), "Endpoint reconnected");
                }
                if pool.connector.health_service.is_some() && fresh {
                    conn.health = Health::Unhealthy(WAITING_FOR_HEALTH.to_owned());
                }
                conn.send = Some(upstream);
                conn.last_error = None;
                conn.draining = false;
                self.sync_ready(addr);
                // A replica that went away and is back (restarted) starts over; one that
                // only reconnected stays ejected for its time.
                if came_back && self.outliers.reconnected(addr).is_some() {
                    info!(%addr, "Endpoint back after going away; its ejection ends");
                    self.set.set_ejected(addr, false);
                }
            }
            Update::Disconnected { addr, why } => {
                let Some(conn) = self.conns.get_mut(&addr) else { return false };
                if conn.send.is_some() {
                    *self.links.disconnections.entry((conn.tier, disconnect_error(&why))).or_default() += 1;
                } else {
                    self.links.attempts_failed += 1;
                }
                conn.draining = conn.send.is_some() && why.starts_with("replica sent GOAWAY");
                if conn.draining {
                    info!(%addr, %why, "Connection draining; opening a new one");
                    let event =
                        PoolEvent { at: SystemTime::now(), kind: "goaway", endpoint: Some(addr), detail: why.clone() };
                    let _ = self.events.send(event);
                } else if conn.send.is_some() {
                    warn!(%addr, %why, "Connection lost");
                } else {
                    conn.went_away = true; // a connect attempt failed
                }
                conn.send = None;
                conn.last_error = Some(why);
                self.sync_ready(addr);
                pool.refresh.notify_one(); // the endpoint may have moved: resolve now
            }
            Update::Health { addr, health } => {
                let Some(conn) = self.conns.get_mut(&addr) else { return false };
                if conn.health == health {
                    return false;
                }
                match &health {
                    Health::Healthy => info!(%addr, "Endpoint healthy"),
                    Health::Unhealthy(why) => warn!(%addr, %why, "Endpoint unhealthy"),
                }
                conn.health = health;
                self.sync_ready(addr);
            }
        }
        true
    }

    /// Picked only with a connection up and a healthy answer. A new connection waiting
    /// for its first health answer is still on its way in, not ready and not failed: a
    /// new local endpoint keeps its start-up grace until it answers.
    fn sync_ready(&mut self, addr: SocketAddr) {
        if let Some(c) = self.conns.get(&addr) {
            if c.awaiting_health() {
                return; // not ready since it connected: nothing to record
            }
            self.set.set_ready(addr, c.send.is_some() && c.health == Health::Healthy);
        }
    }

    /// Since the pool started: outlier detection's clock.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// A call signalled a run of failures: eject what the run calls for.
    fn check_outliers(&mut self) -> bool {
        let now = self.now();
        let events = self.outliers.check(now);
        self.apply_events(events)
    }

    /// The interval passed: detection by success rate and failure percentage, returns.
    fn outlier_interval(&mut self) -> bool {
        let now = self.now();
        let events = self.outliers.on_interval(now, &mut self.rng);
        self.apply_events(events)
    }

    fn apply_events(&mut self, events: Vec<Event>) -> bool {
        let changed = !events.is_empty();
        let config = self.outliers.config();
        for event in events {
            match event {
                Event::Ejected { addr, why, times } => {
                    let time = config
                        .base_ejection_time
                        .saturating_mul(times)
                        .min(config.max_ejection_time.max(config.base_ejection_time));
                    let (ok, failed) = self.outliers.last_counts(addr);
                    let reason = match why {
                        Why::ConsecutiveFailures(n) => format!("{n} failures in a row"),
                        Why::SuccessRate { rate, threshold } => format!(
                            "success rate {:.1} % under {:.1} % ({ok} ok, {failed} failed last interval)",
                            f64::from(rate) / 10.0,
                            f64::from(threshold) / 10.0
                        ),
                        Why::FailurePercentage(p) => {
                            format!("{p} % of calls failed ({ok} ok, {failed} failed last interval)")
                        }
                    };
                    warn!(%addr, %reason, times, for_ms = time.as_millis() as u64, "Ejecting endpoint (outlier detection)");
                    let ms = time.as_millis();
                    self.emit("ejected", Some(addr), format!("{reason}; ejection {times}, for {ms} ms"));
                    if let Some(c) = self.conns.get_mut(&addr) {
                        c.ejections += 1;
                    }
                    self.set.set_ejected(addr, true);
                }
                Event::Returned { addr } => {
                    info!(%addr, "Endpoint back from ejection");
                    self.emit("returned", Some(addr), "back from ejection".to_owned());
                    self.set.set_ejected(addr, false);
                }
            }
        }
        changed
    }
}

/// The membership task: applies updates in order and publishes after each batch, until
/// the pool is dropped.
async fn own<B>(
    pool: Weak<Pool<B>>,
    mut state: State<B>,
    updates: mpsc::UnboundedSender<Update<B>>,
    mut rx: mpsc::UnboundedReceiver<Update<B>>,
) where
    B: http_body::Body<Data = bytes::Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let Some(nudge) = pool.upgrade().map(|p| p.nudge.clone()) else { return };
    let period = state.outliers.config().interval;
    let mut interval = tokio::time::interval_at(state.started + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { return };
                let Some(pool) = pool.upgrade() else { return };
                let mut changed = state.apply(update, &pool, &updates);
                while let Ok(more) = rx.try_recv() {
                    changed |= state.apply(more, &pool, &updates);
                }
                changed
            }
            () = nudge.notified() => state.check_outliers(),
            _ = interval.tick(), if state.detect => state.outlier_interval(),
        };
        if changed {
            let Some(pool) = pool.upgrade() else { return };
            state.refresh_states();
            pool.publish(&state);
        }
    }
}

/// Resolves every `interval`, and at once when asked, until the membership task is gone.
#[cfg(test)]
mod tests {
    #[test]
    fn disconnect_errors_are_named_as_a94_lists_them() {
        let cases = [
            ("replica sent GOAWAY (code 0): draining", "GOAWAY NO_ERROR"),
            ("replica sent GOAWAY ENHANCE_YOUR_CALM (too_many_pings)", "GOAWAY ENHANCE_YOUR_CALM"),
            ("replica sent GOAWAY (code 2): draining", "GOAWAY UNKNOWN"),
            ("connection lost: keep-alive timed out", "connection timed out"),
            ("connection lost: connection error: Connection reset by peer (os error 104)", "connection reset"),
            ("connection lost: Broken pipe (os error 32)", "socket error"),
            ("connection task ended", "unknown"),
        ];
        for (why, want) in cases {
            assert_eq!(super::disconnect_error(why), want, "{why}");
        }
    }
}
