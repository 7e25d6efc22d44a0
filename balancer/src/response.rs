//! The response body handed back to callers: the endpoint's body, except that losing
//! the endpoint mid-response ends it with a status in trailers instead of a reset:
//! UNAVAILABLE for a lost connection, a reset's code mapped as gRPC's PROTOCOL-HTTP2
//! says, naming the endpoint. The status in the trailers (or the loss) is the
//! attempt's outcome for outlier detection; a caller that drops the body early records
//! nothing (its own cancellation is not the endpoint's failure).

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use lb_core::Code;
use tonic::Status;

use crate::{code::to_tonic, pool::Outcome, replay::BoxError, transport};

pub struct UpstreamBody {
    inner: transport::Body,
    addr: SocketAddr,
    /// The trailers were synthesized; the body is over.
    done: bool,
    /// Where the status goes when it arrives; `None` once recorded (or never wanted).
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("addr", &self.addr).field("done", &self.done).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: transport::Body, addr: SocketAddr, outcome: Option<Outcome>) -> Self {
        UpstreamBody { inner, addr, done: false, outcome }
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
                match self.outcome.take() {
                    Some(o) if code == Code::Unavailable => o.lost(), // the connection went
                    Some(o) => o.status(code),                        // a reset, mapped
                    None => {}
                }
                let status =
                    Status::new(to_tonic(code), format!("upstream {} failed mid-response: {error}", self.addr));
                let mut trailers = HeaderMap::new();
                status.add_header(&mut trailers).map_err(|e| Box::new(e) as BoxError)?;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers.get("grpc-status").map_or(Code::Internal, |c| Code::from_header(c.as_bytes()));
                    if let Some(o) = self.outcome.take() {
                        o.status(code);
                    };
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                // Over without trailers: no status, which gRPC calls INTERNAL.
                if let Some(o) = self.outcome.take() {
                    o.status(Code::Internal);
                };
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}
