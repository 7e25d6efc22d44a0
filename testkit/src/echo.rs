//! The `echo.Echo` test service: client streaming and bidi streaming, with counters
//! a test can read (calls, and calls the caller cancelled before they finished).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("echo");
}

use pb::{EchoMessage, echo_server::Echo};

#[derive(Debug, Default)]
pub struct EchoCounts {
    pub calls: AtomicUsize,
    /// Calls dropped before they finished: the caller reset the stream.
    pub cancelled: AtomicUsize,
}

impl EchoCounts {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }
}

pub struct EchoService {
    name: String,
    /// Added before `Collect` replies.
    delay: Duration,
    pub counts: Arc<EchoCounts>,
}

impl EchoService {
    pub fn new(name: &str, delay: Duration) -> Self {
        EchoService { name: name.to_owned(), delay, counts: Arc::default() }
    }
}

/// Counts a call as cancelled unless it is disarmed when the call completes.
struct CancelGuard(Option<Arc<EchoCounts>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<EchoMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn collect(&self, req: Request<Streaming<EchoMessage>>) -> Result<Response<EchoMessage>, Status> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        let mut guard = CancelGuard(Some(self.counts.clone()));
        let mut stream = req.into_inner();
        let mut texts = Vec::new();
        while let Some(m) = stream.next().await {
            texts.push(m?.text);
        }
        tokio::time::sleep(self.delay).await;
        guard.0 = None;
        Ok(Response::new(EchoMessage { text: texts.join(","), server: self.name.clone() }))
    }

    type ChatStream = ChatStream;

    /// Echoes each message; a message `fail:<this server's name>` ends the call with
    /// UNAVAILABLE in trailers, after the response headers.
    async fn chat(&self, req: Request<Streaming<EchoMessage>>) -> Result<Response<ChatStream>, Status> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        let name = self.name.clone();
        let fail = format!("fail:{name}");
        let out = req.into_inner().map(move |m| {
            let m = m?;
            if m.text == fail {
                return Err(Status::unavailable(format!("{name} fails {}", m.text)));
            }
            Ok(EchoMessage { text: m.text, server: name.clone() })
        });
        Ok(Response::new(Box::pin(out)))
    }
}
