//! The `--relay` front: the IO around [`relay::Relay`]. One task per client connection
//! owns the client's socket and its own connections to the replicas its calls were
//! placed on; it reads whatever is ready, hands the bytes to the relay, and writes what
//! the relay queued. No task, channel or lock per call.

use std::{
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use balancer::{
    Placed, Placement,
    retry::{HedgingPolicy, RetryPolicy, Throttle},
};
use bytes::{Buf, BytesMut};
use relay::{Limits, Outcome, Pick, Relay};
use tokio::{
    io::{AsyncWrite, Interest},
    net::TcpStream,
    sync::watch,
    time::{Duration, Instant, Sleep, timeout},
};
use tracing::debug;

use crate::{App, front};

/// Reading from a side stops while more than this waits to be written to the other.
const HIGH_WATER: usize = 1 << 20;
/// Bytes read at a time.
const READ_SIZE: usize = 32 << 10;

/// Places the relay's calls with the balancer.
struct Placer {
    app: Arc<App>,
}

struct Attempt {
    app: Arc<App>,
    placement: Placement,
}

impl relay::Picker for Placer {
    type Attempt = Attempt;

    fn pick(&mut self, path: &str, avoid: &[SocketAddr], _retries: u32, may_wait: bool) -> Pick<Attempt> {
        match self.app.balancer.place(path, avoid, may_wait) {
            Ok(placement) => Pick::Replica(placement.addr, Attempt { app: self.app.clone(), placement }),
            Err(Some(until)) => Pick::LocalSoon(until.saturating_duration_since(Instant::now())),
            Err(None) => Pick::NoneReady,
        }
    }

    fn serving(&self) -> bool {
        *self.app.balancer.ready_endpoints().borrow() > 0
    }

    fn unavailable(&self, waited: Duration) -> String {
        self.app.balancer.unplaced(waited)
    }

    fn ready_wait(&self, path: &str) -> Option<Duration> {
        self.app.balancer.ready_wait(path)
    }

    fn retry_policy(&self, path: &str) -> Option<RetryPolicy> {
        self.app.balancer.retry_policy(path)
    }

    fn hedging_policy(&self, path: &str) -> Option<HedgingPolicy> {
        self.app.balancer.hedging_policy(path)
    }

    fn throttle(&self) -> Option<&Throttle> {
        self.app.balancer.retry_throttle()
    }

    fn call_ended(&self, path: &str, code: u8, stats: &relay::Stats, took: Duration) {
        self.app.balancer.call_ended(path, lb_code(code), stats, took);
        if let Some(coalesce) = &self.app.coalesce {
            coalesce.ended(took);
        }
    }

    fn method_timeout(&self, path: &str) -> Option<Duration> {
        self.app.balancer.method_timeout(path)
    }
}

impl relay::Attempt for Attempt {
    fn ended(self, path: &str, outcome: Outcome) {
        let how = match outcome {
            Outcome::Status(code) => Placed::Status(lb_code(code)),
            Outcome::Lost => Placed::Lost,
            Outcome::Cancelled => Placed::Cancelled,
            Outcome::Refused => Placed::Refused,
            Outcome::Retried(code) => Placed::Retried(lb_code(code)),
        };
        self.app.balancer.placed_ended(self.placement, path, how);
    }
}

fn lb_code(code: u8) -> balancer::code::Code {
    balancer::code::Code::from_i32(i32::from(code)).unwrap_or(balancer::code::Code::Unknown)
}

/// Seeds a connection's retry jitter from the clock and the client's address.
fn seed(peer: &SocketAddr) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((peer, std::time::SystemTime::now()))
}

/// A connection to a replica, by the relay's back id.
struct Back {
    id: u64,
    state: BackState,
    read: BytesMut,
}

enum BackState {
    Connecting(Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>),
    Up(TcpStream),
}

/// Relays one client connection until it closes, or until `drain` turns true and its
/// open calls are done.
pub(crate) async fn serve(tcp: TcpStream, peer: SocketAddr, app: Arc<App>, mut drain: watch::Receiver<bool>) {
    let connect_timeout = app.connect_timeout;
    let mut conn = Conn {
        relay: Relay::new(
            Placer { app: app.clone() },
            // The h2c front's limits, so both fronts refuse the same clients.
            Limits {
                max_streams: front::MAX_STREAMS,
                max_header_list: front::MAX_HEADER_LIST as usize,
                max_resets: front::MAX_ERROR_RESETS,
                max_message: app.max_message,
                replay: app.replay,
                replay_budget: app.balancer.replay_budget().clone(),
                keepalive: Some(app.keepalive),
                client_keepalive: Some(app.client_keepalive),
                client_ping_timeout: 2 * app.client_keepalive,
                ..Limits::default()
            },
            seed(&peer),
        ),
        client: tcp,
        read: BytesMut::with_capacity(READ_SIZE),
        backs: Vec::new(),
        connect_timeout,
        client_open: true,
        epoch: Instant::now(),
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        endpoints: app.balancer.endpoints_changed(),
        endpoints_change: None,
    };
    let drained = drain.wait_for(|d| *d);
    tokio::pin!(drained);
    let mut draining = false;
    let busy = app.busy.clone();
    let mut open = app.coalesce.as_ref().map(|c| c.open(0));
    let result = poll_fn(|cx| {
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.relay.drain();
        }
        let calls = conn.relay.open_calls();
        let r = conn.poll(cx);
        let now = conn.relay.open_calls();
        if let Some(busy) = &busy
            && now != calls
        {
            busy.touch();
        }
        if let Some(open) = &mut open {
            open.set(now);
        }
        r
    })
    .await;
    // Calls still open when the connection failed are cancelled, and counted so.
    conn.relay.client_closed();
    if let Err(e) = result {
        debug!(%peer, error = %e, "Relayed client connection ended with an error");
    }
}

struct Conn {
    relay: Relay<Placer>,
    client: TcpStream,
    read: BytesMut,
    backs: Vec<Back>,
    connect_timeout: Duration,
    client_open: bool,
    /// The origin of the relay's clock.
    epoch: Instant,
    /// Wakes the task when the relay's next retry backoff is over.
    timer: Pin<Box<Sleep>>,
    /// The balancer's endpoints, seen as of the last time waiting calls were placed.
    endpoints: watch::Receiver<()>,
    /// While calls wait for a ready replica: done when the endpoints change.
    endpoints_change: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Conn {
    /// Moves bytes until nothing is ready; `Ready` when the connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let now = Instant::now();
            self.relay.tick(now - self.epoch);
            let mut progress = self.reconcile();
            progress |= self.poll_connects(cx);
            let flushed = self.poll_writes(cx)?;
            // A client that answers no ping is let go with what is queued for it: a
            // vanished one would never read it.
            if self.relay.is_done() && (flushed || self.relay.client_silent()) {
                return Poll::Ready(Ok(()));
            }
            progress |= self.poll_reads(cx)?;
            progress |= self.poll_endpoints(cx);
            if let Some(due) = self.relay.next_timer() {
                // Moved only earlier, or once it fired: a later due (a replica heard from
                // again pushes its keepalive on) waits for the earlier wake-up, so the
                // timer is not re-registered on every read.
                let at = self.epoch + due;
                if at < self.timer.deadline() || self.timer.is_elapsed() {
                    self.timer.as_mut().reset(at);
                }
                progress |= self.timer.as_mut().poll(cx).is_ready();
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// While calls wait for a ready replica or watch health, tells the relay once the
    /// endpoints change. The change is looked for from the last time it was told, so
    /// one that came while the relay was finding none is not missed.
    fn poll_endpoints(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.relay.follows_readiness() {
            self.endpoints_change = None;
            return false;
        }
        let change = self.endpoints_change.get_or_insert_with(|| {
            let mut endpoints = self.endpoints.clone();
            Box::pin(async move {
                if endpoints.changed().await.is_err() {
                    // The balancer is gone: the calls' timers end them.
                    std::future::pending::<()>().await;
                }
            })
        });
        if change.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.endpoints_change = None;
        self.endpoints.borrow_and_update();
        self.relay.ready_changed();
        true
    }

    /// Opens a connection for each back the relay added; drops those it let go.
    fn reconcile(&mut self) -> bool {
        let (backs, relay) = (&self.backs, &self.relay);
        if relay.back_ids().count() == backs.len() && relay.back_ids().zip(backs).all(|(id, b)| id == b.id) {
            return false;
        }
        let mut changed = false;
        let wanted: Vec<(u64, SocketAddr)> = self.relay.backs().map(|b| (b.id, b.addr)).collect();
        let before = self.backs.len();
        self.backs.retain(|b| wanted.iter().any(|(id, _)| *id == b.id));
        changed |= self.backs.len() != before;
        for (id, addr) in wanted {
            if self.backs.iter().any(|b| b.id == id) {
                continue;
            }
            let limit = self.connect_timeout;
            let connect = async move {
                let tcp = timeout(limit, TcpStream::connect(addr))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                tcp.set_nodelay(true)?;
                Ok(tcp)
            };
            self.backs.push(Back { id, state: BackState::Connecting(Box::pin(connect)), read: BytesMut::new() });
            changed = true;
        }
        changed
    }

    fn poll_connects(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for b in &mut self.backs {
            let BackState::Connecting(connect) = &mut b.state else { continue };
            match connect.as_mut().poll(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(tcp)) => {
                    b.state = BackState::Up(tcp);
                    b.read = BytesMut::with_capacity(READ_SIZE);
                    self.relay.back_connected(b.id);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "Relay could not connect to a replica");
                    self.relay.back_lost(b.id);
                    progress = true;
                }
            }
        }
        progress
    }

    /// Writes what is queued; whether everything was written.
    fn poll_writes(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut flushed = write(&mut self.client, self.relay.client_out(), cx)?;
        let mut lost = Vec::new();
        for b in &mut self.backs {
            let BackState::Up(tcp) = &mut b.state else { continue };
            let Some(out) = self.relay.back_out(b.id) else { continue };
            match write(tcp, out, cx) {
                Ok(done) => flushed &= done,
                Err(_) => lost.push(b.id),
            }
        }
        for id in lost {
            self.relay.back_lost(id);
        }
        Ok(flushed)
    }

    fn poll_reads(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        let client_backlog = self.relay.client_out().len();
        // Reading stops while what the client's frames made us owe others (or the client
        // itself: acks, resets) waits to be written.
        let backlog = client_backlog >= HIGH_WATER || self.relay.backs().any(|b| b.out.len() >= HIGH_WATER);
        if self.client_open && backlog && client_backlog < HIGH_WATER {
            // Unread for a replica's backlog, not for the client's: not its silence.
            self.relay.client_unread();
        }
        if self.client_open && !backlog {
            match read(&self.client, &mut self.read, cx) {
                Poll::Ready(Ok(0)) => {
                    self.client_open = false;
                    self.relay.client_closed();
                    progress = true;
                }
                Poll::Ready(Ok(_)) => {
                    self.relay.client_read(&mut self.read);
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        if client_backlog >= HIGH_WATER {
            return Ok(progress);
        }
        let mut lost = Vec::new();
        for b in &mut self.backs {
            let BackState::Up(tcp) = &b.state else { continue };
            match read(tcp, &mut b.read, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => lost.push(b.id),
                Poll::Ready(Ok(_)) => {
                    self.relay.back_read(b.id, &mut b.read);
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        progress |= !lost.is_empty();
        for id in lost {
            self.relay.back_lost(id);
        }
        Ok(progress)
    }
}

/// Reads what the socket has into `buf`. A read shorter than the room offered emptied
/// the socket: its readiness is dropped then, so the next poll waits for more instead
/// of asking the kernel again to hear EAGAIN. (The readiness dropped is the one seen
/// before the read; data arriving since marks the socket ready anew.)
fn read(tcp: &TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(tcp.poll_read_ready(cx))?;
        buf.reserve(READ_SIZE);
        let room = buf.capacity() - buf.len();
        let mut got = None;
        let result = tcp.try_io(Interest::READABLE, || {
            let n = tcp.try_read_buf(buf)?;
            got = Some(n);
            match n > 0 && n < room {
                true => Err(io::ErrorKind::WouldBlock.into()),
                false => Ok(()),
            }
        });
        match (got, result) {
            (Some(n), _) => return Poll::Ready(Ok(n)),
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, Err(e)) => return Poll::Ready(Err(e)),
            (None, Ok(())) => unreachable!("a read that succeeded said how much"),
        }
    }
}

/// Writes as much of `out` as the socket takes; whether all of it went.
fn write(tcp: &mut TcpStream, out: &mut BytesMut, cx: &mut Context<'_>) -> io::Result<bool> {
    while !out.is_empty() {
        match Pin::new(&mut *tcp).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => out.advance(n),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(false),
        }
    }
    Ok(true)
}
