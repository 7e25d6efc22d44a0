//! One relayed call: where it went, each direction's flow control and pending bytes,
//! and the request kept for sending it elsewhere. Pure.

use std::{net::SocketAddr, time::Duration};

use bytes::BytesMut;
use lb_core::{
    budget::{Budget, Held},
    frame::FrameScan,
    retry::{HedgeSchedule, HedgingPolicy, RetryPolicy, policy::RetryState},
};
use smallvec::SmallVec;

use crate::{Conn, frame};

/// How an attempt ended, for outlier detection and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The replica's response ended with this `grpc-status` (INTERNAL when it had none),
    /// or it reset the stream with an error gRPC reads as this status.
    Status(u8),
    /// The replica's connection was lost, or it refused a call whose request could not
    /// be sent again (UNAVAILABLE).
    Lost,
    /// The client cancelled the call.
    Cancelled,
    /// The replica did not process it (refused, or above its GOAWAY); it went elsewhere.
    Refused,
    /// It failed with this status (or, 14, its connection was lost before a response),
    /// and the call's retry policy sends it again.
    Retried(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Response {
    /// Nothing from the replica yet: the call can still go elsewhere.
    None,
    /// Response headers sent on; the body flows.
    Headers,
    /// The replica's END_STREAM arrived.
    Ended,
}

/// The request as first received, kept until the response begins.
pub(crate) struct Replay {
    /// The request's header block, valid on any connection (no dynamic-table reference).
    pub block: Vec<u8>,
    /// Request DATA received so far.
    pub data: BytesMut,
    /// What `data` holds of the shared replay budget, given back when dropped.
    pub held: Held,
    /// Replicas tried, in order.
    pub tried: SmallVec<[SocketAddr; 2]>,
    /// The request outgrew the buffer before the call was first sent (it waited for a
    /// replica): it goes out once, from what is pending, and never again.
    pub outgrown: bool,
}

impl Replay {
    pub fn new(block: Vec<u8>, budget: &Budget) -> Replay {
        let held = Held::new(budget);
        Replay { block, data: BytesMut::new(), held, tried: SmallVec::new(), outgrown: false }
    }
}

/// A call waiting for a ready replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Since then.
    pub since: Duration,
    /// It fails then: its deadline, or its method's wait for a replica.
    pub until: Duration,
    /// It asks the picker again then: `until`, or sooner when a local replica that is
    /// still connecting has only until then before calls go to other nodes.
    pub wake: Duration,
}

/// One direction of a call: bytes waiting for the receiver's windows, and the credit
/// owed to the sender.
pub(crate) struct Dir {
    /// What the receiver lets us send on this stream.
    pub window: i64,
    /// What the sender may still send us on this stream.
    pub recv_window: i64,
    /// Received, not yet sent on.
    pub pending: BytesMut,
    /// Of `pending`, bytes sent again on a new attempt: credited to the sender already.
    pub resend: usize,
    /// The sender ended the stream: END_STREAM follows `pending` (and `trailers`).
    pub end: bool,
    /// A trailing header block to send after `pending`.
    pub trailers: Option<Vec<u8>>,
    /// END_STREAM has been sent on.
    pub sent_end: bool,
    /// Bytes sent on, not yet credited back to the sender.
    pub uncredited: u32,
}

impl Dir {
    fn new(window: u32) -> Dir {
        Dir {
            window: frame::DEFAULT_WINDOW,
            recv_window: i64::from(window),
            pending: BytesMut::new(),
            resend: 0,
            end: false,
            trailers: None,
            sent_end: false,
            uncredited: 0,
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || (self.end && !self.sent_end)
    }

    /// Sends what `pending` holds, then `fresh`, as DATA on `to`'s stream `id`, as far
    /// as the stream's and the connection's windows allow, then the end; keeps the rest
    /// pending. Fresh bytes are copied once, straight into `to`'s output, when nothing
    /// waits before them. Returns the bytes sent that the sender is owed credit for.
    pub fn pump(&mut self, to: &mut Conn, id: u32, fresh: &[u8]) -> u32 {
        let mut moved = 0;
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(fresh);
            let pending = std::mem::take(&mut self.pending);
            let sent = self.send(to, id, &pending);
            self.pending = pending;
            let _ = self.pending.split_to(sent);
            moved += sent;
        } else if !fresh.is_empty() {
            let sent = self.send(to, id, fresh);
            self.pending.extend_from_slice(&fresh[sent..]);
            moved += sent;
        }
        if self.pending.is_empty() && self.end && !self.sent_end {
            match self.trailers.take() {
                Some(block) => to.put_block(id, true, &block),
                None => frame::put(&mut to.out, frame::DATA, frame::END_STREAM, id, &[]),
            }
            self.sent_end = true;
        }
        let resent = moved.min(self.resend);
        self.resend -= resent;
        (moved - resent) as u32
    }

    /// Writes as much of `data` as the windows allow, as DATA frames; the last one
    /// carries END_STREAM when it ends the stream. Returns the bytes written.
    fn send(&mut self, to: &mut Conn, id: u32, data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() {
            let n = ((data.len() - sent) as i64).min(self.window).min(to.send_window).min(to.max_frame as i64);
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let last = sent + n == data.len() && self.end && self.trailers.is_none();
            frame::put(&mut to.out, frame::DATA, if last { frame::END_STREAM } else { 0 }, id, &data[sent..sent + n]);
            self.window -= n as i64;
            to.send_window -= n as i64;
            sent += n;
            self.sent_end |= last;
        }
        sent
    }

    /// Owes the sender `n` more bytes of stream credit; sends a WINDOW_UPDATE on its
    /// stream `id` once half a window is owed.
    pub fn credit(&mut self, out: &mut BytesMut, id: u32, n: u32, window: u32) {
        self.uncredited += n;
        if self.uncredited >= window / 2 {
            frame::put_window_update(out, id, self.uncredited);
            self.recv_window += i64::from(self.uncredited);
            self.uncredited = 0;
        }
    }
}

/// A call across the relay.
pub(crate) struct Stream<A> {
    /// The method, `/service/method`.
    pub path: String,
    /// The back it is placed on ([`DETACHED`] while none).
    pub back: u64,
    /// Its stream id there.
    pub up_id: u32,
    /// Answered by the relay itself (health checks).
    pub local: bool,
    pub attempt: Option<A>,
    /// Client to replica.
    pub up: Dir,
    /// Replica to client.
    pub down: Dir,
    pub response: Response,
    pub status: Option<u8>,
    /// The client sent END_STREAM.
    pub client_ended: bool,
    /// The request, while it can still be sent elsewhere.
    pub replay: Option<Replay>,
    /// Finds each request message's length, to refuse one over the limit.
    pub scan: FrameScan,
    /// The method's retry policy and the call's progress through it.
    pub retry: Option<(RetryPolicy, RetryState)>,
    /// Waiting out a retry's backoff until then, on no replica.
    pub backoff_until: Option<Duration>,
    /// Waiting for a ready replica.
    pub waiting: Option<Wait>,
    /// A health watch answered by the relay: the status it was last told.
    pub watching: Option<u8>,
    /// The method's hedgingPolicy, when it has one, and the call's hedges.
    pub hedging: Option<Box<Hedging>>,
    /// This is a hedge of the call on that client stream, under an id of its own
    /// (even: the client's are odd). Its response, once it has one, is the call's.
    pub hedge_of: Option<u32>,
    /// Attempts before this one that failed and were retried (`grpc-previous-rpc-attempts`).
    pub previous: u32,
    /// When the call fails with DEADLINE_EXCEEDED: the caller's `grpc-timeout` or the
    /// method's timeout, whichever is sooner, from its arrival.
    pub deadline: Option<Duration>,
    /// When its HEADERS came, on the relay's clock.
    pub arrived: Duration,
    /// Whether an attempt of its own was ever sent to a replica.
    pub placed: bool,
    /// Attempts placed after one failed, by its retry policy or hedging policy; the
    /// next placement is one when `next_is_retry`.
    pub retried: u32,
    pub hedged: u32,
    pub next_is_retry: bool,
    /// Times it (or a hedge of it) was sent elsewhere unprocessed.
    pub transparent: u32,
    /// A retry or hedge of it was held back by the throttle.
    pub throttled: bool,
    /// Its request outgrew the replay buffer: no attempt could start again.
    pub committed_by_buffer: bool,
}

/// A call's hedging (gRFC A6): when its next attempt is due, and the attempts racing
/// its own, by their ids in the relay's map.
pub(crate) struct Hedging {
    pub policy: HedgingPolicy,
    pub schedule: HedgeSchedule,
    pub hedges: SmallVec<[u32; 2]>,
}

/// A stream on no back.
pub(crate) const DETACHED: u64 = u64::MAX;

impl<A> Stream<A> {
    pub fn new(path: String, replay: Replay, window: u32, client_ended: bool, max_message: u32) -> Self {
        Stream {
            path,
            back: DETACHED,
            up_id: 0,
            local: false,
            attempt: None,
            up: Dir::new(window),
            down: Dir::new(window),
            response: Response::None,
            status: None,
            client_ended,
            replay: Some(replay),
            scan: FrameScan::new(max_message),
            retry: None,
            backoff_until: None,
            waiting: None,
            watching: None,
            hedging: None,
            hedge_of: None,
            previous: 0,
            deadline: None,
            arrived: Duration::ZERO,
            placed: false,
            retried: 0,
            hedged: 0,
            next_is_retry: false,
            transparent: 0,
            throttled: false,
            committed_by_buffer: false,
        }
    }

    pub fn outcome(&self) -> Outcome {
        Outcome::Status(self.status.unwrap_or(13))
    }
}
