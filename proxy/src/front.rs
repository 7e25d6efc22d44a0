//! The h2c front with the `h2` crate directly: one task per client connection accepts
//! its streams, one task per stream runs the call and sends the response back as the
//! client's flow control allows. A client's reset cancels its call; a drain sends
//! GOAWAY and lets open streams finish. The limits are h2's, set here.

use std::{future::poll_fn, net::SocketAddr, sync::Arc, task::Poll};

use balancer::h2::{RecvBody, send_body};
use bytes::Bytes;
use h2::server::SendResponse;
use http::Request;
use http_body::Body as _;
use http_body_util::Either;
use tokio::{net::TcpStream, sync::watch, time::Instant};
use tracing::debug;

use crate::App;

/// Streams one client may have open; the next is refused (REFUSED_STREAM).
pub(crate) const MAX_STREAMS: u32 = 200;
/// Request headers larger than this are refused (431).
pub(crate) const MAX_HEADER_LIST: u32 = 16 << 10;
/// Response bytes queued per stream before waiting for the client's window.
const MAX_SEND_BUFFER: usize = 400 << 10;
/// Streams the proxy may reset for a client's protocol errors before calling it an
/// attack and closing the connection.
pub(crate) const MAX_ERROR_RESETS: usize = 1024;
/// Streams the proxy closed early (a replica answered before the request ended) that
/// are remembered at a time, so the client's frames still in flight for them are
/// dropped quietly. Forgotten, each late frame costs a reset counted against
/// `MAX_ERROR_RESETS`, and the client is sent away as an attacker: h2's default of 10
/// did that under load, and 200 still did on a busy machine (40,000 quick calls, 64 at
/// a time, beside other work). A few hundred bytes each, held 30 s at most.
const MAX_CLOSED_EARLY: usize = 4096;

/// Serves one client connection until it closes, or until `drain` turns true and its
/// open streams are done.
pub(crate) async fn serve(tcp: TcpStream, peer: SocketAddr, app: Arc<App>, mut drain: watch::Receiver<bool>) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .max_concurrent_reset_streams(MAX_CLOSED_EARLY)
        .handshake::<_, Bytes>(tcp);
    let mut conn = tokio::select! {
        c = handshake => match c {
            Ok(c) => c,
            Err(e) => return debug!(%peer, error = %e, "Client handshake failed"),
        },
        _ = drain.wait_for(|d| *d) => return,
    };
    let mut pings = conn.ping_pong().expect("taken once, here");
    // A ping to the client every `--client-keepalive`, so a vanished one is let go when
    // it has not answered in twice that.
    let every = app.client_keepalive;
    let mut tick = tokio::time::interval(every);
    tick.reset();
    let mut unanswered: Option<Instant> = None;
    // Made once, not per accepted stream: each would take the watch's lock.
    let drained = drain.wait_for(|d| *d);
    tokio::pin!(drained);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(respond_to(app.clone(), req, respond));
                }
                Some(Err(e)) => return debug!(%peer, error = %e, "Client connection ended with an error"),
                None => return,
            },
            _ = &mut drained, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            _ = tick.tick() => match unanswered {
                Some(since) if since.elapsed() >= 2 * every => {
                    return debug!(%peer, "Client answered no ping in {:?}; closing", 2 * every);
                }
                Some(_) => {}
                None => {
                    if pings.send_ping(h2::Ping::opaque()).is_err() {
                        return;
                    }
                    unanswered = Some(Instant::now());
                }
            },
            _ = poll_fn(|cx| pings.poll_pong(cx)), if unanswered.is_some() => unanswered = None,
        }
    }
}

/// Runs one call and sends its response; a reset from the client drops the call, which
/// cancels its attempts. `--busy-poll` and `--coalesce` hear when it starts and ends.
async fn respond_to(app: Arc<App>, req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
    let call = app.coalesce.as_ref().map(|c| c.call());
    if let Some(busy) = &app.busy {
        busy.touch();
    }
    answer(&app, req, &mut respond).await;
    if let Some(busy) = &app.busy {
        busy.touch();
    }
    if let Some(call) = call {
        call.ended();
    }
}

async fn answer(app: &App, req: Request<h2::RecvStream>, respond: &mut SendResponse<Bytes>) {
    let req = req.map(|recv| Either::Left(RecvBody::new(recv)));
    let resp = {
        // On the heap: the call is kilobytes of state, and a task moves its future (and
        // rewrites it when done) by value; boxed, those moves copy a pointer. Freed
        // when the response headers are in, not held while a stream streams.
        let mut call = Box::pin(app.handle(req));
        poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            call.as_mut().poll(cx).map(Some)
        })
        .await
    };
    let Some(resp) = resp else { return };
    let (head, body) = resp.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(http::Response::from_parts(head, ()), end) {
        Ok(stream) if !end => send_body(body, stream).await,
        Ok(_) => {}
        Err(e) => debug!(error = %e, "Client stream gone before the response"),
    }
}
