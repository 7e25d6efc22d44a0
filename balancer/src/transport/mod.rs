//! The protocols to endpoints behind one interface: [`Upstream::send`] places a request
//! on a connection and says, when it fails, whether the request left the proxy, was
//! refused unprocessed, or failed with a status ([`Ended`]); [`Body`] streams the
//! response. [`h2`] and [`h3`] each own their connect, send and error classification,
//! so the call driver never matches on the protocol.

pub(crate) mod h2;
pub(crate) mod h3;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame};
use lb_core::{Code, call::Ended};
use tokio::sync::oneshot;

use crate::replay::BoxError;

/// A request body the balancer can make from bytes, for its own requests on a
/// connection (health checks).
pub(crate) trait FromBytes {
    fn from_bytes(data: Bytes) -> Self;
}

impl<B> FromBytes for crate::replay::ReplayBody<B> {
    fn from_bytes(data: Bytes) -> Self {
        crate::replay::ReplayBody::fixed(data)
    }
}

/// A connection that can take requests. Cheap to clone.
pub(crate) enum Upstream<B> {
    H2(h2::H2<B>),
    H3(grpc_h3::client::H3Client),
}

impl<B> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        match self {
            Upstream::H2(s) => Upstream::H2(s.clone()),
            Upstream::H3(c) => Upstream::H3(c.clone()),
        }
    }
}

/// A live connection, and how it ended once it does.
pub(crate) struct Connected<B> {
    pub upstream: Upstream<B>,
    pub ended: oneshot::Receiver<ConnectionEnd>,
    /// The replica sent GOAWAY with this error code: it takes no new streams, while
    /// those open may run on (HTTP/2 only; the connection ends later, in `ended`).
    pub goaway: Option<oneshot::Receiver<lb_core::goaway::ErrorCode>>,
}

/// Why a connection ended.
pub(crate) struct ConnectionEnd {
    pub why: String,
    /// The replica sent GOAWAY ENHANCE_YOUR_CALM: it refuses pings this often (gRPC
    /// servers' "too_many_pings").
    pub too_many_pings: bool,
}

/// An attempt that got no response headers: how it ended, and the error for messages.
pub(crate) struct Failure {
    pub ended: Ended,
    pub error: BoxError,
}

impl<B> Upstream<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    /// Sends `req` and waits for the response headers.
    pub(crate) async fn send(self, req: Request<B>) -> Result<Response<Body>, Failure> {
        match self {
            Upstream::H2(send) => h2::send(send, req).await,
            Upstream::H3(client) => h3::send(client, req).await,
        }
    }

    pub(crate) fn protocol(&self) -> &'static str {
        match self {
            Upstream::H2(_) => "h2",
            Upstream::H3(_) => "h3",
        }
    }
}

/// A response body's failure: the gRPC status it amounts to, and what happened.
pub(crate) type BodyError = (Code, BoxError);

/// A response body over either protocol.
pub enum Body {
    H2(h2::H2Body),
    H3(grpc_h3::client::ClientBody),
}

impl Body {
    /// The next frame; a failure comes with the gRPC status it amounts to.
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self {
            Body::H2(b) => b.poll_frame(cx),
            Body::H3(b) => Pin::new(b).poll_frame(cx).map_err(|e| (h3::code_of(&e), e.into())),
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        match self {
            Body::H2(b) => b.is_end_stream(),
            Body::H3(b) => b.is_end_stream(),
        }
    }
}
