//! A request body that can be sent again: the frames the first attempt reads are kept
//! (up to a limit) so a call the endpoint never processed can be replayed on another.
//!
//! Several attempts may read at once (hedging): the one that reaches the end of the
//! buffer pulls from the source and wakes the others. Once the call is committed
//! ([`ReplayBody::commit`]) nothing more is buffered, and the buffer is freed when the
//! committed attempt has read it; once the body outgrows the limit, it can no longer be
//! replayed ([`ReplayBody::is_replayable`]).
//!
//! It also watches the gRPC length prefixes going by and fails the body when a message
//! is larger than allowed ([`ReplayBody::too_large`]).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use smallvec::SmallVec;

use crate::frame::{FrameScan, TooLarge};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Which reader this is (0 for the handle [`ReplayBody::new`] returns), so a commit
    /// can name the attempt it keeps.
    reader: usize,
    /// Data frames this attempt has yielded.
    pos: usize,
    /// This attempt has yielded the trailers (or the end).
    finished: bool,
}

struct Shared<B> {
    /// The caller's body; `None` for a [`ReplayBody::fixed`] one.
    source: Option<B>,
    /// Data frames `offset..offset + chunks.len()` of the stream; a unary request's one
    /// frame (or two) is kept inline.
    chunks: SmallVec<[Bytes; 2]>,
    /// Frames dropped from the buffer (after a commit or an overflow).
    offset: usize,
    buffered: usize,
    limit: usize,
    /// Bytes buffered by every call together, against `budget_limit`.
    budget: Budget,
    /// Buffering stopped: committed, over the limit, or the source failed.
    replay_lost: bool,
    /// The reader the call is committed to: it may still be replaying buffered chunks,
    /// so they go only once it has caught up with the source; every other reader fails.
    committed: Option<usize>,
    /// Readers handed out so far.
    readers: usize,
    source_done: bool,
    trailers: Option<HeaderMap>,
    frames: FrameScan,
    too_large: Option<TooLarge>,
    /// The caller's body failed (its stream reset, a read error).
    source_failed: bool,
    /// Readers waiting for the source while another reader polls it.
    waiters: Vec<Waker>,
}

pub use lb_core::budget::Budget;

impl<B> ReplayBody<B> {
    /// Keeps up to `limit` bytes (within `budget`) for replays and refuses messages over
    /// `max_message`.
    pub fn new(source: B, limit: usize, max_message: u32, budget: Budget) -> Self {
        let shared = Shared {
            source: Some(source),
            chunks: SmallVec::new(),
            offset: 0,
            buffered: 0,
            limit,
            budget,
            replay_lost: false,
            committed: None,
            readers: 0,
            source_done: false,
            trailers: None,
            frames: FrameScan::new(max_message),
            too_large: None,
            source_failed: false,
            waiters: Vec::new(),
        };
        ReplayBody { shared: Arc::new(Mutex::new(shared)), reader: 0, pos: 0, finished: false }
    }

    /// A body of `data` alone, for the balancer's own requests (health checks). It
    /// takes nothing from any budget.
    pub fn fixed(data: Bytes) -> Self {
        let shared = Shared {
            source: None,
            chunks: smallvec::smallvec![data],
            offset: 0,
            buffered: 0,
            limit: 0,
            budget: Budget::new(0),
            replay_lost: false,
            committed: None,
            readers: 0,
            source_done: true,
            trailers: None,
            frames: FrameScan::new(u32::MAX),
            too_large: None,
            source_failed: false,
            waiters: Vec::new(),
        };
        ReplayBody { shared: Arc::new(Mutex::new(shared)), reader: 0, pos: 0, finished: false }
    }

    /// A fresh reader from the start, for the next attempt.
    pub fn replay(&self) -> Self {
        let reader = {
            let mut s = self.lock();
            s.readers += 1;
            s.readers
        };
        ReplayBody { shared: self.shared.clone(), reader, pos: 0, finished: false }
    }

    /// Which reader this is, for [`ReplayBody::commit`].
    pub fn reader(&self) -> usize {
        self.reader
    }

    /// Whether another attempt could still send the whole body.
    pub fn is_replayable(&self) -> bool {
        !self.lock().replay_lost
    }

    /// The request itself failed (a message over the limit, or the caller's stream
    /// broke): an attempt that ended because of it says nothing about its endpoint.
    pub fn failed_by_caller(&self) -> bool {
        let s = self.lock();
        s.too_large.is_some() || s.source_failed
    }

    /// The oversized message that failed the body, if any.
    pub fn too_large(&self) -> Option<TooLarge> {
        self.lock().too_large
    }

    /// The call is committed to the attempt reading with `reader`: stop buffering, fail
    /// every other reader, and free the buffer as soon as that one no longer needs it (it
    /// may be replaying it still, or waiting for the client's next message).
    pub fn commit(&self, reader: usize) {
        let mut s = self.lock();
        s.replay_lost = true;
        s.committed = Some(reader);
        // A reader parked on the source wakes to free the buffer now, not at the client's
        // next message.
        s.wake_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<B>> {
        // A panic while holding this lock leaves only plain data behind.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Shared<B> {
    fn drop_buffer(&mut self) {
        self.replay_lost = true;
        self.offset += self.chunks.len();
        self.chunks = SmallVec::new();
        self.budget.give(std::mem::take(&mut self.buffered));
    }

    fn keep(&mut self, data: &Bytes) {
        if self.replay_lost {
            self.offset += 1;
        } else if self.buffered + data.len() > self.limit || !self.budget.take(data.len()) {
            self.drop_buffer();
            self.offset += 1;
        } else {
            self.buffered += data.len();
            self.chunks.push(data.clone());
        }
    }

    fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

impl<B> Drop for Shared<B> {
    fn drop(&mut self) {
        self.budget.give(self.buffered);
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let mut s = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.committed.is_some_and(|r| r != this.reader) {
            return Poll::Ready(Some(Err("the call is committed to another attempt".into())));
        }
        let end = s.offset + s.chunks.len();
        if this.pos < s.offset {
            return Poll::Ready(Some(Err("request body already sent to another attempt".into())));
        }
        if this.pos < end {
            let chunk = s.chunks[this.pos - s.offset].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.committed.is_some() && !s.chunks.is_empty() {
            s.drop_buffer(); // the committed reader has caught up: nobody needs it
        }
        if s.source_done {
            this.finished = true;
            return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(source) = s.source.as_mut() else {
            this.finished = true; // a fixed body has no source: it is done
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        let Poll::Ready(polled) = polled else {
            if !s.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                s.waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        };
        s.wake_waiters();
        match polled {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if let Err(e) = s.frames.feed(&data) {
                            s.too_large = Some(e);
                            s.drop_buffer();
                            return Poll::Ready(Some(Err(e.into())));
                        }
                        s.keep(&data);
                        this.pos += 1;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => frame,
                };
                if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.source_done = true;
                    this.finished = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                s.source_failed = true;
                s.drop_buffer();
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                s.source_done = true;
                this.finished = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.finished {
            return true;
        }
        let s = self.lock();
        let drained = self.pos >= s.offset + s.chunks.len();
        drained
            && ((s.source_done && s.trailers.is_none())
                || (!s.source_done && s.source.as_ref().is_none_or(Body::is_end_stream)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use http_body_util::BodyExt;

    /// A body that yields the given frames, one per poll, then ends, or with `quiet`
    /// waits forever: a client that went quiet.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        quiet: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.frames.pop_front() {
                None if self.quiet => Poll::Pending,
                next => Poll::Ready(next.map(Ok)),
            }
        }
    }

    fn source(chunks: &[&'static str], trailer: bool) -> Frames {
        let mut frames: VecDeque<_> = chunks.iter().map(|c| Frame::data(Bytes::from_static(c.as_bytes()))).collect();
        if trailer {
            let mut t = HeaderMap::new();
            t.insert("x-end", "1".parse().unwrap());
            frames.push_back(Frame::trailers(t));
        }
        Frames { frames, quiet: false }
    }

    async fn read_all(b: ReplayBody<Frames>) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let collected = b.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn replays_data_and_trailers() {
        let body = ReplayBody::new(source(&["ab", "cd"], true), 1024, u32::MAX, Budget::new(1 << 20));
        let first = read_all(body.replay()).await.unwrap();
        assert_eq!(first.0, b"abcd");
        assert!(body.is_replayable());
        let second = read_all(body.replay()).await.unwrap();
        assert_eq!(second, first);
        assert_eq!(second.1.unwrap()["x-end"], "1");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_sent_once_and_never_replayed() {
        let body = ReplayBody::new(source(&["abc", "def", "ghi"], false), 5, u32::MAX, Budget::new(1 << 20));
        assert_eq!(read_all(body.replay()).await.unwrap().0, b"abcdefghi");
        assert!(!body.is_replayable());
        assert!(read_all(body.replay()).await.is_err(), "a replay must fail, not send a truncated body");
    }

    #[tokio::test]
    async fn the_shared_budget_bounds_all_calls_together() {
        let budget = Budget::new(6);
        let a = ReplayBody::new(source(&["abcd"], false), 1024, u32::MAX, budget.clone());
        let b = ReplayBody::new(source(&["efgh"], false), 1024, u32::MAX, budget.clone());
        read_all(a.replay()).await.unwrap();
        read_all(b.replay()).await.unwrap();
        assert!(a.is_replayable());
        assert!(!b.is_replayable(), "4 + 4 bytes exceed the budget of 6");
        assert_eq!(budget.used(), 4);
        drop(a);
        assert_eq!(budget.used(), 0, "a finished call gives its bytes back");
    }

    #[tokio::test]
    async fn commit_frees_the_buffer_and_forbids_replay() {
        let budget = Budget::new(1 << 20);
        let body = ReplayBody::new(source(&["ab", "cd"], false), 1024, u32::MAX, budget.clone());
        let mut first = body.replay();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        body.commit(first.reader());
        assert!(!body.is_replayable());
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "cd", "the committed attempt keeps streaming");
        assert_eq!(budget.used(), 0, "caught up with the source: the buffer is freed");
        assert!(first.frame().await.is_none());
    }

    // Review finding: committing to an attempt that is still replaying the buffer (a
    // retry or a hedge whose server answered headers before reading) must not cut it off.
    #[tokio::test]
    async fn a_committed_replay_that_is_behind_reads_the_whole_body() {
        let budget = Budget::new(1 << 20);
        let body = ReplayBody::new(source(&["ab", "cd", "ef", "gh"], true), 1024, u32::MAX, budget.clone());
        let mut first = body.replay();
        for want in ["ab", "cd", "ef"] {
            assert_eq!(first.frame().await.unwrap().unwrap().into_data().unwrap(), want);
        }
        drop(first); // the first attempt failed
        let mut retry = body.replay();
        assert_eq!(retry.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        body.commit(retry.reader()); // the retry's server sent headers
        assert_eq!(budget.used(), 6, "still needed by the retry");
        let (rest, trailers) = read_all(retry).await.unwrap();
        assert_eq!(rest, b"cdefgh");
        assert_eq!(trailers.unwrap()["x-end"], "1");
        assert_eq!(budget.used(), 0);
    }

    // Review finding: a commit while the committed reader waits for the client freed
    // nothing until the client's next message, holding the shared budget meanwhile.
    #[tokio::test]
    async fn a_commit_frees_the_buffer_while_the_client_is_quiet() {
        let budget = Budget::new(1 << 20);
        let quiet = Frames { quiet: true, ..source(&["ab"], false) };
        let body = ReplayBody::new(quiet, 1024, u32::MAX, budget.clone());
        let mut reader = body.replay();
        let id = reader.reader();
        let task = tokio::spawn(async move { while reader.frame().await.is_some() {} });
        while budget.used() != 2 {
            tokio::task::yield_now().await; // the reader took "ab" and waits for more
        }
        body.commit(id);
        for _ in 0..100 {
            if budget.used() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.used(), 0, "freed at the commit, not at the client's next message");
        task.abort();
    }

    // Review finding: after a commit only the committed reader may read; another
    // attempt's reader must not free the buffer or take the client's next message.
    #[tokio::test]
    async fn after_a_commit_other_readers_fail_and_the_committed_one_reads_on() {
        let body = ReplayBody::new(source(&["ab", "cd"], false), 1024, u32::MAX, Budget::new(1 << 20));
        let mut ahead = body.replay();
        assert_eq!(ahead.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        let behind = body.replay();
        body.commit(behind.reader());
        assert!(ahead.frame().await.unwrap().is_err(), "the other attempt gets nothing more");
        assert_eq!(read_all(behind).await.unwrap().0, b"abcd");
    }

    #[tokio::test]
    async fn a_fixed_body_is_its_data_then_the_end_for_every_reader() {
        let body = ReplayBody::<Frames>::fixed(Bytes::from_static(b"xyz"));
        let again = body.replay();
        assert!(!body.is_end_stream());
        assert_eq!(read_all(body).await.unwrap(), (b"xyz".to_vec(), None));
        assert_eq!(read_all(again).await.unwrap().0, b"xyz");
    }
}
