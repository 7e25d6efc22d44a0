//! HTTP/2 over TCP: the connection (keepalive pings every `--keepalive-interval`, a
//! silent peer dropped 750 ms after a missed ping), sending, and what each failure means
//! for gRPC (PROTOCOL-HTTP2's mapping of RST_STREAM codes; a stream above a remote
//! GOAWAY was refused).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lb_core::{
    Code,
    call::Ended,
    goaway::{ErrorCode, GoAwayScan},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::oneshot,
};

use super::{Body, Connected, ConnectionEnd, Failure, Upstream};
use crate::replay::BoxError;

/// How long a ping may go unanswered: a silent peer (a hung replica, a dead node) is
/// noticed one interval plus this after its last word, 1.75 s with the default 1 s
/// interval. A ping's round trip inside a cluster takes well under a millisecond.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(750);

/// How often to ping a connection, and whether also while no call is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub interval: Duration,
    pub while_idle: bool,
}

/// Connects and pings as `keepalive` says, so a dead peer is noticed.
pub(crate) async fn connect<B>(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: KeepAlive,
) -> Result<Connected<B>, String>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err(format!("connect: timed out after {timeout:?}")),
    };
    let _ = tcp.set_nodelay(true);
    let (goaway_tx, goaway) = oneshot::channel();
    let tcp = Watched { tcp, scan: GoAwayScan::default(), goaway: Some(goaway_tx) };
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(keepalive.while_idle)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let (tx, ended) = oneshot::channel();
    // The driver outlives the pool's interest so in-flight streams finish on removal.
    tokio::spawn(async move {
        let end = match conn.await {
            Ok(()) => ConnectionEnd { why: "connection closed (GOAWAY)".to_owned(), too_many_pings: false },
            Err(e) => {
                // gRPC servers say so in the GOAWAY's debug data; h2's own flood limits
                // send ENHANCE_YOUR_CALM too, and are not about pings.
                let calm = find_h2(&e).is_some_and(|h2| {
                    h2.is_go_away()
                        && h2.is_remote()
                        && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                        && h2.to_string().contains("too_many_pings")
                });
                ConnectionEnd { why: format!("connection lost: {}", chain(&e)), too_many_pings: calm }
            }
        };
        let _ = tx.send(end);
    });
    Ok(Connected { upstream: Upstream::H2(send), ended, goaway: Some(goaway) })
}

/// The TCP stream to a replica, telling when a GOAWAY arrives: hyper acts on a graceful
/// one only when a new request comes, and ends the connection only when its last
/// stream does, so a long-lived stream would otherwise hide the replica's drain.
struct Watched {
    tcp: TcpStream,
    scan: GoAwayScan,
    /// Until the first GOAWAY; nothing is scanned after it.
    goaway: Option<oneshot::Sender<ErrorCode>>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        let this = &mut *self;
        if this.goaway.is_some()
            && let Some(code) = this.scan.feed(&buf.filled()[before..])
            && let Some(tx) = this.goaway.take()
        {
            let _ = tx.send(code);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

pub(super) async fn send<B>(mut send: SendRequest<B>, req: Request<B>) -> Result<Response<Body>, Failure>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    match send.try_send_request(req).await {
        Ok(resp) => Ok(resp.map(Body::H2)),
        Err(mut e) => {
            // hyper hands the request back when it never reached the connection.
            let unsent = e.take_message().is_some();
            let error = e.into_error();
            let ended = if unsent { Ended::NotSent } else { classify(&error) };
            Err(Failure { ended, error: error.into() })
        }
    }
}

/// What a failed HTTP/2 request means: refused unprocessed, or failed with a status.
fn classify(err: &hyper::Error) -> Ended {
    match find_h2(err) {
        Some(h2) if h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM)) => {
            // A stream above the server's GOAWAY, or refused: the server never saw it.
            Ended::Refused
        }
        _ => Ended::Failed { code: code_of(err) },
    }
}

/// The gRPC status for an HTTP/2 failure after the request went out: a reset's code
/// mapped as PROTOCOL-HTTP2 says, UNAVAILABLE for a lost connection.
pub(super) fn code_of(err: &hyper::Error) -> Code {
    match find_h2(err) {
        Some(h2) if h2.is_reset() => h2.reason().map_or(Code::Internal, |r| Code::from_h2_reason(r.into())),
        _ => Code::Unavailable,
    }
}

/// An error and its causes, "http2 error: keep-alive timed out" rather than "http2 error".
fn chain(err: &hyper::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text = format!("{text}: {next}");
        }
        source = e.source();
    }
    text
}

fn find_h2(err: &hyper::Error) -> Option<&h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = e.source();
    }
    None
}
