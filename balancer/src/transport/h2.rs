//! HTTP/2 over TCP with the `h2` crate directly: the connection (keepalive pings every
//! `--keepalive-interval` of silence, a silent peer dropped 750 ms after a missed ping),
//! sending a request and its body, and what each failure means for gRPC
//! (PROTOCOL-HTTP2's mapping of RST_STREAM codes; a stream above a remote GOAWAY was
//! refused). An attempt's request body is sent from the attempt's own future; only a
//! body still streaming once the response headers are in gets a task of its own.

use std::{
    future::poll_fn,
    io,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body as _, Frame};
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

use super::{Body, BodyError, Connected, ConnectionEnd, Failure, Upstream};
use crate::replay::BoxError;

/// How long a ping may go unanswered: a silent peer (a hung replica, a dead node) is
/// noticed 1 to 1.25 intervals plus this after its last word, 1.75 to 2 s with the
/// default 1 s interval. A ping's round trip inside a cluster takes well under a millisecond.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(750);

/// Ticks per keepalive interval.
const QUARTERS: u32 = 4;

/// Response headers larger than this fail the attempt (hyper's default, kept).
const MAX_HEADER_LIST: u32 = 16 << 10;

/// How often to ping a connection, and whether also while no call is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub interval: Duration,
    pub while_idle: bool,
}

/// A connection to a replica that takes requests. Cheap to clone.
pub(crate) struct H2<B> {
    send: SendRequest<Bytes>,
    link: Arc<Link>,
    /// Requests are `Request<B>`; their bodies are sent as `Bytes`.
    body: PhantomData<fn(B)>,
}

impl<B> Clone for H2<B> {
    fn clone(&self) -> Self {
        H2 { send: self.send.clone(), link: self.link.clone(), body: PhantomData }
    }
}

/// What the connection's driver needs to know of its use, for keepalive.
#[derive(Default)]
struct Link {
    /// Bytes arrived since the driver last looked: the peer is alive, no ping needed.
    heard: AtomicBool,
    /// Streams open, so a ping is due only while calls wait on the peer (unless
    /// `while_idle`).
    open: AtomicUsize,
}

/// Counts a stream as open until dropped.
struct Open(Arc<Link>);

impl Open {
    fn new(link: &Arc<Link>) -> Open {
        link.open.fetch_add(1, Relaxed);
        Open(link.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// How long the first SYN is given before a fresh one is sent.
const FIRST_SYN_WAIT: Duration = Duration::from_millis(100);

/// A TCP connection within `timeout`, and the SYNs it took. A SYN that goes unanswered
/// (a restarted replica's address not up yet, its accept queue full) would wait for the
/// kernel's retransmission a whole second later, far beyond the 300 ms in which a
/// returning replica must be back in rotation; so an unanswered attempt is dropped for
/// a fresh one after 100 ms, then after twice as long each time, which still lets a
/// slow network's handshake finish.
async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<(TcpStream, u32), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = FIRST_SYN_WAIT;
    let mut syns = 1;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let this = wait.min(left);
        match tokio::time::timeout(this, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok((tcp, syns)),
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) if this < left => {
                wait = wait.saturating_mul(2);
                syns += 1;
            }
            Err(_) => return Err(format!("connect: timed out after {timeout:?}")),
        }
    }
}

/// Connects and pings as `keepalive` says, so a dead peer is noticed.
pub(crate) async fn connect<B>(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: KeepAlive,
) -> Result<Connected<B>, String> {
    let (tcp, syns) = tcp_connect(addr, timeout).await?;
    if syns > 1 {
        tracing::debug!(%addr, syns, "Connected after sending SYN afresh");
    }
    let _ = tcp.set_nodelay(true);
    let link = Arc::new(Link::default());
    let (goaway_tx, goaway) = oneshot::channel();
    let tcp = Watched { tcp, scan: GoAwayScan::default(), goaway: Some(goaway_tx), link: link.clone() };
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(1 << 20)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let pings = conn.ping_pong().expect("taken once, here");
    let (tx, ended) = oneshot::channel();
    // The driver outlives the pool's interest so in-flight streams finish on removal.
    tokio::spawn({
        let link = link.clone();
        async move {
            let _ = tx.send(drive(conn, pings, link, keepalive).await);
        }
    });
    let upstream = Upstream::H2(H2 { send, link, body: PhantomData });
    Ok(Connected { upstream, ended, goaway: Some(goaway) })
}

/// Runs the connection until it ends, pinging after an `interval` in which nothing
/// arrived while a stream was open (or always, `while_idle`).
async fn drive(
    mut conn: h2::client::Connection<Watched, Bytes>,
    mut pings: h2::PingPong,
    link: Arc<Link>,
    keepalive: KeepAlive,
) -> ConnectionEnd {
    // Silence is measured in quarters of the interval: a ping goes out between one
    // interval and a quarter more after the last bytes arrived.
    let mut tick = tokio::time::interval(keepalive.interval / QUARTERS);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset(); // the first tick a quarter from now
    let mut silent = 0;
    let ended = |r: Result<(), h2::Error>| match r {
        Ok(()) => ConnectionEnd { why: "connection closed (GOAWAY)".to_owned(), too_many_pings: false },
        Err(e) => {
            // gRPC servers say so in the GOAWAY's debug data; h2's own flood limits
            // send ENHANCE_YOUR_CALM too, and are not about pings.
            let calm = e.is_go_away()
                && e.is_remote()
                && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                && e.to_string().contains("too_many_pings");
            ConnectionEnd { why: format!("connection lost: {}", chain(&e)), too_many_pings: calm }
        }
    };
    loop {
        tokio::select! {
            r = &mut conn => return ended(r),
            _ = tick.tick() => {}
        }
        let idle = !keepalive.while_idle && link.open.load(Relaxed) == 0;
        silent = if link.heard.swap(false, Relaxed) || idle { 0 } else { silent + 1 };
        if silent < QUARTERS {
            continue;
        }
        silent = 0;
        if let Err(e) = pings.send_ping(h2::Ping::opaque()) {
            return ended(Err(e));
        }
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, poll_fn(|cx| pings.poll_pong(cx)));
        tokio::pin!(pong);
        tokio::select! {
            r = &mut conn => return ended(r),
            answered = &mut pong => match answered {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return ended(Err(e)),
                Err(_) => {
                    let why = format!("connection lost: keep-alive timed out (no ping answer in {KEEPALIVE_TIMEOUT:?})");
                    return ConnectionEnd { why, too_many_pings: false };
                }
            },
        }
    }
}

/// The TCP stream to a replica, telling when a GOAWAY arrives (h2 acts on a graceful
/// one only when a new request comes, and ends the connection only when its last
/// stream does, so a long-lived stream would otherwise hide the replica's drain) and
/// that the peer spoke (for keepalive).
struct Watched {
    tcp: TcpStream,
    scan: GoAwayScan,
    /// Until the first GOAWAY; nothing is scanned after it.
    goaway: Option<oneshot::Sender<ErrorCode>>,
    link: Arc<Link>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        let this = &mut *self;
        this.link.heard.store(true, Relaxed);
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

/// Opens a stream for `req`, sends its body and waits for the response headers.
pub(super) async fn send<B>(conn: H2<B>, req: Request<B>) -> Result<Response<Body>, Failure>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let H2 { send, link, .. } = conn;
    // Waits while the replica's stream limit is reached; an error means the connection
    // is gone and the request never left.
    let not_sent = |e: h2::Error| Failure { ended: Ended::NotSent, error: e.into() };
    let mut send = send.ready().await.map_err(not_sent)?;
    let (mut parts, body) = req.into_parts();
    strip_connection_headers(&mut parts.headers);
    let end = body.is_end_stream();
    let (mut response, stream) = match send.send_request(Request::from_parts(parts, ()), end) {
        Ok(opened) => opened,
        // A GOAWAY or a lost connection between `ready` and here: never sent.
        Err(e) if e.is_go_away() || e.is_io() => return Err(not_sent(e)),
        Err(e) => return Err(Failure { ended: Ended::Failed { code: Code::Internal }, error: e.into() }),
    };
    let open = Open::new(&link);
    let mut upload = (!end).then(|| Upload { body, stream, held: None });
    let head = poll_fn(|cx| {
        if let Some(up) = &mut upload
            && up.poll(cx).is_ready()
        {
            upload = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    match head {
        Ok(resp) => {
            // A streaming request goes on sending beside the response.
            if let Some(up) = upload {
                tokio::spawn(send_body(up.body, up.stream));
            }
            Ok(resp.map(|recv| Body::H2(H2Body { recv: RecvBody::new(recv), _open: open })))
        }
        Err(e) => Err(Failure { ended: classify(&e), error: e.into() }),
    }
}

/// A request body going out on its stream, as the replica's flow control allows.
struct Upload<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A data chunk waiting for send capacity, and whether it ends the body.
    held: Option<(Bytes, bool)>,
}

impl<B> Upload<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Ready when the body is sent, failed or no longer wanted.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // A reset from the replica (say, it answered early) ends the upload.
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((chunk, eos)) = self.held.take() {
                // Claim capacity only with data in hand: a claim held while the body
                // waits would pin the connection's window against other streams.
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(_) => return Poll::Ready(()), // closed or reset
                        Poll::Pending => {
                            self.held = Some((chunk, eos));
                            return Poll::Pending;
                        }
                    }
                }
                // h2 splits the chunk into frames as the window allows.
                if self.stream.send_data(chunk, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = self.body.is_end_stream();
                        if chunk.is_empty() {
                            if self.stream.send_data(chunk, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                        } else {
                            self.stream.reserve_capacity(1);
                            self.held = Some((chunk, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            let _ = self.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                // The caller's stream broke, or this attempt lost the race: the
                // replica must not take a truncated request as whole.
                Some(Err(_)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A response body from a replica: its data, then its trailers.
pub(crate) struct H2Body {
    recv: RecvBody,
    _open: Open,
}

impl H2Body {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.recv).poll_frame(cx).map_err(|e| (code_of(&e), BoxError::from(e)))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// The body of an HTTP/2 stream as it arrives, data and then trailers; each chunk's
/// flow-control window is given back as it is taken, so the peer may send as much
/// again.
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream) -> RecvBody {
        RecvBody { recv, data_done: false }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Sends `body` on `stream` as the peer's flow control allows. Ends once the body is
/// sent, when it fails (the stream is reset with CANCEL, so the peer does not take a
/// truncated message as whole) or when the peer resets the stream.
pub async fn send_body<B>(body: B, stream: SendStream<Bytes>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut upload = Upload { body, stream, held: None };
    poll_fn(|cx| upload.poll(cx)).await;
}

/// HTTP/1.1's connection-specific headers, which HTTP/2 forbids (a request carrying one
/// would be refused by h2 as malformed); `te` may only say `trailers`.
fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

/// What a failed HTTP/2 request means: refused unprocessed, or failed with a status.
fn classify(e: &h2::Error) -> Ended {
    if e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) {
        // A stream above the server's GOAWAY, or refused: the server never saw it.
        Ended::Refused
    } else {
        Ended::Failed { code: code_of(e) }
    }
}

/// The gRPC status for an HTTP/2 failure after the request went out: a reset's code
/// mapped as PROTOCOL-HTTP2 says, UNAVAILABLE for a lost connection.
pub(super) fn code_of(e: &h2::Error) -> Code {
    if e.is_reset() { e.reason().map_or(Code::Internal, |r| Code::from_h2_reason(r.into())) } else { Code::Unavailable }
}

/// An error and its causes, "connection error: broken pipe" rather than "connection error".
fn chain(err: &h2::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica whose accept queue is full drops SYNs, as one whose address is not up
    /// yet does: the kernel would send the SYN again only a second later.
    #[tokio::test]
    async fn an_unanswered_syn_is_sent_afresh_instead_of_waiting_for_the_kernel() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // One queued connection fills a backlog of 0; the next SYN is dropped.
        let _queued = TcpStream::connect(addr).await.unwrap();
        let dropped = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
        assert!(dropped.is_err(), "the accept queue is full: SYNs go unanswered");

        let connecting = tokio::spawn(tcp_connect(addr, Duration::from_secs(5)));
        // Let the first SYN be dropped, then make room, as a replica coming up would.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut accepted = Vec::new();
        while let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await {
            accepted.push(s);
        }
        let (_tcp, syns) = connecting.await.unwrap().unwrap();
        assert!(syns >= 2, "connected on the first SYN's retransmission, {syns} SYN");
    }
}
