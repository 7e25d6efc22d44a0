//! The response body handed back to callers: the endpoint's body, except that losing
//! the endpoint mid-response ends it with a status in trailers instead of a reset:
//! UNAVAILABLE for a lost connection, a reset's code mapped as gRPC's PROTOCOL-HTTP2
//! says, naming the endpoint. The status in the trailers (or the loss) is the
//! attempt's outcome for outlier detection; a caller that drops the body early records
//! nothing there (its own cancellation is not the endpoint's failure). The call's
//! metrics are recorded at the same moment: its status and duration, or CANCELLED.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use lb_core::call::Stats;
use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use lb_core::Code;
use tonic::Status;

use crate::{code::to_tonic, counters::Counters, pool::Outcome, replay::BoxError, transport};

/// A committed call, recorded when its status arrives.
pub(crate) struct CallEnd {
    pub counters: Counters,
    /// For the method's row, claimed if the call succeeds.
    pub uri: http::Uri,
    pub stats: Stats,
    pub started: Instant,
}

pub struct UpstreamBody {
    inner: transport::Body,
    addr: SocketAddr,
    /// The trailers were synthesized; the body is over.
    done: bool,
    /// Where the status goes when it arrives; `None` once recorded (or never wanted).
    outcome: Option<Outcome>,
    /// The call's metrics, recorded with the status; `None` once recorded.
    call: Option<CallEnd>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("addr", &self.addr).field("done", &self.done).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: transport::Body, addr: SocketAddr, outcome: Option<Outcome>) -> Self {
        UpstreamBody { inner, addr, done: false, outcome, call: None }
    }

    pub(crate) fn record_call_at_end(&mut self, call: CallEnd) {
        self.call = Some(call);
    }

    /// The response ended with `code`, or its connection was `lost`: the attempt's
    /// outcome and the call's metrics.
    fn ended(&mut self, code: Code, lost: bool) {
        let row = self.call.as_ref().map(|c| c.counters.method(c.uri.path(), code == Code::Ok));
        let method = row.map(|r| r.0);
        match self.outcome.take() {
            Some(o) if lost => o.lost(method),
            Some(o) => o.status(code, method),
            None => {}
        }
        if let (Some(c), Some(row)) = (self.call.take(), row) {
            c.counters.record_row(row, &c.stats, code, c.started.elapsed());
        }
    }
}

/// Dropped before its end: the caller cancelled.
impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(c) = self.call.take() {
            let row = c.counters.method(c.uri.path(), false);
            if let Some(o) = self.outcome.take() {
                o.cancelled(Some(row.0));
            }
            c.counters.record_row(row, &c.stats, Code::Cancelled, c.started.elapsed());
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.inner.poll_frame(cx)) {
            Some(Err((code, error))) => {
                self.done = true;
                // UNAVAILABLE: the connection went; else a reset, mapped.
                self.ended(code, code == Code::Unavailable);
                let status =
                    Status::new(to_tonic(code), format!("upstream {} failed mid-response: {error}", self.addr));
                let mut trailers = HeaderMap::new();
                status.add_header(&mut trailers).map_err(|e| Box::new(e) as BoxError)?;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers.get("grpc-status").map_or(Code::Internal, |c| Code::from_header(c.as_bytes()));
                    self.ended(code, false);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                // Over without trailers: no status, which gRPC calls INTERNAL.
                self.ended(Code::Internal, false);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}
