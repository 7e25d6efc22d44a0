//! The response body handed back to callers: the endpoint's body, except that losing
//! the endpoint mid-response ends it with a status in trailers instead of a reset:
//! UNAVAILABLE for a lost connection, a reset's code mapped as gRPC's PROTOCOL-HTTP2
//! says, naming the endpoint.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use tonic::Status;

use crate::{code::to_tonic, replay::BoxError, transport};

pub struct UpstreamBody {
    inner: transport::Body,
    addr: SocketAddr,
    /// The trailers were synthesized; the body is over.
    done: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("addr", &self.addr).field("done", &self.done).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: transport::Body, addr: SocketAddr) -> Self {
        UpstreamBody { inner, addr, done: false }
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
                let status =
                    Status::new(to_tonic(code), format!("upstream {} failed mid-response: {error}", self.addr));
                let mut trailers = HeaderMap::new();
                status.add_header(&mut trailers).map_err(|e| Box::new(e) as BoxError)?;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}
