//! [`Balancer`]: a `tower::Service` that places each HTTP/2 request on an endpoint,
//! local first, replays calls the endpoint never processed, and retries or hedges as
//! the service config says. Used by the proxy for forwarding and by tonic clients as
//! their channel.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use tokio::{sync::watch, time::Instant};
use tonic::Status;

use crate::{
    call::{Shared, forward},
    connect::{Connector, H3, Protocol, client_endpoint},
    counters::Counters,
    discover::{Discovery, Dns, HostPort},
    error::Error,
    kubernetes::KubernetesSettings,
    pool::{Endpoints, Outcome, Pool, PoolEvent},
    replay::{BoxError, Budget},
    response::UpstreamBody,
    retry::{ServiceConfig, Throttle},
};

/// How a [`Balancer`] finds and reaches its endpoints, and what it does on failure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The name with every replica (a headless Service).
    pub target: HostPort,
    /// A name whose addresses are this node's replicas; `None` = no locality.
    pub local_target: Option<HostPort>,
    /// A DNS server to ask instead of the system's.
    pub dns_server: Option<SocketAddr>,
    pub resolve_interval: Duration,
    /// Bounds each TCP connect, and how long a call without a deadline waits.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval to each endpoint (a silent one is dropped 750 ms after a
    /// missed ping); doubled for an endpoint that answers GOAWAY too_many_pings.
    pub keepalive: Duration,
    /// Request bytes kept per call so it can be replayed or retried elsewhere.
    pub replay_limit: usize,
    /// Request bytes kept by every call together.
    pub replay_total: usize,
    /// Largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED.
    pub max_message: u32,
    /// Per-method timeouts, retry and hedging policies, and the retry throttle.
    pub service_config: ServiceConfig,
    /// HTTP/2, HTTP/3, or HTTP/3 with HTTP/2 as the fallback.
    pub protocol: Protocol,
    /// The CA that signs the endpoints' certificates (needed for HTTP/3).
    pub ca_cert: Option<PathBuf>,
    /// Discover endpoints from a Service's EndpointSlices instead of DNS (`target`,
    /// `local_target` and `dns_server` are then unused).
    pub kubernetes: Option<KubernetesSettings>,
    /// Per-method counters and the call and attempt histograms (what
    /// [`Balancer::counters`] and [`EndpointView::attempts`] read); off, a call records
    /// only what outlier detection and the endpoints' rates need.
    pub metrics: bool,
}

impl Settings {
    pub fn new(target: HostPort) -> Self {
        Settings {
            target,
            local_target: None,
            dns_server: None,
            resolve_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(1),
            replay_limit: 1 << 20,
            replay_total: 16 << 20,
            max_message: 4 << 20,
            service_config: ServiceConfig::default(),
            protocol: Protocol::H2,
            ca_cert: None,
            kubernetes: None,
            metrics: true,
        }
    }
}

impl Settings {
    /// Settings that discover the endpoints from a Service's EndpointSlices.
    pub fn kubernetes(k: KubernetesSettings) -> Self {
        let port = match k.port {
            crate::kubernetes::PortRef::Number(n) => n,
            crate::kubernetes::PortRef::Name(_) => 0,
        };
        let mut s = Settings::new(HostPort { host: k.service.clone(), port });
        s.kubernetes = Some(k);
        s
    }
}

/// Balances requests over every address of a DNS name. Cheap to clone.
pub struct Balancer<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Balancer<B> {
    fn clone(&self) -> Self {
        Balancer { shared: self.shared.clone() }
    }
}

impl<B> Balancer<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    /// Starts discovery and connections in the background (needs a tokio runtime).
    pub fn new(s: Settings) -> Result<Self, Error> {
        // The name requests carry and certificates are checked against: the DNS name,
        // or the Service's (its short name, as a pod in its namespace resolves it).
        let host = s.kubernetes.as_ref().map_or_else(|| s.target.host.clone(), |k| k.service.clone());
        let authority = match &s.kubernetes {
            Some(_) => host.parse(),
            None => s.target.to_string().parse(),
        };
        let h3 = match (s.protocol, &s.ca_cert) {
            (Protocol::H2, _) => None,
            (_, None) => return Err(Error::H3(format!("--upstream-protocol {} needs --ca-cert", s.protocol))),
            (_, Some(ca)) => Some(H3 { endpoint: client_endpoint(ca).map_err(Error::H3)?, server_name: host }),
        };
        let connector = Connector {
            protocol: s.protocol,
            connect_timeout: s.connect_timeout,
            keepalive: s.keepalive,
            h3,
            health_service: s.service_config.health_check_service.as_deref().map(Arc::from),
            authority: authority.unwrap_or_else(|_| http::uri::Authority::from_static("localhost")),
        };
        if let Some(service) = &s.service_config.health_check_service {
            tracing::info!(service = %service, "Health checking every endpoint (grpc.health.v1.Health/Watch)");
        }
        if let Some(o) = &s.service_config.outlier {
            tracing::info!(
                consecutive_failures = ?o.consecutive_failures,
                success_rate = o.success_rate.is_some(),
                failure_percentage = o.failure_percentage.is_some(),
                interval_ms = o.interval.as_millis() as u64,
                base_ejection_ms = o.base_ejection_time.as_millis() as u64,
                max_ejection_percent = o.max_ejection_percent,
                "Outlier detection on"
            );
        }
        let discovery = match s.kubernetes {
            Some(k) => Discovery::Kubernetes(k),
            None => Discovery::Dns(Box::new(Dns::new(s.target, s.local_target, s.dns_server)?)),
        };
        let pool = Pool::spawn(discovery, s.resolve_interval, connector, s.service_config.outlier.clone());
        let counters = Counters::default();
        counters.spawn_reporter(pool.target.clone());
        let throttle = s.service_config.throttling.map(|(max, ratio)| {
            let pool = Arc::downgrade(&pool);
            Throttle::new(max, ratio).on_change(Box::new(move |allows, tokens| {
                if let Some(pool) = pool.upgrade() {
                    pool.throttle_changed(allows, tokens);
                }
            }))
        });
        let shared = Shared {
            pool,
            replay_limit: s.replay_limit,
            max_message: s.max_message,
            budget: Budget::new(s.replay_total),
            config: s.service_config,
            throttle,
            counters,
            metrics: s.metrics,
        };
        Ok(Balancer { shared: Arc::new(shared) })
    }

    /// The number of ready endpoints, updated as it changes.
    pub fn ready_endpoints(&self) -> watch::Receiver<usize> {
        self.shared.pool.ready_count()
    }

    /// What happens to the endpoints from now on: added, removed, state changes with why,
    /// GOAWAY, ejections, failover and failback. A reader that falls more than 1,024
    /// events behind misses the oldest (and is told how many); it never slows the
    /// balancer.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<PoolEvent> {
        self.shared.pool.events()
    }

    /// Every endpoint: its state, since when, why, and its counts; the last resolution.
    pub fn endpoints(&self) -> Endpoints {
        self.shared.pool.endpoints()
    }

    /// The retry throttle's tokens and capacity, when the config has `retryThrottling`.
    pub fn throttle(&self) -> Option<(f64, f64)> {
        let t = self.shared.throttle.as_ref()?;
        Some((f64::from(t.tokens()) / 1000.0, f64::from(t.max()) / 1000.0))
    }

    /// Counters per method: attempts, retries, hedges, throttled, outcomes.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Sends `req` to an endpoint and returns its response headers; the body streams.
    pub fn send(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, Status>> + Send + 'static {
        let shared = self.shared.clone();
        async move { forward(&shared, req).await }
    }
}

/// A replica picked for a call forwarded by other means than [`Balancer::send`] (the
/// proxy's frame relay), and where that attempt's outcome goes.
pub struct Placement {
    pub addr: SocketAddr,
    outcome: Outcome,
}

/// How a [`Placement`]'s attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// With this `grpc-status`, or a reset gRPC reads as it.
    Status(lb_core::Code),
    /// The connection was lost (UNAVAILABLE).
    Lost,
    /// The caller cancelled.
    Cancelled,
    /// The replica did not process it; the call goes on elsewhere.
    Refused,
    /// It failed with this status and the call's retry policy sends it again.
    Retried(lb_core::Code),
}

impl<B> Balancer<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    /// Picks a ready replica for a call to `path` now, as [`Balancer::send`] would,
    /// preferring those not in `avoid` (the replicas the call tried). When none is
    /// ready, `Err(Some(t))` says a call that `may_wait` should wait: a new local
    /// replica is connecting and has until `t` before calls go to other nodes (a call
    /// that may not wait is given a remote one instead); `Err(None)`, none at all.
    pub fn place(&self, path: &str, avoid: &[SocketAddr], may_wait: bool) -> Result<Placement, Option<Instant>> {
        let picked = self.shared.pool.pick(path, avoid, &[], may_wait)?;
        Ok(Placement { addr: picked.addr, outcome: picked.outcome })
    }

    /// The service config's retry policy for `path`, if any.
    pub fn retry_policy(&self, path: &str) -> Option<lb_core::retry::RetryPolicy> {
        self.shared.config.lookup(path).and_then(|m| m.retry.clone())
    }

    /// The service config's hedging policy for `path`, if any.
    pub fn hedging_policy(&self, path: &str) -> Option<lb_core::retry::HedgingPolicy> {
        self.shared.config.lookup(path).and_then(|m| m.hedging.clone())
    }

    /// The replay buffer every call shares (`--replay-buffer-total`).
    pub fn replay_budget(&self) -> &Budget {
        &self.shared.budget
    }

    /// The service config's retry throttle, if any.
    pub fn retry_throttle(&self) -> Option<&Throttle> {
        self.shared.throttle.as_ref()
    }

    /// The service config's timeout for `path`, if any.
    pub fn method_timeout(&self, path: &str) -> Option<Duration> {
        self.shared.config.lookup(path).and_then(|m| m.timeout)
    }

    /// Why [`Balancer::place`] found no replica, as a call hears it: at once (`waited`
    /// zero: fail-fast) or after waiting that long for one.
    pub fn unplaced(&self, waited: Duration) -> String {
        let pool = &self.shared.pool;
        Error::NoEndpoint { target: pool.target.clone(), waited, tried: pool.describe() }.to_string()
    }

    /// How long a call to `path` without a deadline waits for a ready endpoint when
    /// none is: the connect timeout, or `None` when its method says `waitForReady:
    /// false` (as [`Balancer::send`] waits).
    pub fn ready_wait(&self, path: &str) -> Option<Duration> {
        let method = self.shared.config.lookup(path);
        lb_core::retry::MethodConfig::waits_for_ready(method).then_some(self.shared.pool.connector.connect_timeout)
    }

    /// Marked changed whenever the endpoints do (added, removed, ready or not, ejected):
    /// a caller waiting for [`Balancer::place`] to find one tries again then.
    pub fn endpoints_changed(&self) -> watch::Receiver<()> {
        self.shared.pool.changes()
    }

    /// A placed attempt ended: outlier detection and the endpoint's metrics hear it as
    /// they hear [`Balancer::send`]'s (a refused one is not counted; its call goes on).
    /// The call itself is counted by [`Balancer::call_ended`].
    pub fn placed_ended(&self, p: Placement, path: &str, how: Placed) {
        let shared = &self.shared;
        let method = |code| shared.metrics.then(|| shared.counters.method(path, code == lb_core::Code::Ok).0);
        match how {
            Placed::Refused => {}
            Placed::Retried(code) | Placed::Status(code) => p.outcome.status(code, method(code)),
            Placed::Lost => p.outcome.lost(method(lb_core::Code::Unavailable)),
            Placed::Cancelled => p.outcome.cancelled(method(lb_core::Code::Cancelled)),
        }
    }

    /// A call made through [`Balancer::place`] is over with `code`, `took` after it
    /// came, having made the attempts `stats` counts: the metrics count it once, as
    /// they count [`Balancer::send`]'s.
    pub fn call_ended(&self, path: &str, code: lb_core::Code, stats: &lb_core::call::Stats, took: Duration) {
        if self.shared.metrics {
            self.shared.counters.record(path, stats, code, took);
        }
    }
}

impl<B> tower::Service<Request<B>> for Balancer<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<UpstreamBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Calls wait for an endpoint themselves, bounded by their deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(self.send(req))
    }
}
