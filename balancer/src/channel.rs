//! [`Balancer`]: a `tower::Service` that places each HTTP/2 request on an endpoint,
//! local first, and transparently replays calls the endpoint never processed. Used by
//! the proxy for forwarding and by tonic clients as their channel.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use tokio::{sync::watch, time::Instant};
use tonic::Status;
use tracing::debug;

use crate::{
    discover::{Discovery, HostPort},
    error::Error,
    pool::Pool,
    replay::{BoxError, ReplayBody},
    response::UpstreamBody,
};

/// How a [`Balancer`] finds and reaches its endpoints.
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
    /// Request bytes kept per call so it can be replayed elsewhere.
    pub replay_limit: usize,
    /// Largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED.
    pub max_message: u32,
}

impl Settings {
    pub fn new(target: HostPort) -> Self {
        Settings {
            target,
            local_target: None,
            dns_server: None,
            resolve_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            replay_limit: 1 << 20,
            max_message: 4 << 20,
        }
    }
}

/// Transparent replays of unprocessed calls, at most, per call.
const MAX_REPLAYS: usize = 5;

/// Balances requests over every address of a DNS name. Cheap to clone.
pub struct Balancer<B> {
    pool: Arc<Pool<ReplayBody<B>>>,
    limits: Limits,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    replay: usize,
    message: u32,
}

impl<B> Clone for Balancer<B> {
    fn clone(&self) -> Self {
        Balancer { pool: self.pool.clone(), limits: self.limits }
    }
}

impl<B> Balancer<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Starts discovery and connections in the background (needs a tokio runtime).
    pub fn new(s: Settings) -> Result<Self, Error> {
        let discovery = Discovery::new(s.target, s.local_target, s.dns_server)?;
        let pool = Pool::spawn(discovery, s.resolve_interval, s.connect_timeout);
        Ok(Balancer { pool, limits: Limits { replay: s.replay_limit, message: s.max_message } })
    }

    /// The number of ready endpoints, updated as it changes.
    pub fn ready_endpoints(&self) -> watch::Receiver<usize> {
        self.pool.ready_count()
    }

    /// Sends `req` to an endpoint and returns its response headers; the body streams.
    pub fn send(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, Status>> + Send + 'static {
        let pool = self.pool.clone();
        let limits = self.limits;
        async move { forward(&pool, req, limits).await.map_err(Status::from) }
    }
}

/// The parts of a request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn request<T>(&self, body: T) -> Request<T> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

async fn forward<B>(
    pool: &Pool<ReplayBody<B>>,
    req: Request<B>,
    limits: Limits,
) -> Result<Response<UpstreamBody>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let deadline = grpc_timeout(req.headers()).map(|t| started + t);
    let until = deadline.unwrap_or(started + pool.connect_timeout);
    let (parts, body) = req.into_parts();
    let uri = absolute(parts.uri, &pool.authority);
    let head = Head { method: parts.method, uri, version: parts.version, headers: parts.headers };
    let body = ReplayBody::new(body, limits.replay, limits.message);
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let Some((addr, tier, mut send)) = pool.wait_pick(&tried, until).await else {
            let tried = pool.describe();
            let target = pool.target.clone();
            return Err(match deadline {
                Some(_) => Error::Deadline { target, tried },
                None => Error::NoEndpoint { target, waited: pool.connect_timeout, tried },
            });
        };
        debug!(%addr, ?tier, attempt = tried.len() + 1, "Sending");
        match send.try_send_request(head.request(body.replay())).await {
            Ok(resp) => {
                body.commit();
                return Ok(resp.map(|b| UpstreamBody::new(b, addr)));
            }
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let err = e.into_error();
                if let Some(too_large) = body.too_large() {
                    return Err(Error::TooLarge(too_large));
                }
                let replay = (unsent || unprocessed(&err)) && body.is_replayable();
                if !replay || tried.len() + 1 >= MAX_REPLAYS || Instant::now() >= until {
                    return Err(Error::Upstream { addr, source: err });
                }
                debug!(%addr, error = %err, "Unprocessed by endpoint; replaying elsewhere");
                pool.mark_failed(addr, &format!("unprocessed call: {err}"));
                tried.push(addr);
            }
        }
    }
}

/// HTTP/2 needs a scheme and an authority; tonic clients built on a bare service send
/// only the path.
fn absolute(uri: Uri, authority: &http::uri::Authority) -> Uri {
    if uri.scheme().is_some() && uri.authority().is_some() {
        return uri;
    }
    let mut parts = uri.into_parts();
    parts.scheme.get_or_insert(http::uri::Scheme::HTTP);
    parts.authority.get_or_insert_with(|| authority.clone());
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Whether the endpoint certainly did not process the call: the stream was refused,
/// was above a GOAWAY's last stream id, or the connection died before any response.
fn unprocessed(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || h2.is_go_away() || h2.is_io();
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = e.source();
    }
    err.is_closed() || err.is_canceled()
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<B> tower::Service<Request<B>> for Balancer<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(t("1S"), Some(Duration::from_secs(1)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "1", "1x", "123456789S", "-1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
