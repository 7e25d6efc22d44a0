//! The response body handed back to callers: the endpoint's body, except that losing
//! the endpoint mid-response ends it with an UNAVAILABLE status in trailers instead of
//! an HTTP/2 reset, so gRPC clients see a retryable status naming the endpoint.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use grpc_h3::client::ClientBody;
use http::HeaderMap;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tonic::Status;

use crate::replay::BoxError;

/// The endpoint's body over either protocol.
pub(crate) enum Inner {
    H2(Incoming),
    H3(ClientBody),
}

impl Inner {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::H3(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inner::H2(b) => b.is_end_stream(),
            Inner::H3(b) => b.is_end_stream(),
        }
    }
}

pub struct UpstreamBody {
    inner: Inner,
    addr: SocketAddr,
    /// A frame read ahead to learn the call's status, yielded first.
    first: Option<Frame<Bytes>>,
    /// The trailers were synthesized; the body is over.
    done: bool,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Inner, addr: SocketAddr) -> Self {
        UpstreamBody { inner, addr, first: None, done: false }
    }

    /// Reads the first frame: data, the trailers, or `None` at the end.
    pub(crate) async fn peek(&mut self) -> Option<&Frame<Bytes>> {
        if self.first.is_none() && !self.done {
            self.first = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await.and_then(Result::ok);
        }
        self.first.as_ref()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.inner.poll_frame(cx)) {
            Some(Err(e)) => {
                self.done = true;
                let status = Status::unavailable(format!("upstream {} lost mid-response: {e}", self.addr));
                let mut trailers = HeaderMap::new();
                status.add_header(&mut trailers).map_err(|e| Box::new(e) as BoxError)?;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.done || self.inner.is_end_stream())
    }
}
