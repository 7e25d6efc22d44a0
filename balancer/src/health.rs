//! gRFC A17 health checking, the IO: one `grpc.health.v1.Health/Watch` stream on each
//! endpoint's connection, re-opened with backoff while the connection lives, every
//! change of health sent to the membership task. What each answer means is
//! [`lb_core::health`]'s.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, uri::Authority};
use lb_core::{
    Code,
    backoff::Backoff,
    health::{self, Answers, Health, WATCH_PATH},
    rng::SplitMix64,
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use crate::{
    pool::Update,
    replay::BoxError,
    transport::{FromBytes, Upstream},
    wire::Head,
};

/// The wait before re-opening a broken watch: doubling from the first, up to the
/// last, starting over once a stream has answered. A replica that closes its watch in
/// a loop is asked at most every 10 s.
const REOPEN_BASE: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(10);

/// What one connection's watch needs.
pub(crate) struct Watch<B> {
    pub addr: SocketAddr,
    pub service: Arc<str>,
    pub authority: Authority,
    pub updates: UnboundedSender<Update<B>>,
}

/// How a Watch stream ended: its status if it had one, what happened, how many
/// answers it gave.
struct End {
    code: Option<Code>,
    why: String,
    answers: u32,
}

impl<B> Watch<B>
where
    B: http_body::Body<Data = Bytes> + FromBytes + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    /// Watches on `upstream` for as long as the caller polls it (the connection's life).
    /// `told_unimplemented` is kept across connections so a replica without the health
    /// service is logged once.
    pub(crate) async fn run(&self, upstream: Upstream<B>, told_unimplemented: &AtomicBool) {
        let mut backoff = Backoff::new(REOPEN_BASE, REOPEN_MAX);
        let mut rng = SplitMix64::from_entropy();
        let mut told = None;
        loop {
            let opened = Instant::now();
            let end = self.stream(&upstream, &mut told).await;
            let verdict = health::on_stream_end(end.code, &end.why, end.answers, opened.elapsed());
            if !verdict.reopen {
                if !told_unimplemented.swap(true, Relaxed) {
                    info!(addr = %self.addr, service = %self.service,
                        "Replica has no grpc.health.v1 service (UNIMPLEMENTED); counting it healthy");
                }
                self.tell(&mut told, verdict.health);
                return std::future::pending().await; // nothing more to watch on this connection
            }
            warn!(addr = %self.addr, why = %end.why, "Health watch ended; re-opening after a backoff");
            self.tell(&mut told, verdict.health);
            if verdict.reset_backoff {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_delay(&mut rng)).await;
        }
    }

    /// One Watch stream, each answer told as it comes, until it ends.
    async fn stream(&self, upstream: &Upstream<B>, told: &mut Option<Health>) -> End {
        let end = |code, why: String, answers| End { code, why, answers };
        let resp = match upstream.clone().send(self.request()).await {
            Ok(resp) => resp,
            Err(failure) => return end(None, failure.error.to_string(), 0),
        };
        match Head::read(&resp) {
            Head::Headers => {}
            Head::TrailersOnly { code, .. } => return end(Some(code), status_text(code, resp.headers()), 0),
            Head::NotGrpc { .. } => {
                return end(None, format!("answered HTTP {} without a grpc-status", resp.status()), 0);
            }
        }
        let mut body = resp.into_body();
        let mut answers = Answers::default();
        let mut count = 0;
        loop {
            let frame = match std::future::poll_fn(|cx| body.poll_frame(cx)).await {
                None => return end(None, "the stream ended without a status".to_owned(), count),
                Some(Err((code, e))) => return end(Some(code), format!("{code}: {e}"), count),
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => match answers.feed(&data) {
                    Ok(Some(serving)) => {
                        count += 1;
                        self.tell(told, health::on_answer(serving));
                    }
                    Ok(None) => {}
                    // Dropping the body resets the stream.
                    Err(bad) => return end(None, format!("garbage on the stream: {bad}"), count),
                },
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let code = trailers.get("grpc-status").map(|c| Code::from_header(c.as_bytes()));
                    let why =
                        code.map_or_else(|| "trailers without a grpc-status".to_owned(), |c| status_text(c, &trailers));
                    return end(code, why, count);
                }
            }
        }
    }

    fn request(&self) -> Request<B> {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(WATCH_PATH)
            .build()
            .unwrap_or_else(|_| http::Uri::from_static(WATCH_PATH));
        let mut req = Request::new(B::from_bytes(Bytes::from(health::watch_request(&self.service))));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
        req
    }

    /// Tells the membership task when the verdict changed (`told` is the last one).
    fn tell(&self, told: &mut Option<Health>, health: Health) {
        if told.as_ref() != Some(&health) {
            *told = Some(health.clone());
            let _ = self.updates.send(Update::Health { addr: self.addr, health });
        }
    }
}

fn status_text(code: Code, headers: &http::HeaderMap) -> String {
    match headers.get("grpc-message").and_then(|m| m.to_str().ok()) {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code.to_string(),
    }
}
