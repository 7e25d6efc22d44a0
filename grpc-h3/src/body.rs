//! The receiving half of an HTTP/3 request stream as an `http_body::Body`: DATA frames,
//! then trailers. Dropped before the end, it tells the peer to stop sending.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use http::HeaderMap;
use http_body::{Body, Frame};

/// What both sides' receive halves can do.
pub trait Recv: Send + Unpin {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>>;
    fn stop_sending(&mut self, code: Code);
}

pub type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
pub type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

macro_rules! impl_recv {
    ($t:ty) => {
        impl Recv for $t {
            fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
                self.poll_recv_data(cx).map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
            }
            fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>> {
                self.poll_recv_trailers(cx)
            }
            fn stop_sending(&mut self, code: Code) {
                <$t>::stop_sending(self, code)
            }
        }
    };
}
impl_recv!(ServerRecv);
impl_recv!(ClientRecv);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

pub struct H3Body<R: Recv> {
    recv: R,
    state: State,
    /// A read is in flight: h3-quinn has lent the stream to it, and `stop_sending`
    /// would panic (h3-quinn 0.0.10); dropping the read stops the stream instead.
    reading: bool,
    /// Dropped with the body: the client side uses it to cancel the request pump.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl<R: Recv> H3Body<R> {
    pub fn new(recv: R) -> Self {
        H3Body { recv, state: State::Data, reading: false, _guard: None }
    }

    pub(crate) fn with_guard(recv: R, guard: Box<dyn Send + Sync>) -> Self {
        H3Body { recv, state: State::Data, reading: false, _guard: Some(guard) }
    }
}

impl<R: Recv> Body for H3Body<R> {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        self.reading = true;
        let polled = self.poll_inner(cx);
        self.reading = polled.is_pending();
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }
}

impl<R: Recv> H3Body<R> {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        loop {
            match self.state {
                State::Data => match ready!(self.recv.poll_data(cx)) {
                    Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(None) => self.state = State::Trailers,
                    Err(e) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Trailers => {
                    let t = ready!(self.recv.poll_trailers(cx));
                    self.state = State::Done;
                    return Poll::Ready(match t {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

impl<R: Recv> Drop for H3Body<R> {
    fn drop(&mut self) {
        if self.state != State::Done && !self.reading {
            self.recv.stop_sending(Code::H3_REQUEST_CANCELLED);
        }
    }
}
