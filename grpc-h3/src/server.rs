//! The HTTP/3 server loop: accepts QUIC connections, feeds each request to a tower
//! service (tonic routes or the proxy), and streams the response back with its
//! trailers. On shutdown: GOAWAY on every connection, in-flight requests get until the
//! drain deadline, then the connection closes with H3_NO_ERROR.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h3::error::Code;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{Notify, watch};
use tonic::transport::server::TcpConnectInfo;
use tower::{Service, ServiceExt};
use tracing::{debug, info};

use crate::{
    BoxError,
    body::{H3Body, ServerRecv},
};

/// How long a draining connection waits for its last responses to be delivered.
const LINGER: Duration = Duration::from_millis(250);

/// The body of requests the server hands to the service.
pub type ServerBody = H3Body<ServerRecv>;

/// Serves `svc` on `endpoint` until `shutdown` resolves, then drains for up to `drain`.
pub async fn serve<S, RB>(endpoint: quinn::Endpoint, svc: S, shutdown: impl Future<Output = ()>, drain: Duration)
where
    S: Service<Request<ServerBody>, Response = Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    let local = endpoint.local_addr().ok();
    let (stop_tx, stop) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                conns.spawn(connection(incoming, svc.clone(), local, stop.clone(), drain));
            }
            () = &mut shutdown => break,
        }
    }
    info!(drain_ms = drain.as_millis() as u64, "HTTP/3: draining");
    let _ = stop_tx.send(true);
    let all_done = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(drain + Duration::from_millis(200), all_done).await;
    endpoint.close(Code::H3_NO_ERROR.value().try_into().unwrap_or_default(), b"");
}

/// Requests in flight on one connection, and a wake-up when the count drops.
#[derive(Default)]
struct InFlight {
    n: AtomicUsize,
    done: Notify,
}

struct Ticket(Arc<InFlight>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

async fn connection<S, RB>(
    incoming: quinn::Incoming,
    svc: S,
    local: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    S: Service<Request<ServerBody>, Response = Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    let quic = match incoming.await {
        Ok(c) => c,
        Err(e) => return debug!(error = %e, "HTTP/3: handshake failed"),
    };
    // The address the peer reached: the packet's destination IP where the OS tells it.
    let local_addr = match (local, quic.local_ip()) {
        (Some(l), Some(ip)) => Some(SocketAddr::new(ip, l.port())),
        (l, _) => l,
    };
    let info = TcpConnectInfo { local_addr, remote_addr: Some(quic.remote_address()) };
    let mut conn = match h3::server::builder().build(h3_quinn::Connection::new(quic.clone())).await {
        Ok(c) => c,
        Err(e) => return debug!(error = %e, "HTTP/3: connection setup failed"),
    };
    let inflight = Arc::new(InFlight::default());
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Ok(Some(resolver)) => {
                    inflight.n.fetch_add(1, Ordering::SeqCst);
                    let ticket = Ticket(inflight.clone());
                    let (svc, info) = (svc.clone(), info.clone());
                    tokio::spawn(async move {
                        handle(resolver, svc, info).await;
                        drop(ticket);
                    });
                }
                Ok(None) => return,
                Err(e) => return debug!(error = %e, "HTTP/3: connection ended"),
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // GOAWAY, then let the requests in flight finish, bounded by the drain.
    let _ = conn.shutdown(0).await;
    let finished = async {
        loop {
            let notified = inflight.done.notified();
            if inflight.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    };
    let deadline = tokio::time::Instant::now() + drain;
    let _ = tokio::time::timeout_at(deadline, finished).await;
    // Closing discards unsent stream data, and h3 does not say when the last bytes were
    // acknowledged: give them a moment, or until the peer closes first.
    let linger = (tokio::time::Instant::now() + LINGER).min(deadline);
    let _ = tokio::time::timeout_at(linger, quic.closed()).await;
    quic.close(Code::H3_NO_ERROR.value().try_into().unwrap_or_default(), b"");
}

/// In the extensions of every request served over HTTP/3 (tonic keeps extensions, not
/// the HTTP version), so a handler can tell which protocol carried its call.
#[derive(Debug, Clone, Copy)]
pub struct Http3;

async fn handle<S, RB>(resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>, svc: S, info: TcpConnectInfo)
where
    S: Service<Request<ServerBody>, Response = Response<RB>, Error = Infallible>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    let (req, stream) = match resolver.resolve_request().await {
        Ok(r) => r,
        Err(e) => return debug!(error = %e, "HTTP/3: bad request"),
    };
    let (mut send, recv) = stream.split();
    let mut req = req.map(|()| H3Body::new(recv));
    req.extensions_mut().insert(info);
    req.extensions_mut().insert(Http3);
    let Ok(resp) = svc.oneshot(req).await;
    let (parts, body) = resp.into_parts();
    tokio::pin!(body);
    if send.send_response(Response::from_parts(parts, ())).await.is_err() {
        return;
    }
    loop {
        match body.as_mut().frame().await {
            Some(Ok(frame)) => {
                let sent = match frame.into_data() {
                    Ok(data) => send.send_data(data).await,
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => send.send_trailers(t).await,
                        Err(_) => Ok(()),
                    },
                };
                if sent.is_err() {
                    return; // the peer reset or the connection died
                }
            }
            Some(Err(e)) => {
                // An unfinished body is reset, never ended cleanly.
                debug!(error = %e.into(), "HTTP/3: response body failed; resetting");
                return send.stop_stream(Code::H3_INTERNAL_ERROR);
            }
            None => break,
        }
    }
    let _ = send.finish().await;
}
