//! Keeping one connection per endpoint up: HTTP/2 over TCP (keepalive pings every
//! `--keepalive-interval`, fewer for a replica that refuses them) or HTTP/3 over QUIC (keep-alive 500 ms,
//! idle timeout 2 s), reconnecting with the jittered [`Backoff`]. In `auto`, HTTP/3 is
//! tried first, HTTP/2 is the fallback, and HTTP/3 is tried again every 30 s.

use std::{
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use futures_util::future::BoxFuture;
use lb_core::goaway::{ENHANCE_YOUR_CALM, ErrorCode};
use tokio::{
    sync::{mpsc::UnboundedSender, oneshot},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    backoff::Backoff,
    health::Watch,
    pool::Update,
    replay::BoxError,
    rng::SplitMix64,
    transport::{self, Connected, FromBytes, Upstream, h2::KeepAlive},
};

/// In `auto`, how long HTTP/3 gets before falling back, and when it is tried again.
const H3_ATTEMPT: Duration = Duration::from_secs(1);
const H3_RETRY: Duration = Duration::from_secs(30);

/// The protocol spoken to endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    H2,
    H3,
    /// HTTP/3 first, HTTP/2 when QUIC cannot connect.
    Auto,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "h2" => Ok(Protocol::H2),
            "h3" => Ok(Protocol::H3),
            "auto" => Ok(Protocol::Auto),
            _ => Err(format!("expected h2, h3 or auto, got {s:?}")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::H2 => "h2",
            Protocol::H3 => "h3",
            Protocol::Auto => "auto",
        })
    }
}

/// QUIC settings for HTTP/3 upstreams.
#[derive(Debug, Clone)]
pub(crate) struct H3 {
    pub endpoint: quinn::Endpoint,
    /// The name certificates are verified against (the target's host).
    pub server_name: String,
}

#[derive(Debug)]
pub(crate) struct Connector {
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval to start with (pinging idle connections too); see [`calmer`].
    pub keepalive: Duration,
    pub h3: Option<H3>,
    /// `healthCheckConfig.serviceName`: each connection watches this service's health.
    pub health_service: Option<Arc<str>>,
    /// The target as an HTTP authority, for the balancer's own requests.
    pub authority: http::uri::Authority,
}

/// The longest ping interval [`calmer`] backs off to: what gRPC servers accept by
/// default while a call is open.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(300);

/// The pings after a replica answered GOAWAY ENHANCE_YOUR_CALM "too_many_pings": twice
/// as far apart, up to [`MAX_KEEPALIVE`], as grpc-go does, and none while no call is
/// open (gRPC servers refuse those by default however far apart).
pub(crate) fn calmer(k: KeepAlive) -> KeepAlive {
    KeepAlive { interval: k.interval.saturating_mul(2).min(MAX_KEEPALIVE), while_idle: false }
}

impl Connector {
    async fn connect<B>(
        &self,
        addr: SocketAddr,
        keepalive: KeepAlive,
        h3_failed: &mut Option<Instant>,
    ) -> Result<Connected<B>, String>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        match (self.protocol, &self.h3) {
            (Protocol::H3, Some(h3)) => transport::h3::connect(h3, addr, self.connect_timeout).await,
            (Protocol::Auto, Some(h3)) if h3_failed.is_none_or(|t| t.elapsed() >= H3_RETRY) => {
                match transport::h3::connect(h3, addr, H3_ATTEMPT.min(self.connect_timeout)).await {
                    Ok(c) => {
                        *h3_failed = None;
                        Ok(c)
                    }
                    Err(why) => {
                        info!(%addr, %why, "HTTP/3 unavailable; falling back to HTTP/2");
                        *h3_failed = Some(Instant::now());
                        transport::h2::connect(addr, self.connect_timeout, keepalive).await
                    }
                }
            }
            _ => transport::h2::connect(addr, self.connect_timeout, keepalive).await,
        }
    }
}

/// Keeps one connection to `addr` up until the membership task aborts it, telling that
/// task each time the connection comes up or goes away, and, with health checking on,
/// what each connection's health watch says.
pub(crate) async fn connect_loop<B>(connector: Arc<Connector>, addr: SocketAddr, updates: UnboundedSender<Update<B>>)
where
    B: http_body::Body<Data = bytes::Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut backoff = Backoff::default();
    let mut rng = SplitMix64::from_entropy();
    let mut h3_failed = None;
    let mut keepalive = KeepAlive { interval: connector.keepalive, while_idle: true };
    let watch = connector.health_service.as_ref().map(|service| Watch {
        addr,
        service: service.clone(),
        authority: connector.authority.clone(),
        updates: updates.clone(),
    });
    let told_unimplemented = AtomicBool::new(false);
    let send = |update| updates.send(update).is_ok();
    loop {
        let why = match connector.connect::<B>(addr, keepalive, &mut h3_failed).await {
            Ok(mut c) => {
                backoff.reset();
                debug!(%addr, protocol = c.upstream.protocol(), "Connected");
                if !send(Update::Connected { addr, upstream: c.upstream.clone() }) {
                    return;
                }
                let mut health = watch_health(watch.as_ref(), &c.upstream, &told_unimplemented);
                let mut upgrade = h3_later(&connector, addr, &c.upstream);
                loop {
                    // Runs beside the connection and its health watch, neither paused.
                    tokio::select! {
                        end = &mut c.ended => {
                            let Ok(end) = end else { break "connection task ended".to_owned() };
                            if end.too_many_pings {
                                let was_ms = keepalive.interval.as_millis() as u64;
                                keepalive = calmer(keepalive);
                                warn!(%addr, was_ms, now_ms = keepalive.interval.as_millis() as u64,
                                    "Replica refused our pings (GOAWAY too_many_pings); pinging less often, and only during calls");
                            }
                            break end.why;
                        }
                        code = goaway(&mut c.goaway) => {
                            let Some(code) = code else {
                                c.goaway = None; // the connection is gone: `ended` says how
                                continue;
                            };
                            // Open calls finish on this connection; new ones need another.
                            if code == ENHANCE_YOUR_CALM {
                                let was_ms = keepalive.interval.as_millis() as u64;
                                keepalive = calmer(keepalive);
                                warn!(%addr, was_ms, now_ms = keepalive.interval.as_millis() as u64,
                                    "Replica refused our pings (GOAWAY ENHANCE_YOUR_CALM); pinging less often, and only during calls");
                                break "replica sent GOAWAY ENHANCE_YOUR_CALM (too_many_pings)".to_owned();
                            }
                            break format!("replica sent GOAWAY (code {code}): draining");
                        }
                        upgraded = &mut upgrade => {
                            if let Some(upgraded) = upgraded {
                                info!(%addr, "HTTP/3 available again; switching from HTTP/2");
                                if !send(Update::Connected { addr, upstream: upgraded.upstream.clone() }) {
                                    return;
                                }
                                c = upgraded; // the HTTP/2 connection drains and closes
                                health = watch_health(watch.as_ref(), &c.upstream, &told_unimplemented);
                            }
                            upgrade = h3_later(&connector, addr, &c.upstream);
                        }
                        () = &mut health => {}
                    }
                }
            }
            Err(why) => why,
        };
        debug!(%addr, %why, "Not connected");
        if !send(Update::Disconnected { addr, why }) {
            return;
        }
        tokio::time::sleep(backoff.next_delay(&mut rng)).await;
    }
}

/// The code of the GOAWAY the replica sent; `None` when the connection ended without
/// one. Never resolves when there is nothing to wait for.
async fn goaway(rx: &mut Option<oneshot::Receiver<ErrorCode>>) -> Option<ErrorCode> {
    match rx {
        Some(rx) => rx.await.ok(),
        None => std::future::pending().await,
    }
}

/// On an HTTP/2 fallback in `auto`, HTTP/3 tried again [`H3_RETRY`] from now: the new
/// connection if it came up. Never resolves otherwise.
fn h3_later<'a, B>(connector: &'a Connector, addr: SocketAddr, now: &Upstream<B>) -> BoxFuture<'a, Option<Connected<B>>>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    match &connector.h3 {
        Some(h3) if connector.protocol == Protocol::Auto && now.protocol() == "h2" => Box::pin(async move {
            tokio::time::sleep(H3_RETRY).await;
            transport::h3::connect::<B>(h3, addr, H3_ATTEMPT).await.ok()
        }),
        _ => Box::pin(std::future::pending()),
    }
}

/// The health watch on one connection, or nothing when health checking is off; it
/// runs for as long as it is polled.
fn watch_health<'a, B>(
    watch: Option<&'a Watch<B>>,
    upstream: &Upstream<B>,
    told_unimplemented: &'a AtomicBool,
) -> BoxFuture<'a, ()>
where
    B: http_body::Body<Data = bytes::Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    match watch {
        Some(w) => Box::pin(w.run(upstream.clone(), told_unimplemented)),
        None => Box::pin(std::future::pending()),
    }
}

/// A client QUIC endpoint trusting `ca`, bound to any local port.
pub(crate) fn client_endpoint(ca: &std::path::Path) -> Result<quinn::Endpoint, String> {
    let cfg = grpc_h3::tls::client_config(ca).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("[::]:0".parse().expect("literal"))
        .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal")))
        .map_err(|e| format!("binding a UDP socket for HTTP/3: {e}"))?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_pings_halves_the_ping_rate_up_to_five_minutes_and_stops_idle_pings() {
        let mut k = KeepAlive { interval: Duration::from_secs(1), while_idle: true };
        let mut seen = Vec::new();
        for _ in 0..10 {
            k = calmer(k);
            seen.push((k.interval.as_secs(), k.while_idle));
        }
        let want = [2, 4, 8, 16, 32, 64, 128, 256, 300, 300].map(|s| (s, false));
        assert_eq!(seen, want);
        assert_eq!(calmer(KeepAlive { interval: Duration::MAX, while_idle: true }).interval, MAX_KEEPALIVE);
    }
}
