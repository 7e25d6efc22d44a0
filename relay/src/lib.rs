//! An HTTP/2 frame relay for gRPC, without IO: one client connection's calls forwarded,
//! frame by frame, to connections to replicas, with no HTTP/2 library and no task or
//! channel per call. The IO shell feeds it bytes and writes out what it queues.
//!
//! # What it does
//! - Each new stream picks a replica ([`Picker::pick`], the balancer's snapshot) and
//!   goes out on a connection to it, shared by the client connection's later calls.
//!   Stream ids are rewritten; DATA payloads are copied once, into the other side's
//!   output, as soon as both flow-control windows allow.
//! - Header blocks: both sides are told `SETTINGS_HEADER_TABLE_SIZE = 0`, so a block a
//!   peer sends refers to no dynamic-table entry once it has seen that, and passes
//!   through as it is ([`hpack::static_only`]); others are decoded and encoded again
//!   with static-table literals. Every block is still decoded, to keep each decoder's
//!   table in step and to read `:path` and `grpc-status`.
//! - Flow control end to end: what a side sends is credited back to it only when it has
//!   gone on to the other side, so the relay holds at most one window per stream.
//! - Unprocessed calls go to another replica, as gRPC's transparent retry allows: a
//!   connection that could not be made, a stream refused (REFUSED_STREAM) or above a
//!   GOAWAY's last stream id. The request is kept for that until the response begins,
//!   up to [`Limits::replay`] bytes; past [`Limits::max_transparent_retries`] a refusal
//!   is an UNAVAILABLE attempt for the call's retry or hedging policy.
//! - A connection lost mid-call ends the call with UNAVAILABLE. A replica's reset is
//!   the status gRPC reads in it (INTERNAL_ERROR as INTERNAL, CANCEL as CANCELLED...):
//!   retried or hedged past as the call's policy says, else passed on as it came.
//! - Limits: concurrent streams, header list size, header block size (CONTINUATION
//!   floods), rapid resets, frame size, flow-control violations.
//! - `grpc.health.v1.Health/Check` is answered here, from [`Picker::serving`].
//!
//! # Call order
//! [`Relay::new`]; then, as bytes arrive, [`Relay::client_read`] and
//! [`Relay::back_read`]. After each, write out [`Relay::client_out`] and every back's
//! [`Relay::back_out`]; reconcile sockets with [`Relay::backs`] (a new back needs a
//! connection; a slot gone empty closes one). Report [`Relay::back_connected`] and
//! [`Relay::back_lost`]. Stop when [`Relay::is_done`] and the output is written.

pub mod frame;
pub mod hpack;
mod huffman;
mod stream;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    hash::{BuildHasherDefault, Hasher},
    net::SocketAddr,
    time::Duration,
};

use bytes::{Buf, BytesMut};

use frame::{Head, Reason};
use hpack::{Seen, Transcoder};
pub use lb_core::call::Stats;
use lb_core::{
    Code,
    budget::Budget,
    retry::{
        HedgeSchedule, HedgingPolicy, Pushback, RetryPolicy, Throttle, Verdict,
        policy::{RetryState, StopReason},
    },
    rng::SplitMix64,
};
use smallvec::SmallVec;
pub use stream::Outcome;
use stream::{DETACHED, Hedging, Replay, Response, Stream, Wait};

/// What [`Picker::pick`] found for a call.
pub enum Pick<A> {
    /// This ready replica, and the attempt placed on it.
    Replica(SocketAddr, A),
    /// None to take yet: no local replica is ready, but one is connecting and has this
    /// long more before calls that may wait for it go to other nodes.
    LocalSoon(Duration),
    /// No replica is ready.
    NoneReady,
}

/// Where calls go: the balancer's picker, as the relay sees it.
pub trait Picker {
    /// Told how the call placed on the picked replica ended, once.
    type Attempt: Attempt;
    /// A ready replica for a new call on `path`, preferring those not in `avoid`
    /// (replicas this call already tried, `retries` of them after a failure the retry
    /// policy retried, the others unprocessed). A call that `may_wait` is told
    /// [`Pick::LocalSoon`] rather than sent to another node while a local replica is
    /// still connecting.
    fn pick(&mut self, path: &str, avoid: &[SocketAddr], retries: u32, may_wait: bool) -> Pick<Self::Attempt>;
    /// Whether the proxy serves: what `grpc.health.v1.Health/Check` answers.
    fn serving(&self) -> bool;
    /// Why no replica is ready, for the status of a call that found none, at once
    /// (`waited` zero) or after waiting for one.
    fn unavailable(&self, _waited: Duration) -> String {
        "no ready replica".to_owned()
    }
    /// How long a call to `path` that finds no ready replica waits for one when it has
    /// no deadline (with one, it waits up to its deadline); `None` fails it at once
    /// (`waitForReady: false`). The shell calls [`Relay::ready_changed`] when one may be.
    fn ready_wait(&self, _path: &str) -> Option<Duration> {
        None
    }
    /// The service config's retry policy for `path` (gRFC A6).
    fn retry_policy(&self, _path: &str) -> Option<RetryPolicy> {
        None
    }
    /// The service config's hedging policy for `path` (gRFC A6); a method with a retry
    /// policy is not asked.
    fn hedging_policy(&self, _path: &str) -> Option<HedgingPolicy> {
        None
    }
    /// The service config's retry throttle, shared by every call.
    fn throttle(&self) -> Option<&Throttle> {
        None
    }
    /// The service config's timeout for `path`.
    fn method_timeout(&self, _path: &str) -> Option<Duration> {
        None
    }
    /// A call to `path` is over, with `code` as the client hears it, `took` after it
    /// came: told once per relayed call (not the relay's own health answers), with its
    /// attempts, retries, hedges and transparent retries.
    fn call_ended(&self, _path: &str, _code: u8, _stats: &Stats, _took: Duration) {}
}

/// One attempt's outcome goes here.
pub trait Attempt {
    /// The call to `path` ended on this replica as `outcome`.
    fn ended(self, path: &str, outcome: Outcome);
}

/// Bounds on what one client connection may make the relay hold or do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Streams a client may have open; the next is refused (REFUSED_STREAM).
    pub max_streams: u32,
    /// Request headers larger than this (RFC 7541 sizes) are answered 431.
    pub max_header_list: usize,
    /// A header block longer than this, in frames, ends the connection.
    pub max_block: usize,
    /// Client resets beyond this many more than calls that completed end the connection
    /// (ENHANCE_YOUR_CALM): the rapid-reset attack.
    pub max_resets: usize,
    /// The receive window the relay opens per stream, on both sides.
    pub stream_window: u32,
    /// The receive window it opens per connection, on both sides.
    pub conn_window: u32,
    /// Request bytes kept per call to send it elsewhere if it was not processed.
    pub replay: usize,
    /// What every call keeps for replays together, shared with other connections (and
    /// the HTTP/2 stack's calls); a request past it is sent but not kept.
    pub replay_budget: Budget,
    /// Times one call refused unprocessed is sent elsewhere at once (gRPC's transparent
    /// retry); past that a refusal is an attempt failed with UNAVAILABLE, retried or
    /// hedged as the call's policy says.
    pub max_transparent_retries: usize,
    /// A request message declared longer than this fails the call (RESOURCE_EXHAUSTED).
    pub max_message: u32,
    /// A replica connection with calls open and nothing heard for this long is pinged;
    /// `None`: never.
    pub keepalive: Option<Duration>,
    /// A pinged replica that sends nothing for this long has its connection dropped,
    /// and its calls are lost.
    pub ping_timeout: Duration,
    /// The client is pinged after this long with nothing heard from it, connection idle
    /// or not; `None`: never.
    pub client_keepalive: Option<Duration>,
    /// A pinged client that sends nothing for this long is let go: its calls are
    /// cancelled and the shell closes its socket without flushing.
    pub client_ping_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams: 200,
            max_header_list: 16 << 10,
            max_block: 64 << 10,
            max_resets: 1024,
            stream_window: 1 << 20,
            conn_window: 4 << 20,
            replay: 64 << 10,
            replay_budget: Budget::new(usize::MAX),
            max_transparent_retries: 3,
            max_message: 4 << 20,
            keepalive: None,
            ping_timeout: Duration::from_millis(750),
            client_keepalive: None,
            client_ping_timeout: Duration::from_secs(20),
        }
    }
}

/// The bookkeeping of one HTTP/2 connection, either side.
struct Conn {
    /// Bytes to write to this peer.
    out: BytesMut,
    /// The peer's header blocks, read with its dynamic table and written without.
    decoder: Transcoder,
    /// A header block waiting for its CONTINUATION frames.
    partial: Option<Partial>,
    /// What the peer lets us send on the connection.
    send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE: each new stream's send window.
    initial_send: i64,
    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    max_frame: usize,
    /// What the peer may still send us on the connection.
    recv_window: i64,
    /// Bytes received and passed on, not yet credited back at connection level.
    uncredited: u32,
}

struct Partial {
    stream: u32,
    flags: u8,
    block: Vec<u8>,
}

impl Conn {
    /// Opens with our SETTINGS and a connection window of `limits.conn_window`.
    fn new(limits: &Limits, server: bool) -> Conn {
        let mut out = BytesMut::with_capacity(16 << 10);
        if !server {
            out.extend_from_slice(frame::PREFACE);
        }
        let mut settings = vec![
            (frame::SETTINGS_HEADER_TABLE_SIZE, 0),
            (frame::SETTINGS_ENABLE_PUSH, 0),
            (frame::SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window),
        ];
        if server {
            settings.push((frame::SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_streams));
            settings.push((frame::SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list as u32));
        }
        frame::put_settings(&mut out, &settings);
        let extra = i64::from(limits.conn_window) - frame::DEFAULT_WINDOW;
        if extra > 0 {
            frame::put_window_update(&mut out, 0, extra as u32);
        }
        // A peer may not grow our copy of its table past the default 4,096 bytes (we
        // advertise 0), so what it holds stays bounded.
        let decoder = match server {
            // The client's grpc-timeout is read, and the time left written per attempt.
            true => Transcoder::new(DEFAULT_TABLE).dropping_timeout(),
            false => Transcoder::new(DEFAULT_TABLE),
        };
        Conn {
            out,
            decoder,
            partial: None,
            send_window: frame::DEFAULT_WINDOW,
            initial_send: frame::DEFAULT_WINDOW,
            max_frame: frame::DEFAULT_MAX_FRAME,
            recv_window: i64::from(limits.conn_window.max(frame::DEFAULT_WINDOW as u32)),
            uncredited: 0,
        }
    }

    /// Counts `n` bytes received and passed on; credits them back in batches.
    fn credit(&mut self, n: u32, conn_window: u32) {
        self.uncredited += n;
        if self.uncredited >= conn_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.uncredited);
            self.recv_window += i64::from(self.uncredited);
            self.uncredited = 0;
        }
    }

    /// Applies a peer's SETTINGS; returns the change of the initial stream window.
    fn settings(&mut self, payload: &[u8]) -> Result<(i64, Option<u32>), Reason> {
        let mut delta = 0;
        let mut max_streams = None;
        for (id, value) in frame::settings(payload).ok_or(Reason::FrameSize)? {
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > frame::MAX_WINDOW {
                        return Err(Reason::FlowControl);
                    }
                    delta += i64::from(value) - self.initial_send;
                    self.initial_send = i64::from(value);
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME..1 << 24).contains(&(value as usize)) {
                        return Err(Reason::Protocol);
                    }
                    self.max_frame = value as usize;
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => max_streams = Some(value),
                _ => {}
            }
        }
        frame::put(&mut self.out, frame::SETTINGS, frame::ACK, 0, &[]);
        Ok((delta, max_streams))
    }

    /// Takes a HEADERS or CONTINUATION frame; the whole block once END_HEADERS came.
    fn header_fragment(&mut self, head: Head, payload: &[u8], max_block: usize) -> Result<Option<Partial>, Reason> {
        let mut partial = match (head.kind, self.partial.take()) {
            (frame::HEADERS, None) => {
                let (start, end) = frame::content(payload, head.flags, head.kind).ok_or(Reason::Protocol)?;
                Partial { stream: head.stream, flags: head.flags, block: payload[start..end].to_vec() }
            }
            (frame::CONTINUATION, Some(mut p)) if p.stream == head.stream => {
                if p.block.len() + payload.len() > max_block {
                    return Err(Reason::EnhanceYourCalm);
                }
                p.block.extend_from_slice(payload);
                p
            }
            _ => return Err(Reason::Protocol),
        };
        if head.flags & frame::END_HEADERS != 0 {
            partial.flags |= frame::END_HEADERS;
            return Ok(Some(partial));
        }
        self.partial = Some(partial);
        Ok(None)
    }

    /// Writes a header block as HEADERS and, beyond the peer's frame size, CONTINUATION.
    fn put_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) {
        let mut chunks = block.chunks(self.max_frame).peekable();
        let mut kind = frame::HEADERS;
        let mut flags = if end_stream { frame::END_STREAM } else { 0 };
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            frame::put(&mut self.out, kind, flags | if last { frame::END_HEADERS } else { 0 }, stream, chunk);
            if last {
                return;
            }
            kind = frame::CONTINUATION;
            flags = 0;
        }
    }
}

/// A connection to one replica, shared by the client connection's calls placed there.
struct Back {
    id: u64,
    addr: SocketAddr,
    conn: Conn,
    /// Our stream id on this connection -> the client's.
    streams: IdMap<u32>,
    next_id: u32,
    /// The replica's SETTINGS_MAX_CONCURRENT_STREAMS.
    max_streams: usize,
    /// It sent GOAWAY, or its stream ids ran out: it takes no new calls.
    closing: bool,
    connected: bool,
    /// When it last sent anything, or began carrying calls again.
    heard: Duration,
    /// When we pinged it, unanswered since.
    pinged: Option<Duration>,
}

impl Back {
    fn takes_calls(&self) -> bool {
        !self.closing && self.streams.len() < self.max_streams
    }
}

/// What the IO shell sees of a back: its address, whether the relay wants it
/// connected, and what to write to it.
pub struct BackView<'a> {
    pub id: u64,
    pub addr: SocketAddr,
    pub out: &'a mut BytesMut,
}

/// One client connection's relay.
pub struct Relay<P: Picker> {
    picker: P,
    limits: Limits,
    client: Conn,
    /// Connections to replicas; one leaves the list when its socket should close.
    backs: Vec<Back>,
    /// The next back's id: ids are not reused, so the shell can tell a new back at an
    /// address from the one it replaced.
    next_back: u64,
    /// Calls by the client's stream id.
    streams: IdMap<Stream<P::Attempt>>,
    /// The client's preface has been read.
    started: bool,
    /// The highest stream id the client opened.
    last_client_stream: u32,
    /// We sent GOAWAY: new streams are refused; `error` when it ended the connection.
    goaway: Option<Reason>,
    /// The client sent GOAWAY or closed its side: no new calls will come.
    client_done: bool,
    /// Client resets not yet offset by completed calls.
    resets: usize,
    /// Header blocks encoded again go here first.
    scratch: Vec<u8>,
    /// The time as the shell last told it ([`Relay::tick`]), from any fixed origin.
    now: Duration,
    /// When calls waiting out a retry backoff are due, soonest first; an entry whose
    /// call is gone or no longer waiting is skipped.
    backoffs: BinaryHeap<Reverse<(Duration, u32)>>,
    /// When calls' deadlines pass, soonest first (stale entries skipped, as above).
    deadlines: BinaryHeap<Reverse<(Duration, u32)>>,
    /// Calls waiting for a ready replica, first come first; stale ids skipped.
    waiting: Vec<u32>,
    /// When those calls stop waiting, soonest first (stale entries skipped, as above).
    waits: BinaryHeap<Reverse<(Duration, u32)>>,
    /// Jitter for retry backoffs.
    rng: SplitMix64,
    /// Streams watching the proxy's health (`Health/Watch`); stale ids are skipped, and
    /// dropped when a watch starts.
    watches: Vec<u32>,
    /// When calls' next hedges are due, soonest first (stale entries skipped).
    hedge_timers: BinaryHeap<Reverse<(Duration, u32)>>,
    /// The id the next hedge goes under in `streams`: even, unlike the client's.
    next_hedge: u32,
    /// Hedges in `streams`, which are not calls.
    hedge_count: usize,
    /// When the client last sent anything.
    client_heard: Duration,
    /// When we pinged the client, unanswered since.
    client_pinged: Option<Duration>,
    /// The client answered no ping in time: it is let go.
    client_silent: bool,
}

/// A replica's response headers or trailers larger than this (RFC 7541 sizes) end its
/// connection.
const MAX_RESPONSE_LIST: usize = 256 << 10;
/// The scratch buffer is let go when a large block grew it past this.
const SCRATCH_KEPT: usize = 64 << 10;
/// HPACK's default dynamic table size, what a peer may use before it saw our 0.
const DEFAULT_TABLE: usize = 4096;
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

impl<P: Picker> Relay<P> {
    /// A relay for one client connection; `seed` seeds its retry backoffs' jitter.
    pub fn new(picker: P, limits: Limits, seed: u64) -> Self {
        let client = Conn::new(&limits, true);
        Relay {
            picker,
            limits,
            client,
            backs: Vec::new(),
            next_back: 0,
            streams: IdMap::default(),
            started: false,
            last_client_stream: 0,
            goaway: None,
            client_done: false,
            resets: 0,
            scratch: Vec::with_capacity(1024),
            now: Duration::ZERO,
            backoffs: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            waiting: Vec::new(),
            waits: BinaryHeap::new(),
            rng: SplitMix64::seeded(seed),
            watches: Vec::new(),
            hedge_timers: BinaryHeap::new(),
            next_hedge: 2,
            hedge_count: 0,
            client_heard: Duration::ZERO,
            client_pinged: None,
            client_silent: false,
        }
    }

    /// The time is now `now` (from the same origin every time): calls whose retry
    /// backoff is over are sent again.
    pub fn tick(&mut self, now: Duration) {
        self.now = now;
        while let Some(&Reverse((due, id))) = self.deadlines.peek() {
            if due > now {
                break;
            }
            self.deadlines.pop();
            let Some(s) = self.streams.get(&id).filter(|s| s.deadline == Some(due)) else { continue };
            let why = format!("deadline exceeded after {} attempt(s)", s.previous + 1);
            self.end_with(id, Code::DeadlineExceeded as u8, &why, Outcome::Cancelled);
        }
        while let Some(&Reverse((due, id))) = self.waits.peek() {
            if due > now {
                break;
            }
            self.waits.pop();
            let Some(s) = self.streams.get_mut(&id) else { continue };
            let Some(wait) = s.waiting.filter(|w| w.wake == due) else { continue };
            if wait.wake < wait.until {
                // The local replica's time is up: the call may go to another node now. If
                // it waits on, its next wake is later than this one (a grace left is never
                // zero), so it gets a timer of its own.
                self.place(id);
                continue;
            }
            s.waiting = None;
            let why = self.picker.unavailable(wait.until - wait.since);
            self.end_with(id, Code::Unavailable as u8, &why, Outcome::Refused);
        }
        while let Some(&Reverse((due, id))) = self.backoffs.peek() {
            if due > now {
                break;
            }
            self.backoffs.pop();
            let Some(s) = self.streams.get_mut(&id).filter(|s| s.backoff_until == Some(due)) else { continue };
            s.backoff_until = None;
            self.place(id);
        }
        while let Some(&Reverse((due, id))) = self.hedge_timers.peek() {
            if due > now {
                break;
            }
            self.hedge_timers.pop();
            if self.streams.get(&id).is_some_and(|s| hedge_due(s) == Some(due)) {
                self.hedge(id);
            }
        }
        self.keep_alive(now);
        self.keep_client_alive(now);
    }

    /// Pings the client once nothing was heard from it for a while; lets it go, its
    /// calls cancelled, if it stays silent past the ping.
    fn keep_client_alive(&mut self, now: Duration) {
        let Some(interval) = self.limits.client_keepalive else { return };
        if self.is_done() {
            return;
        }
        match self.client_pinged {
            Some(at) if now >= at + self.limits.client_ping_timeout => {
                self.client_silent = true;
                self.client_closed();
            }
            Some(_) => {}
            None if now >= self.client_heard + interval => {
                frame::put(&mut self.client.out, frame::PING, 0, 0, &[0; 8]);
                self.client_pinged = Some(now);
            }
            None => {}
        }
    }

    /// Pings each replica connection that carries calls and went quiet; drops one that
    /// stayed silent past its ping, losing its calls as a lost connection does.
    fn keep_alive(&mut self, now: Duration) {
        let Some(interval) = self.limits.keepalive else { return };
        let timeout = self.limits.ping_timeout;
        let mut silent = Vec::new();
        for b in self.backs.iter_mut().filter(|b| b.connected && !b.streams.is_empty()) {
            match b.pinged {
                Some(at) if now >= at + timeout => silent.push(b.id),
                Some(_) => {}
                None if now >= b.heard + interval => {
                    frame::put(&mut b.conn.out, frame::PING, 0, 0, &[0; 8]);
                    b.pinged = Some(now);
                }
                None => {}
            }
        }
        for back in silent {
            let why = format!("went silent: no answer to a ping within {timeout:?}");
            self.drop_back(back, &why);
        }
    }

    /// A replica may have become ready, or the last one not: calls waiting for one are
    /// placed again, in the order they began to wait, and health watches hear of a
    /// change in the proxy's status.
    pub fn ready_changed(&mut self) {
        let waiting = |r: &Self, id| r.streams.get(&id).is_some_and(|s: &Stream<_>| s.waiting.is_some());
        for id in std::mem::take(&mut self.waiting) {
            if waiting(self, id) {
                self.place(id);
                if waiting(self, id) {
                    self.waiting.push(id); // still none: it waits on
                }
            }
        }
        let status = self.health_status();
        for i in 0..self.watches.len() {
            let id = self.watches[i];
            let changed =
                |s: &&mut Stream<_>| s.response == Response::Headers && s.watching.is_some_and(|w| w != status);
            let Some(s) = self.streams.get_mut(&id).filter(changed) else {
                continue;
            };
            s.watching = Some(status);
            // Only the latest status counts: one still waiting whole for the client's
            // window is replaced, not followed (the rest of one begun goes out first).
            let begun = s.down.pending.len() % HEALTH_MESSAGE_LEN;
            s.down.pending.truncate(begun);
            self.pump_down(id, &health_message(status));
        }
    }

    /// `grpc.health.v1.HealthCheckResponse.ServingStatus`: SERVING (1) while a replica
    /// is ready, NOT_SERVING (2) otherwise.
    fn health_status(&self) -> u8 {
        if self.picker.serving() { 1 } else { 2 }
    }

    /// Whether calls wait for a ready replica: the shell then watches for one.
    pub fn is_waiting(&self) -> bool {
        self.waiting.iter().any(|id| self.streams.get(id).is_some_and(|s| s.waiting.is_some()))
    }

    /// Whether calls wait for a ready replica or watch the proxy's health: the shell
    /// then tells it when the endpoints change ([`Relay::ready_changed`]).
    pub fn follows_readiness(&self) -> bool {
        self.is_waiting() || self.watches.iter().any(|id| self.streams.get(id).is_some_and(|s| s.watching.is_some()))
    }

    /// When [`Relay::tick`] has work next, if ever.
    pub fn next_timer(&self) -> Option<Duration> {
        let next = |heap: &BinaryHeap<Reverse<(Duration, u32)>>| heap.peek().map(|Reverse((due, _))| *due);
        let timers = [next(&self.backoffs), next(&self.deadlines), next(&self.waits), next(&self.hedge_timers)];
        let pings = self.limits.keepalive.into_iter().flat_map(|interval| {
            let timeout = self.limits.ping_timeout;
            let busy = self.backs.iter().filter(|b| b.connected && !b.streams.is_empty());
            busy.map(move |b| b.pinged.map_or(b.heard + interval, |at| at + timeout))
        });
        let client = match self.limits.client_keepalive {
            Some(interval) if !self.is_done() => {
                Some(self.client_pinged.map_or(self.client_heard + interval, |at| at + self.limits.client_ping_timeout))
            }
            _ => None,
        };
        timers.into_iter().flatten().chain(pings).chain(client).min()
    }

    /// Bytes to write to the client.
    pub fn client_out(&mut self) -> &mut BytesMut {
        &mut self.client.out
    }

    /// The ids of the backs, in the order [`Relay::backs`] gives them.
    pub fn back_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.backs.iter().map(|b| b.id)
    }

    /// Every back, for the shell to keep one socket per back id: a new id needs a
    /// connection, an id gone closes one.
    pub fn backs(&mut self) -> impl Iterator<Item = BackView<'_>> {
        self.backs.iter_mut().map(|b| BackView { id: b.id, addr: b.addr, out: &mut b.conn.out })
    }

    pub fn back_out(&mut self, back: u64) -> Option<&mut BytesMut> {
        Some(&mut self.back_mut(back)?.conn.out)
    }

    fn back_mut(&mut self, back: u64) -> Option<&mut Back> {
        self.backs.iter_mut().find(|b| b.id == back)
    }

    fn remove_back(&mut self, back: u64) -> Option<Back> {
        let i = self.backs.iter().position(|b| b.id == back)?;
        Some(self.backs.remove(i))
    }

    /// The client answered no ping: the shell closes its socket without flushing what
    /// is queued for it (a vanished peer never reads it).
    pub fn client_silent(&self) -> bool {
        self.client_silent
    }

    /// The shell leaves the client's bytes unread for now (a replica's backlog): its
    /// silence proves nothing, so its ping clock starts again.
    pub fn client_unread(&mut self) {
        self.client_heard = self.now;
        self.client_pinged = None;
    }

    /// Calls open now.
    pub fn open_calls(&self) -> usize {
        self.streams.len() - self.hedge_count
    }

    /// The connection is over: an error was sent, or no call is open and none can come.
    pub fn is_done(&self) -> bool {
        self.client_silent
            || matches!(self.goaway, Some(r) if r != Reason::NoError)
            || ((self.client_done || self.goaway.is_some()) && self.streams.is_empty())
    }

    /// Stops taking calls: GOAWAY to the client; open calls run on.
    pub fn drain(&mut self) {
        if self.goaway.is_none() {
            frame::put_goaway(&mut self.client.out, self.last_client_stream, Reason::NoError);
            self.goaway = Some(Reason::NoError);
        }
        // Health watches never end by themselves: they end here, so the client watches
        // again elsewhere.
        for id in std::mem::take(&mut self.watches) {
            if self.streams.get(&id).is_some_and(|s| s.watching.is_some()) {
                self.end_with(id, Code::Unavailable as u8, "the proxy is draining", Outcome::Cancelled);
            }
        }
    }

    /// The client closed its side: its open calls are cancelled.
    pub fn client_closed(&mut self) {
        self.client_done = true;
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Ends the connection with a connection error; open calls are cancelled.
    fn fail(&mut self, reason: Reason) {
        frame::put_goaway(&mut self.client.out, self.last_client_stream, reason);
        self.goaway = Some(reason);
        self.client_closed();
    }

    /// Handles every whole frame in `buf` from the client, leaving a partial one.
    pub fn client_read(&mut self, buf: &mut BytesMut) {
        self.client_heard = self.now;
        self.client_pinged = None;
        if !self.started {
            if buf.len() < frame::PREFACE.len() {
                if !frame::PREFACE.starts_with(buf) {
                    self.fail(Reason::Protocol);
                }
                return;
            }
            if !buf.starts_with(frame::PREFACE) {
                return self.fail(Reason::Protocol);
            }
            buf.advance(frame::PREFACE.len());
            self.started = true;
        }
        while let Some(head) = Head::parse(buf) {
            if self.goaway.is_some_and(|r| r != Reason::NoError) {
                buf.clear();
                return;
            }
            if head.len > frame::DEFAULT_MAX_FRAME {
                return self.fail(Reason::FrameSize);
            }
            if buf.len() < frame::HEADER_LEN + head.len {
                buf.reserve(frame::HEADER_LEN + head.len - buf.len());
                return;
            }
            let frame = buf.split_to(frame::HEADER_LEN + head.len);
            if let Err(reason) = self.client_frame(head, &frame[frame::HEADER_LEN..]) {
                return self.fail(reason);
            }
        }
    }

    fn client_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), Reason> {
        if self.client.partial.is_some() && head.kind != frame::CONTINUATION {
            return Err(Reason::Protocol);
        }
        match head.kind {
            frame::DATA => self.client_data(head, payload)?,
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(block) = self.client.header_fragment(head, payload, self.limits.max_block)? {
                    self.client_headers(block)?;
                }
            }
            // Even ids are the relay's own hedges, never the client's streams.
            frame::RST_STREAM if head.stream % 2 == 1 && self.streams.contains_key(&head.stream) => {
                self.cancel(head.stream);
                self.resets += 1;
                if self.resets > self.limits.max_resets {
                    return Err(Reason::EnhanceYourCalm);
                }
            }
            frame::SETTINGS if head.flags & frame::ACK == 0 => {
                let (delta, _) = self.client.settings(payload)?;
                if delta != 0 {
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.down.window += delta;
                        }
                        self.pump_down(id, &[]);
                    }
                }
            }
            frame::PING if head.flags & frame::ACK == 0 => {
                frame::put(&mut self.client.out, frame::PING, frame::ACK, 0, payload);
            }
            frame::GOAWAY => self.client_done = true,
            frame::WINDOW_UPDATE => {
                let increment = i64::from(frame::u31(payload, 0).ok_or(Reason::FrameSize)?);
                if head.stream == 0 {
                    self.client.send_window += increment;
                    if self.client.send_window > frame::MAX_WINDOW {
                        return Err(Reason::FlowControl);
                    }
                    let ids: Vec<u32> =
                        self.streams.iter().filter(|(_, s)| s.down.has_pending()).map(|(&id, _)| id).collect();
                    for id in ids {
                        self.pump_down(id, &[]);
                    }
                } else if let Some(s) = self.streams.get_mut(&head.stream).filter(|s| s.hedge_of.is_none()) {
                    s.down.window += increment;
                    self.pump_down(head.stream, &[]);
                }
            }
            frame::PUSH_PROMISE => return Err(Reason::Protocol),
            _ => {} // PRIORITY, acks, unknown frame types
        }
        Ok(())
    }

    fn client_data(&mut self, head: Head, payload: &[u8]) -> Result<(), Reason> {
        self.client.recv_window -= head.len as i64;
        if self.client.recv_window < 0 {
            return Err(Reason::FlowControl);
        }
        let (start, end) = frame::content(payload, head.flags, head.kind).ok_or(Reason::Protocol)?;
        let Some(s) = self.streams.get_mut(&head.stream).filter(|s| !s.client_ended) else {
            // A stream already over: its bytes are credited back and dropped.
            self.client.credit(head.len as u32, self.limits.conn_window);
            return Ok(());
        };
        s.up.recv_window -= head.len as i64;
        if s.up.recv_window < 0 {
            frame::put_rst(&mut self.client.out, head.stream, Reason::FlowControl);
            self.client.credit(head.len as u32, self.limits.conn_window);
            self.cancel_heard_as(head.stream, Code::from_h2_reason(Reason::FlowControl as u32));
            return Ok(());
        }
        // Padding is credited at once; the content when it has gone on.
        let padding = (head.len - (end - start)) as u32;
        self.client.credit(padding, self.limits.conn_window);
        if padding > 0 && head.flags & frame::END_STREAM == 0 {
            s.up.credit(&mut self.client.out, head.stream, padding, self.limits.stream_window);
        }
        let body = &payload[start..end];
        if let Err(too_large) = s.scan.feed(body) {
            self.client.credit((end - start) as u32, self.limits.conn_window);
            self.end_with(head.stream, 8, &too_large.to_string(), Outcome::Cancelled);
            return Ok(());
        }
        let end_stream = head.flags & frame::END_STREAM != 0;
        s.client_ended = end_stream;
        if let Some(replay) = &mut s.replay {
            if replay.outgrown {
            } else if s.local {
                // The relay's own answers keep their few bytes outside the budget; a
                // request larger than any real one is refused.
                match replay.data.len() + body.len() <= LOCAL_REQUEST_MAX {
                    true => replay.data.extend_from_slice(body),
                    false => s.replay = None,
                }
            } else if replay.data.len() + body.len() <= self.limits.replay && replay.held.take(body.len()) {
                replay.data.extend_from_slice(body);
            } else {
                s.committed_by_buffer = true;
                if replay.tried.is_empty() {
                    // Never sent: all of it waits uncredited in `up.pending`, bounded by the
                    // windows, and goes out from there once.
                    replay.outgrown = true;
                    replay.data = BytesMut::new();
                    replay.held.give_all();
                } else {
                    s.replay = None;
                }
            }
        }
        if s.local {
            self.client.credit((end - start) as u32, self.limits.conn_window);
            if end_stream {
                self.answer_locally(head.stream);
            }
            return Ok(());
        }
        s.up.end |= end_stream;
        self.pump_up(head.stream, body);
        if end_stream {
            self.hedge(head.stream); // one due waited for the whole request
        }
        Ok(())
    }

    fn client_headers(&mut self, block: Partial) -> Result<(), Reason> {
        let id = block.stream;
        let end_stream = block.flags & frame::END_STREAM != 0;
        self.fresh_scratch();
        let mut seen = Seen::default();
        let budget = self.limits.max_header_list;
        self.client
            .decoder
            .transcode(&block.block, &mut self.scratch, &mut seen, budget)
            .map_err(|_| Reason::Compression)?;
        let Seen { path, list_size: size, timeout, .. } = seen;
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers from the client: the request's end.
            if !end_stream || s.client_ended {
                return Err(Reason::Protocol);
            }
            if size > self.limits.max_header_list {
                self.cancel_heard_as(id, Code::from_h2_reason(Reason::EnhanceYourCalm as u32));
                frame::put_rst(&mut self.client.out, id, Reason::EnhanceYourCalm);
                return Ok(());
            }
            s.client_ended = true;
            s.up.end = true;
            s.replay = None;
            s.up.trailers = Some(self.scratch.clone());
            self.pump_up(id, &[]);
            return Ok(());
        }
        if id.is_multiple_of(2) {
            return Err(Reason::Protocol);
        }
        if id <= self.last_client_stream {
            // A stream already over: its headers are dropped.
            return Ok(());
        }
        self.last_client_stream = id;
        if self.goaway.is_some() || self.open_calls() >= self.limits.max_streams as usize {
            frame::put_rst(&mut self.client.out, id, Reason::RefusedStream);
            return Ok(());
        }
        if size > self.limits.max_header_list {
            let mut b = Vec::new();
            hpack::encode(b":status", b"431", &mut b);
            self.client.put_block(id, true, &b);
            if !end_stream {
                frame::put_rst(&mut self.client.out, id, Reason::NoError);
            }
            return Ok(());
        }
        let Some(path) = path else {
            self.trailers_only(id, 13, "no :path", 0);
            return Ok(());
        };
        let block = self.scratch.clone();
        let limits = &self.limits;
        let retry = self.picker.retry_policy(&path).map(|p| (p, RetryState::default()));
        let timeout = match (timeout, self.picker.method_timeout(&path)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let hedging = match retry {
            None => self.picker.hedging_policy(&path),
            Some(_) => None,
        };
        let mut stream = Stream::new(
            path,
            Replay::new(block, &limits.replay_budget),
            limits.stream_window,
            end_stream,
            limits.max_message,
        );
        if let Some(policy) = hedging {
            let schedule = HedgeSchedule::new(&policy, self.now);
            stream.hedging = Some(Box::new(Hedging { policy, schedule, hedges: SmallVec::new() }));
        }
        stream.retry = retry;
        stream.arrived = self.now;
        if let Some(t) = timeout {
            let due = self.now.saturating_add(t);
            stream.deadline = Some(due);
            push_timer(&mut self.deadlines, due, id, &self.streams, |s| s.deadline);
        }
        stream.down.window = self.client.initial_send;
        if stream.path.starts_with(HEALTH_PREFIX) {
            stream.local = true;
            self.streams.insert(id, stream);
            if end_stream {
                self.answer_locally(id);
            }
            return Ok(());
        }
        self.streams.insert(id, stream);
        self.place(id);
        Ok(())
    }

    /// Sends a call (again) to a replica it has not tried, or fails it.
    fn place(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let Some(replay) = &mut s.replay else {
            // Outgrew its buffer while waiting to be sent again.
            let why = "the request outgrew the replay buffer before it could be sent again";
            return self.end_with(id, 14, why, Outcome::Refused);
        };
        let (path, tried, previous) = (&s.path, &replay.tried, s.previous);
        let pick = match self.picker.pick(path, tried, previous, true) {
            // A call that may not wait for a replica does not wait for a local one, nor
            // does any once the local one's time is up.
            Pick::LocalSoon(grace) if grace.is_zero() || self.picker.ready_wait(path).is_none() => {
                self.picker.pick(path, tried, previous, false)
            }
            pick => pick,
        };
        match pick {
            Pick::Replica(addr, attempt) => {
                self.send_attempt(id, addr, attempt);
                self.hedge(id); // one came due while it waited for a replica
            }
            Pick::LocalSoon(grace) => self.wait_for_ready(id, Some(grace)),
            Pick::NoneReady => self.wait_for_ready(id, None),
        }
    }

    /// Sends the call's request, as its replay holds it, to `addr`.
    fn send_attempt(&mut self, id: u32, addr: SocketAddr, attempt: P::Attempt) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let Some(replay) = &mut s.replay else { return };
        let first = replay.tried.is_empty();
        replay.tried.push(addr);
        s.waiting = None;
        let back = match self.backs.iter().find(|b| b.addr == addr && b.takes_calls()) {
            Some(b) => b.id,
            None => self.new_back(addr),
        };
        let b = self.backs.iter_mut().find(|b| b.id == back).expect("just found or made");
        let up = b.next_id;
        b.next_id += 2;
        if b.next_id > (1 << 31) - 2 {
            b.closing = true;
        }
        if b.streams.is_empty() {
            b.heard = self.now; // quiet while idle is no sign of trouble
        }
        b.streams.insert(up, id);
        let s = self.streams.get_mut(&id).expect("found above");
        let replay = s.replay.as_ref().expect("found above");
        match (s.next_is_retry, s.hedging.is_some()) {
            (false, _) => s.placed = true, // or sent again unprocessed: no new attempt
            (true, false) => s.retried += 1,
            (true, true) => s.hedged += 1,
        }
        s.next_is_retry = false;
        s.back = back;
        s.up_id = up;
        s.attempt = Some(attempt);
        s.up.window = b.conn.initial_send;
        if !first {
            // What is pending was received but never credited; the rest of the replay was.
            let uncredited = s.up.pending.len().saturating_sub(s.up.resend);
            s.up.pending.clear();
            s.up.pending.extend_from_slice(&replay.data);
            s.up.resend = replay.data.len().saturating_sub(uncredited);
        }
        // On the first attempt all that came is pending, uncredited.
        s.up.end = s.client_ended;
        let end_now = s.client_ended && s.up.pending.is_empty() && s.up.trailers.is_none();
        if s.previous > 0 || s.deadline.is_some() {
            self.scratch.clear();
            self.scratch.extend_from_slice(&replay.block);
            if s.previous > 0 {
                put_count(b"grpc-previous-rpc-attempts", s.previous, &mut self.scratch);
            }
            if let Some(deadline) = s.deadline {
                // The time left, as the h2 path sends it per attempt.
                let mut buf = [0u8; 9];
                let left = lb_core::duration::format_grpc_timeout(deadline.saturating_sub(self.now), &mut buf);
                hpack::encode(b"grpc-timeout", left, &mut self.scratch);
            }
            b.conn.put_block(up, end_now, &self.scratch);
        } else {
            b.conn.put_block(up, end_now, &replay.block);
        }
        s.up.sent_end = end_now;
        if replay.outgrown {
            s.replay = None; // sent once from what was pending: it cannot be again
        }
        self.pump_up(id, &[]);
        if first && self.streams.get(&id).is_some_and(|s| s.hedge_of.is_none()) {
            self.start_hedging(id);
        }
    }

    /// The call's first attempt went out: its hedges count from now.
    fn start_hedging(&mut self, id: u32) {
        let now = self.now;
        let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hedging.as_deref_mut()) else { return };
        h.schedule = HedgeSchedule::new(&h.policy, now);
        if let Some(due) = h.schedule.next_due() {
            push_timer(&mut self.hedge_timers, due, id, &self.streams, hedge_due);
        }
    }

    /// Starts the call's next hedge if one is due and its request is whole and kept, on
    /// a replica it has not tried if there is one; schedules the one after.
    fn hedge(&mut self, id: u32) {
        let now = self.now;
        if self.streams.get(&id).is_none_or(|s| hedge_due(s).is_none_or(|due| due > now)) {
            return;
        }
        let throttled = self.picker.throttle().is_some_and(|t| !t.allows());
        let Some(s) = self.streams.get_mut(&id) else { return };
        let Some(h) = s.hedging.as_deref_mut() else { return };
        if s.response != Response::None || s.waiting.is_some() || !h.schedule.is_due(now) {
            return;
        }
        let whole = s.client_ended && s.up.trailers.is_none();
        if s.replay.as_ref().is_none_or(|r| r.outgrown) {
            return h.schedule.stop(); // outgrew its buffer: committed to the attempts it has
        }
        if throttled {
            h.schedule.stop();
            s.throttled = true;
            return;
        }
        if !whole {
            return; // the client's END_STREAM starts it
        }
        let attempt_no = h.schedule.started();
        let sent = self.launch_hedge(id, attempt_no);
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.hedged += u32::from(sent);
        let Some(h) = s.hedging.as_deref_mut() else { return };
        if sent {
            h.schedule.on_started(now);
        } else {
            // None ready: the next try a delay on (never now again, even with no delay).
            h.schedule.push_back(now.saturating_add(h.policy.delay.max(NO_REPLICA_RETRY)));
        }
        if let Some(due) = h.schedule.next_due() {
            push_timer(&mut self.hedge_timers, due, id, &self.streams, hedge_due);
        }
    }

    /// Sends the call's whole request, as its replay holds it, to a replica it has not
    /// tried: a hedge, attempt number `attempt_no`. Says whether a replica was ready.
    fn launch_hedge(&mut self, id: u32, attempt_no: u32) -> bool {
        let Some(s) = self.streams.get_mut(&id) else { return false };
        let Some(replay) = s.replay.as_mut() else { return false };
        // A hedge is sent to beat a slow attempt: it does not wait for a local replica.
        let Pick::Replica(addr, attempt) = self.picker.pick(&s.path, &replay.tried, attempt_no, false) else {
            return false;
        };
        replay.tried.push(addr);
        let mut hedge = Stream::new(
            s.path.clone(),
            Replay::new(replay.block.clone(), &self.limits.replay_budget),
            self.limits.stream_window,
            true,
            self.limits.max_message,
        );
        // All of the request, credited to the client when it first came.
        hedge.up.pending.extend_from_slice(&replay.data);
        hedge.up.resend = replay.data.len();
        hedge.previous = attempt_no;
        hedge.deadline = s.deadline;
        hedge.hedge_of = Some(id);
        let hid = loop {
            let hid = self.next_hedge;
            self.next_hedge = if hid >= (1 << 31) - 2 { 2 } else { hid + 2 };
            if !self.streams.contains_key(&hid) {
                break hid;
            }
        };
        if let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hedging.as_deref_mut()) {
            h.hedges.push(hid);
        }
        self.streams.insert(hid, hedge);
        self.hedge_count += 1;
        self.send_attempt(hid, addr, attempt);
        if let Some(hedge) = self.streams.get_mut(&hid) {
            hedge.replay = None; // the call keeps the request; a hedge is not placed again
        }
        true
    }

    /// Whether the call's hedging policy lets its other attempts go on after `code`.
    fn is_non_fatal(&self, id: u32, code: u8) -> bool {
        let code = Code::from_i32(i32::from(code)).unwrap_or(Code::Unknown);
        self.streams.get(&id).and_then(|s| s.hedging.as_ref()).is_some_and(|h| !h.policy.is_fatal(code))
    }

    /// One of the call's attempts failed with a non-fatal status: the throttle hears
    /// of it, and the next hedge is due at once (or after the pushback, or never).
    fn hedge_failed(&mut self, id: u32, pushback: Pushback) {
        let now = self.now;
        let throttle = self.picker.throttle();
        let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hedging.as_deref_mut()) else { return };
        if let Some(t) = throttle {
            t.on_failure();
        }
        h.schedule.on_nonfatal_failure(now);
        match pushback {
            Pushback::None => {}
            Pushback::After(pause) => h.schedule.push_back(now.saturating_add(pause)),
            Pushback::Stop => h.schedule.stop(),
        }
        if let Some(due) = h.schedule.next_due().filter(|&due| due > now) {
            push_timer(&mut self.hedge_timers, due, id, &self.streams, hedge_due);
        }
        self.hedge(id);
    }

    /// The call's own attempt failed with `code` before any response: with a hedging
    /// policy that calls it non-fatal, a running hedge takes the call over, or the next
    /// starts at once and does. Says whether one did.
    fn hedge_after(&mut self, id: u32, code: u8, pushback: Pushback) -> bool {
        if !self.is_non_fatal(id, code) {
            return false;
        }
        let running = |r: &Self| r.running_hedge(id);
        if let Some(hedge) = running(self) {
            self.promote(id, hedge, Outcome::Retried(code));
            self.hedge_failed(id, pushback);
            return true;
        }
        self.hedge_failed(id, pushback);
        if let Some(hedge) = running(self) {
            self.promote(id, hedge, Outcome::Retried(code));
            return true;
        }
        // None running and the next not due yet (a pushback): the call waits for it
        // with no attempt, as a retry waits out its backoff, and is placed again then.
        let Some(due) = self.streams.get(&id).and_then(hedge_due) else { return false };
        let Some(mut s) = self.streams.remove(&id) else { return false };
        // The request stays pending for the next attempt, credited to the client once
        // it goes on, as a retry's does.
        self.detach(&mut s, Reason::Cancel);
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, Outcome::Retried(code));
        }
        let h = s.hedging.as_deref_mut().expect("it has a due hedge");
        s.previous = h.schedule.started();
        s.next_is_retry = true;
        h.schedule.on_started(due);
        s.backoff_until = Some(due);
        self.streams.insert(id, s);
        push_timer(&mut self.backoffs, due, id, &self.streams, |s| s.backoff_until);
        true
    }

    /// The call's oldest hedge still on a live connection.
    fn running_hedge(&self, id: u32) -> Option<u32> {
        let h = self.streams.get(&id)?.hedging.as_ref()?;
        let live = |hid: &&u32| self.streams.get(hid).is_some_and(|x| self.backs.iter().any(|b| b.id == x.back));
        h.hedges.iter().find(live).copied()
    }

    /// A hedge's stream was reset or its connection lost: it is let go, and the next
    /// is due at once if UNAVAILABLE is non-fatal. One the replica refused unprocessed
    /// goes to another instead, as the same attempt (gRPC's transparent retry), while
    /// the call has transparent retries left and a replica is ready.
    fn hedge_lost(&mut self, hid: u32, outcome: Outcome) {
        let Some((call, attempt_no)) = self.streams.get(&hid).and_then(|s| Some((s.hedge_of?, s.previous))) else {
            return;
        };
        self.drop_hedge(hid, outcome);
        if outcome == Outcome::Refused && self.transparent_retry(call, attempt_no) {
            return;
        }
        if self.is_non_fatal(call, Code::Unavailable as u8) {
            return self.hedge_failed(call, Pushback::None);
        }
        // UNAVAILABLE is fatal: the call ends with it, as a status in trailers would
        // end it.
        let why = match outcome {
            Outcome::Refused => "a hedge was refused unprocessed, and UNAVAILABLE is fatal",
            _ => "the connection carrying a hedge was lost, and UNAVAILABLE is fatal",
        };
        self.end_with(call, Code::Unavailable as u8, why, Outcome::Cancelled);
    }

    /// Sends a refused hedge, attempt `attempt_no`, to another replica (gRPC's
    /// transparent retry) if the call has transparent retries left and a replica is
    /// ready; only one sent uses a retry up.
    fn transparent_retry(&mut self, id: u32, attempt_no: u32) -> bool {
        let max = self.limits.max_transparent_retries as u32;
        if self.streams.get(&id).is_none_or(|s| s.transparent >= max) || !self.launch_hedge(id, attempt_no) {
            return false;
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.transparent += 1;
        }
        true
    }

    /// The call goes on with its hedge `hid` in place of its own attempt, which ends as
    /// `outcome` (its stream reset if still open).
    fn promote(&mut self, id: u32, hid: u32, outcome: Outcome) {
        let Some(hedge) = self.take_hedge(hid) else { return };
        let Some(mut s) = self.streams.remove(&id) else { return };
        self.detach(&mut s, Reason::Cancel);
        self.release(&s);
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, outcome);
        }
        s.waiting = None;
        s.backoff_until = None;
        s.back = hedge.back;
        s.up_id = hedge.up_id;
        s.attempt = hedge.attempt;
        s.up = hedge.up;
        s.previous = hedge.previous;
        if let Some(b) = self.back_mut(s.back) {
            b.streams.insert(s.up_id, id);
        }
        self.streams.insert(id, s);
    }

    /// Takes hedge `hid` out of the map and off its call's list.
    fn take_hedge(&mut self, hid: u32) -> Option<Stream<P::Attempt>> {
        let call = self.streams.get(&hid)?.hedge_of?;
        let hedge = self.streams.remove(&hid)?;
        self.hedge_count -= 1;
        if let Some(h) = self.streams.get_mut(&call).and_then(|s| s.hedging.as_deref_mut()) {
            h.hedges.retain(|x| *x != hid);
        }
        Some(hedge)
    }

    /// Lets hedge `hid` go: its stream reset if still open, its attempt ended as `outcome`.
    fn drop_hedge(&mut self, hid: u32, outcome: Outcome) {
        let Some(mut hedge) = self.take_hedge(hid) else { return };
        self.detach(&mut hedge, Reason::Cancel);
        self.release(&hedge);
        if let Some(a) = hedge.attempt.take() {
            a.ended(&hedge.path, outcome);
        }
    }

    /// The call committed or ended: every hedge still racing it is cancelled.
    fn drop_hedges(&mut self, id: u32) {
        let Some(h) = self.streams.get(&id).and_then(|s| s.hedging.as_ref()) else { return };
        for hid in h.hedges.clone() {
            self.drop_hedge(hid, Outcome::Cancelled);
        }
        if let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hedging.as_deref_mut()) {
            h.schedule.stop();
        }
    }

    /// No replica is ready for the call, or none to take before a connecting local one's
    /// `grace` is up: it waits for one up to its deadline, or its method's wait without
    /// one, or fails at once when its method says not to wait.
    fn wait_for_ready(&mut self, id: u32, grace: Option<Duration>) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let was = s.waiting;
        let (since, until) = match was {
            // Still none: it goes on waiting from when it began (and is on the list).
            Some(w) => (w.since, w.until),
            None => {
                let Some(wait) = self.picker.ready_wait(&s.path) else {
                    let why = self.picker.unavailable(Duration::ZERO);
                    return self.end_with(id, Code::Unavailable as u8, &why, Outcome::Refused);
                };
                // With a deadline, that timer ends the wait; this one never comes first.
                (self.now, s.deadline.unwrap_or(self.now.saturating_add(wait)))
            }
        };
        let wake = grace.map_or(until, |g| until.min(self.now.saturating_add(g)));
        s.waiting = Some(Wait { since, until, wake });
        if was.is_none() {
            if self.waiting.len() >= 2 * self.streams.len() + 64 {
                let streams = &self.streams;
                self.waiting.retain(|i| streams.get(i).is_some_and(|s| s.waiting.is_some()));
            }
            self.waiting.push(id);
        }
        if was.is_none_or(|w| w.wake != wake) {
            push_timer(&mut self.waits, wake, id, &self.streams, |s| s.waiting.map(|w| w.wake));
        }
    }

    /// The replica did not process the call: it goes to another, with its request, as
    /// gRPC's transparent retry allows. Refused more often than that, it is an attempt
    /// failed with UNAVAILABLE, retried or hedged as the call's policy says.
    fn unprocessed(&mut self, id: u32) {
        if let Some(hedge) = self.running_hedge(id) {
            // A hedge already carries it: that one goes on instead.
            return self.promote(id, hedge, Outcome::Refused);
        }
        let max = self.limits.max_transparent_retries;
        let Some(s) = self.streams.get_mut(&id) else { return };
        debug_assert_eq!(s.response, Response::None, "only a call with no response can go elsewhere");
        s.back = DETACHED;
        // A refusal says nothing against the replica (it may be draining or full).
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, Outcome::Refused);
        }
        if s.replay.is_none() {
            return self.place(id); // which says it outgrew its buffer
        }
        if s.transparent < max as u32 {
            s.transparent += 1;
            return self.place(id);
        }
        let unavailable = Code::Unavailable as u8;
        if self.retry_after(id, unavailable, Pushback::None) || self.hedge_after(id, unavailable, Pushback::None) {
            return;
        }
        let why = "the call was refused unprocessed by every replica tried";
        self.end_with(id, unavailable, why, Outcome::Refused);
    }

    /// An attempt failed with `code` before any response headers: if the call's retry
    /// policy, its buffer and the throttle allow, it waits out a backoff and is sent
    /// again (and the client hears nothing of this attempt). Says whether it will be.
    fn retry_after(&mut self, id: u32, code: u8, pushback: Pushback) -> bool {
        let Some(s) = self.streams.get_mut(&id) else { return false };
        let Some((policy, state)) = &mut s.retry else { return false };
        let code = Code::from_i32(i32::from(code)).unwrap_or(Code::Unknown);
        let throttle = self.picker.throttle();
        if let Some(t) = throttle.filter(|_| policy.retryable.contains(code) || pushback == Pushback::Stop) {
            t.on_failure();
        }
        if s.replay.is_none() {
            return false; // the request outgrew its buffer: committed
        }
        let allows = throttle.is_none_or(Throttle::allows);
        let after = match state.next(policy, code, pushback, allows, &mut self.rng) {
            Verdict::Retry { after } => after,
            Verdict::Stop(why) => {
                s.throttled |= why == StopReason::Throttled;
                return false;
            }
        };
        let Some(mut s) = self.streams.remove(&id) else { return false };
        self.detach(&mut s, Reason::Cancel);
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, Outcome::Retried(code as u8));
        }
        s.previous += 1;
        s.next_is_retry = true;
        let due = self.now + after;
        s.backoff_until = Some(due);
        push_timer(&mut self.backoffs, due, id, &self.streams, |s| s.backoff_until);
        self.streams.insert(id, s);
        true
    }

    fn new_back(&mut self, addr: SocketAddr) -> u64 {
        let id = self.next_back;
        self.next_back += 1;
        self.backs.push(Back {
            id,
            addr,
            conn: Conn::new(&self.limits, false),
            streams: IdMap::default(),
            next_id: 1,
            max_streams: usize::MAX,
            closing: false,
            connected: false,
            heard: self.now,
            pinged: None,
        });
        id
    }

    /// An empty scratch buffer, not one a large block left large.
    fn fresh_scratch(&mut self) {
        if self.scratch.capacity() > SCRATCH_KEPT {
            self.scratch = Vec::with_capacity(1024);
        }
        self.scratch.clear();
    }

    /// A call leaves with bytes still pending: they were never credited to their
    /// sender's connection, so they are now (a stream's own window goes with it).
    fn release(&mut self, s: &Stream<P::Attempt>) {
        let up = s.up.pending.len().saturating_sub(s.up.resend) as u32;
        self.client.credit(up, self.limits.conn_window);
        if let Some(b) = self.backs.iter_mut().find(|b| b.id == s.back) {
            b.conn.credit(s.down.pending.len() as u32, self.limits.conn_window);
        }
    }

    /// Forwards what the stream's request has pending, as far as windows allow.
    fn pump_up(&mut self, id: u32, fresh: &[u8]) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let Some(b) = self.backs.iter_mut().find(|b| b.id == s.back) else {
            s.up.pending.extend_from_slice(fresh);
            return;
        };
        let moved = s.up.pump(&mut b.conn, s.up_id, fresh);
        if moved > 0 && !s.client_ended {
            s.up.credit(&mut self.client.out, id, moved, self.limits.stream_window);
        }
        self.client.credit(moved, self.limits.conn_window);
    }

    /// Forwards what the stream's response has pending, as far as windows allow, and
    /// ends the call when all of it went.
    fn pump_down(&mut self, id: u32, fresh: &[u8]) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let moved = s.down.pump(&mut self.client, id, fresh);
        if let Some(b) = self.backs.iter_mut().find(|b| b.id == s.back) {
            if moved > 0 && s.response != Response::Ended {
                s.down.credit(&mut b.conn.out, s.up_id, moved, self.limits.stream_window);
            }
            b.conn.credit(moved, self.limits.conn_window);
        }
        if s.down.sent_end {
            self.finish(id);
        }
    }

    /// The call `s` is over with `code`: the picker hears it once. Hedges are counted
    /// in their call; the relay's own health answers are not calls to a replica.
    fn call_over(&self, s: &Stream<P::Attempt>, code: u8) {
        if s.local || s.hedge_of.is_some() {
            return;
        }
        let stats = Stats {
            attempts: attempts(s),
            retries: s.retried,
            hedges: s.hedged,
            transparent_retries: s.transparent,
            throttled: s.throttled,
            committed_by_buffer: s.committed_by_buffer,
        };
        self.picker.call_ended(&s.path, code, &stats, self.now.saturating_sub(s.arrived));
    }

    /// The response went out whole: the call is over.
    fn finish(&mut self, id: u32) {
        self.drop_hedges(id);
        let Some(mut s) = self.streams.remove(&id) else { return };
        // No grpc-status in the replica's trailers: INTERNAL, as the h2 path counts it.
        self.call_over(&s, s.status.unwrap_or(Code::Internal as u8));
        if !s.client_ended {
            frame::put_rst(&mut self.client.out, id, Reason::NoError);
        }
        if !s.local {
            // A completed call offsets a reset; the relay's own answers, free to ask
            // for, do not.
            self.resets = self.resets.saturating_sub(1);
        }
        self.release(&s);
        self.detach(&mut s, Reason::NoError);
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, s.outcome());
        }
    }

    /// The client reset the call, or went away: the replica's stream is reset too.
    fn cancel(&mut self, id: u32) {
        self.cancel_heard_as(id, Code::Cancelled);
    }

    /// Cancels the call as [`Relay::cancel`] does, the client hearing `code` (the reset
    /// the relay sends it reads as that).
    fn cancel_heard_as(&mut self, id: u32, code: Code) {
        if self.streams.get(&id).is_some_and(|s| s.hedge_of.is_some()) {
            return self.drop_hedge(id, Outcome::Cancelled);
        }
        self.drop_hedges(id);
        let Some(mut s) = self.streams.remove(&id) else { return };
        self.call_over(&s, code as u8);
        self.release(&s);
        self.detach(&mut s, Reason::Cancel);
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, Outcome::Cancelled);
        }
    }

    /// Takes a stream off its back, resetting it there if it is still open; closes a
    /// closing back left with no streams.
    fn detach(&mut self, s: &mut Stream<P::Attempt>, reason: Reason) {
        let Some(b) = self.back_mut(s.back) else { return };
        b.streams.remove(&s.up_id);
        if !s.up.sent_end || s.response != Response::Ended {
            frame::put_rst(&mut b.conn.out, s.up_id, reason);
        }
        if b.closing && b.streams.is_empty() {
            self.remove_back(s.back);
        }
        s.back = DETACHED;
    }

    /// Ends a call with a status from the relay: trailers-only if no response began,
    /// else trailers after what is pending.
    fn end_with(&mut self, id: u32, code: u8, message: &str, outcome: Outcome) {
        self.drop_hedges(id);
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.status = Some(code);
        s.replay = None;
        if s.response == Response::None {
            // The attempts that went out before this answer (a retry due but never sent
            // is none).
            let previous = attempts(s).saturating_sub(1);
            self.trailers_only(id, code, message, previous);
            if let Some(mut s) = self.streams.remove(&id) {
                self.call_over(&s, code);
                if !s.client_ended {
                    frame::put_rst(&mut self.client.out, id, Reason::NoError);
                }
                self.release(&s);
                self.detach(&mut s, Reason::Cancel);
                if let Some(a) = s.attempt.take() {
                    a.ended(&s.path, outcome);
                }
            }
            return;
        }
        // The replica's stream is reset: its own trailers, if they came, would find no
        // call to end.
        let Some(mut s) = self.streams.remove(&id) else { return };
        self.detach(&mut s, Reason::Cancel);
        let mut block = Vec::new();
        status_headers(code, message, &mut block);
        s.down.trailers = Some(block);
        s.down.end = true;
        s.response = Response::Ended;
        if let Some(a) = s.attempt.take() {
            a.ended(&s.path, outcome);
        }
        self.streams.insert(id, s);
        self.pump_down(id, &[]);
    }

    /// A response of headers only, with `grpc-status: code`.
    fn trailers_only(&mut self, id: u32, code: u8, message: &str, previous_attempts: u32) {
        let mut block = Vec::new();
        hpack::encode(b":status", b"200", &mut block);
        hpack::encode(b"content-type", b"application/grpc", &mut block);
        status_headers(code, message, &mut block);
        if previous_attempts > 0 {
            put_count(b"grpc-previous-rpc-attempts", previous_attempts, &mut block);
        }
        self.client.put_block(id, true, &block);
    }

    /// Answers `grpc.health.v1.Health` for the whole proxy (service "") from
    /// [`Picker::serving`]: `Check` once, `Watch` now and at each change, until the
    /// client resets it or the proxy drains. Other services are NOT_FOUND, other methods
    /// UNIMPLEMENTED.
    fn answer_locally(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else { return };
        let watch = s.path == HEALTH_WATCH;
        let refused = match &s.replay {
            None => Some((8, "health check request too large")),
            Some(_) if !watch && s.path != HEALTH_CHECK => {
                Some((12, "only Health/Check and Health/Watch are answered"))
            }
            // A HealthCheckRequest with no service: an empty message, or field 1 empty.
            Some(r) if !matches!(&r.data[..], [0, 0, 0, 0, 0] | [0, 0, 0, 0, 2, 0x0a, 0]) => {
                Some((5, "unknown service"))
            }
            Some(_) => None,
        };
        if let Some((code, why)) = refused {
            self.streams.remove(&id);
            return self.trailers_only(id, code, why, 0);
        }
        let status = self.health_status();
        let mut block = Vec::new();
        hpack::encode(b":status", b"200", &mut block);
        hpack::encode(b"content-type", b"application/grpc", &mut block);
        self.client.put_block(id, false, &block);
        let s = self.streams.get_mut(&id).expect("found above");
        s.response = Response::Headers;
        s.replay = None;
        if watch {
            s.watching = Some(status);
            let streams = &self.streams;
            self.watches.retain(|id| streams.get(id).is_some_and(|s| s.watching.is_some()));
            self.watches.push(id);
        } else {
            block.clear();
            status_headers(0, "", &mut block);
            s.down.trailers = Some(block);
            s.down.end = true;
            s.response = Response::Ended;
        }
        // Through the stream's windows, as a replica's response would go.
        self.pump_down(id, &health_message(status));
        if watch && self.goaway.is_some() {
            // Asked while the proxy drains: the status, then the end, as drain() gave
            // the watches before it.
            self.end_with(id, Code::Unavailable as u8, "the proxy is draining", Outcome::Cancelled);
        }
    }

    /// The shell connected a back's socket.
    pub fn back_connected(&mut self, back: u64) {
        let now = self.now;
        if let Some(b) = self.back_mut(back) {
            b.connected = true;
            b.heard = now;
        }
    }

    /// A back's connection could not be made, or was lost: calls it never received go
    /// elsewhere; those it may have end with UNAVAILABLE.
    pub fn back_lost(&mut self, back: u64) {
        self.drop_back(back, "was lost");
    }

    /// Lets a back go; its calls end as [`Relay::back_lost`] says, `why` naming how.
    fn drop_back(&mut self, back: u64, why: &str) {
        let Some(b) = self.remove_back(back) else { return };
        let mut ids: Vec<u32> = b.streams.values().copied().collect();
        // Hedges (even ids) first: a call is not handed to a hedge lost with it.
        ids.sort_unstable_by_key(|&id| (id % 2, id));
        for id in ids {
            let Some(s) = self.streams.get_mut(&id) else { continue };
            s.back = DETACHED;
            if s.hedge_of.is_some() {
                self.hedge_lost(id, if b.connected { Outcome::Lost } else { Outcome::Refused });
                continue;
            }
            if s.response == Response::Ended {
                continue; // its trailers came: what is pending drains to the client
            }
            if !b.connected && s.response == Response::None && s.replay.is_some() {
                self.unprocessed(id);
            } else if s.response == Response::None
                && (self.retry_after(id, Code::Unavailable as u8, Pushback::None)
                    || self.hedge_after(id, Code::Unavailable as u8, Pushback::None))
            {
                // Lost before a response: UNAVAILABLE, sent again as the policy says.
            } else {
                self.end_with(id, 14, &format!("the connection to replica {} {why}", b.addr), Outcome::Lost);
            }
        }
    }

    /// Handles every whole frame in `buf` from a back, leaving a partial one.
    pub fn back_read(&mut self, back: u64, buf: &mut BytesMut) {
        let now = self.now;
        if let Some(b) = self.back_mut(back) {
            b.heard = now;
            b.pinged = None;
        }
        while let Some(head) = Head::parse(buf) {
            if self.back_mut(back).is_none() {
                buf.clear();
                return;
            }
            if head.len > frame::DEFAULT_MAX_FRAME {
                return self.back_error(back, Reason::FrameSize);
            }
            if buf.len() < frame::HEADER_LEN + head.len {
                buf.reserve(frame::HEADER_LEN + head.len - buf.len());
                return;
            }
            let frame = buf.split_to(frame::HEADER_LEN + head.len);
            if let Err(reason) = self.back_frame(back, head, &frame[frame::HEADER_LEN..]) {
                return self.back_error(back, reason);
            }
        }
        if self.back_mut(back).is_some_and(|b| b.closing && b.streams.is_empty()) {
            self.remove_back(back);
        }
    }

    /// The replica reset the stream of call or hedge `id` with HTTP/2 error `reason`.
    /// REFUSED_STREAM before a response means it never processed the call, which goes
    /// elsewhere; any other reset is the status gRPC reads in it (PROTOCOL-HTTP2), which
    /// the call's policy retries or hedges past as it would that status in trailers. A
    /// reset nothing takes past reaches the client as it came.
    fn back_reset(&mut self, back: u64, id: u32, reason: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.back = DETACHED;
        // What the replica sent is its connection's to send again, though the client
        // has yet to take it.
        let (pending, window) = (s.down.pending.len() as u32, self.limits.conn_window);
        let ended = s.response == Response::Ended;
        if let Some(b) = self.back_mut(back) {
            b.conn.credit(pending, window);
        }
        if ended {
            // After its trailers (grpc-go resets a stream the client still sends on):
            // the response drains to the client as it came.
            return;
        }
        let Some(s) = self.streams.get(&id) else { return };
        let refused = reason == Reason::RefusedStream as u32 && s.response == Response::None;
        let code = Code::from_h2_reason(reason) as u8;
        let hedge_of = s.hedge_of;
        let id = match hedge_of {
            Some(_) if refused => return self.hedge_lost(id, Outcome::Refused),
            Some(call) if self.is_non_fatal(call, code) => {
                self.drop_hedge(id, Outcome::Retried(code));
                return self.hedge_failed(call, Pushback::None);
            }
            Some(call) => {
                // A fatal status: the call is this hedge's, and ends with it.
                self.promote(call, id, Outcome::Cancelled);
                call
            }
            None => id,
        };
        let Some(s) = self.streams.get(&id) else { return };
        if s.response == Response::None {
            if refused && s.replay.is_some() {
                return self.unprocessed(id);
            }
            if self.retry_after(id, code, Pushback::None) || self.hedge_after(id, code, Pushback::None) {
                return;
            }
        }
        self.drop_hedges(id);
        let Some(mut s) = self.streams.remove(&id) else { return };
        self.call_over(&s, code);
        frame::put(&mut self.client.out, frame::RST_STREAM, 0, id, &reason.to_be_bytes());
        self.release(&s);
        if let Some(a) = s.attempt.take() {
            // As the HTTP/2 stack counts it: UNAVAILABLE as a lost connection.
            let lost = code == Code::Unavailable as u8;
            a.ended(&s.path, if lost { Outcome::Lost } else { Outcome::Status(code) });
        }
    }

    /// A back broke the protocol: GOAWAY to it, and its calls are lost.
    fn back_error(&mut self, back: u64, reason: Reason) {
        if let Some(b) = self.back_mut(back) {
            frame::put_goaway(&mut b.conn.out, 0, reason);
        }
        self.back_lost(back);
    }

    fn back_frame(&mut self, back: u64, head: Head, payload: &[u8]) -> Result<(), Reason> {
        let b = self.backs.iter_mut().find(|b| b.id == back).expect("checked by the caller");
        if b.conn.partial.is_some() && head.kind != frame::CONTINUATION {
            return Err(Reason::Protocol);
        }
        let client_id = b.streams.get(&head.stream).copied();
        match head.kind {
            frame::DATA => {
                b.conn.recv_window -= head.len as i64;
                if b.conn.recv_window < 0 {
                    return Err(Reason::FlowControl);
                }
                let (start, end) = frame::content(payload, head.flags, head.kind).ok_or(Reason::Protocol)?;
                let Some(s) =
                    client_id.and_then(|id| self.streams.get_mut(&id)).filter(|s| s.response == Response::Headers)
                else {
                    b.conn.credit(head.len as u32, self.limits.conn_window);
                    return Ok(());
                };
                let padding = (head.len - (end - start)) as u32;
                b.conn.credit(padding, self.limits.conn_window);
                if padding > 0 && head.flags & frame::END_STREAM == 0 {
                    s.down.credit(&mut b.conn.out, head.stream, padding, self.limits.stream_window);
                }
                if head.flags & frame::END_STREAM != 0 {
                    s.down.end = true;
                    s.response = Response::Ended;
                }
                self.pump_down(client_id.expect("found"), &payload[start..end]);
            }
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(block) = b.conn.header_fragment(head, payload, self.limits.max_block)? {
                    self.back_headers(back, client_id, block)?;
                }
            }
            frame::RST_STREAM => {
                let reason = frame::u32_at(payload, 0).ok_or(Reason::FrameSize)?;
                if let Some(id) = client_id {
                    b.streams.remove(&head.stream);
                    self.back_reset(back, id, reason);
                }
            }
            frame::SETTINGS if head.flags & frame::ACK == 0 => {
                let (delta, max_streams) = b.conn.settings(payload)?;
                if let Some(n) = max_streams {
                    b.max_streams = n as usize;
                }
                let ids: Vec<u32> = b.streams.values().copied().collect();
                for id in ids {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up.window += delta;
                    }
                    self.pump_up(id, &[]);
                }
            }
            frame::PING if head.flags & frame::ACK == 0 => {
                frame::put(&mut b.conn.out, frame::PING, frame::ACK, 0, payload);
            }
            frame::GOAWAY => {
                let last = frame::u31(payload, 0).ok_or(Reason::FrameSize)?;
                b.closing = true;
                let mut unprocessed: Vec<(u32, u32)> =
                    b.streams.iter().filter(|&(&up, _)| up > last).map(|(&up, &id)| (up, id)).collect();
                // Hedges (even ids) first, as when a connection is lost: a call is not
                // handed to a hedge refused with it.
                unprocessed.sort_unstable_by_key(|&(up, id)| (id % 2, up));
                for (up, _) in &unprocessed {
                    b.streams.remove(up);
                }
                if b.streams.is_empty() {
                    self.remove_back(back);
                }
                for (_, id) in unprocessed {
                    let Some(s) = self.streams.get_mut(&id) else { continue };
                    s.back = DETACHED;
                    if s.hedge_of.is_some() {
                        self.hedge_lost(id, Outcome::Refused);
                    } else if s.replay.is_some() {
                        self.unprocessed(id);
                    } else {
                        if let Some(a) = s.attempt.take() {
                            a.ended(&s.path, Outcome::Refused);
                        }
                        self.drop_hedges(id);
                        if let Some(s) = self.streams.remove(&id) {
                            self.call_over(&s, Code::Unavailable as u8);
                            self.release(&s);
                        }
                        frame::put_rst(&mut self.client.out, id, Reason::RefusedStream);
                    }
                }
            }
            frame::WINDOW_UPDATE => {
                let increment = i64::from(frame::u31(payload, 0).ok_or(Reason::FrameSize)?);
                if head.stream == 0 {
                    b.conn.send_window += increment;
                    let ids: Vec<u32> = b.streams.values().copied().collect();
                    for id in ids {
                        self.pump_up(id, &[]);
                    }
                } else if let Some(id) = client_id {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up.window += increment;
                    }
                    self.pump_up(id, &[]);
                }
            }
            frame::PUSH_PROMISE => return Err(Reason::Protocol),
            _ => {}
        }
        Ok(())
    }

    fn back_headers(&mut self, back: u64, client_id: Option<u32>, block: Partial) -> Result<(), Reason> {
        self.fresh_scratch();
        let b = self.backs.iter_mut().find(|b| b.id == back).expect("checked by the caller");
        let end_stream = block.flags & frame::END_STREAM != 0;
        let mut seen = Seen::default();
        b.conn
            .decoder
            .transcode(&block.block, &mut self.scratch, &mut seen, MAX_RESPONSE_LIST)
            .map_err(|_| Reason::Compression)?;
        if seen.list_size > MAX_RESPONSE_LIST {
            return Err(Reason::EnhanceYourCalm);
        }
        let Seen { status, pushback, .. } = seen;
        let Some(id) = client_id else { return Ok(()) };
        let Some(s) = self.streams.get(&id) else { return Ok(()) };
        let failed = end_stream && status != Some(0);
        let code = status.unwrap_or(Code::Unknown as u8);
        let pushback = match pushback {
            None => Pushback::None,
            Some(Some(ms)) => Pushback::After(Duration::from_millis(ms)),
            Some(None) => Pushback::Stop,
        };
        let id = match s.hedge_of {
            Some(call) => {
                if failed && self.is_non_fatal(call, code) {
                    self.drop_hedge(id, Outcome::Retried(code));
                    self.hedge_failed(call, pushback);
                    return Ok(());
                }
                // Response headers, OK or a fatal status: the call is this hedge's.
                self.promote(call, id, Outcome::Cancelled);
                call
            }
            None => id,
        };
        let Some(s) = self.streams.get(&id) else { return Ok(()) };
        if s.response == Response::None {
            if failed {
                if self.retry_after(id, code, pushback) || self.hedge_after(id, code, pushback) {
                    return Ok(());
                }
            } else if let Some(t) = self.picker.throttle() {
                t.on_success(); // response headers, or OK: the call is done with retries
            }
            self.drop_hedges(id); // committed
        }
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        if s.response == Response::None && s.previous > 0 {
            put_count(b"grpc-previous-rpc-attempts", s.previous, &mut self.scratch);
        }
        let block = &self.scratch;
        match s.response {
            Response::None => {
                s.replay = None;
                s.response = if end_stream { Response::Ended } else { Response::Headers };
                s.status = status;
                self.client.put_block(id, end_stream, block);
                if end_stream {
                    s.down.sent_end = true;
                    self.finish(id);
                }
            }
            Response::Headers if end_stream => {
                s.response = Response::Ended;
                s.status = status;
                s.down.end = true;
                if s.down.pending.is_empty() {
                    // Nothing waits before them: straight out.
                    self.client.put_block(id, true, block);
                    s.down.sent_end = true;
                    self.finish(id);
                } else {
                    s.down.trailers = Some(block.clone());
                    self.pump_down(id, &[]);
                }
            }
            _ => return Err(Reason::Protocol),
        }
        Ok(())
    }
}

/// Schedules `id` at `due`. An entry stays after its call ends (a heap cannot drop
/// one cheaply), so once stale entries could outnumber the calls, those whose call is
/// gone or no longer waiting for that time (`when`) are let go: a client making
/// calls with long timeouts that end at once holds no more than twice its open calls.
fn push_timer<A>(
    heap: &mut BinaryHeap<Reverse<(Duration, u32)>>,
    due: Duration,
    id: u32,
    streams: &IdMap<Stream<A>>,
    when: impl Fn(&Stream<A>) -> Option<Duration>,
) {
    if heap.len() >= 2 * streams.len() + 64 {
        heap.retain(|Reverse((t, i))| streams.get(i).is_some_and(|s| when(s) == Some(*t)));
    }
    heap.push(Reverse((due, id)));
}

/// A hedge that found no ready replica tries again after its delay, or this if longer.
const NO_REPLICA_RETRY: Duration = Duration::from_millis(10);

/// Maps by stream id, hashed by a multiply where SipHash cost a hundred-odd
/// instructions a lookup, several per call. A client could pick rising ids that share
/// a bucket, but it holds at most `max_streams` open (and each call a few hedges), so
/// a lookup then compares a few hundred keys at worst, with nothing to flood.
type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing: the product's high half mixes every bit of the id; rotated
        // into the low bits, where the table picks a bucket.
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(32);
    }
}

/// The attempts of its own a call placed on replicas (not counting transparent resends).
fn attempts<A>(s: &Stream<A>) -> u32 {
    u32::from(s.placed) + s.retried + s.hedged
}

/// When a call's next hedge is due, if one is.
fn hedge_due<A>(s: &Stream<A>) -> Option<Duration> {
    s.hedging.as_ref().and_then(|h| h.schedule.next_due())
}

/// `name: n` as a literal.
fn put_count(name: &[u8], n: u32, out: &mut Vec<u8>) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    hpack::encode(name, &digits[at..], out);
}

/// `grpc-status` and, when there is one, `grpc-message`, as literals.
const HEALTH_MESSAGE_LEN: usize = 7;
/// A health request is at most a few bytes (the service name); more is refused.
const LOCAL_REQUEST_MAX: usize = 64;

/// A `HealthCheckResponse` with `status`, as a gRPC message.
fn health_message(status: u8) -> [u8; HEALTH_MESSAGE_LEN] {
    [0, 0, 0, 0, 2, 0x08, status]
}

fn status_headers(code: u8, message: &str, out: &mut Vec<u8>) {
    let mut digits = [0u8; 3];
    let n = {
        use std::io::Write;
        let mut w = &mut digits[..];
        let _ = write!(w, "{code}");
        3 - w.len()
    };
    hpack::encode(b"grpc-status", &digits[..n], out);
    if !message.is_empty() {
        hpack::encode(b"grpc-message", message.as_bytes(), out);
    }
}

#[cfg(test)]
mod tests;
