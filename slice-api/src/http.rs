//! The HTTP/1.1 server (hyper): routes GETs to lists and watches of the hub, streams
//! watch events until `timeoutSeconds`, the hub ends the watch, or shutdown.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::api::{self, ApiError, Route};
use crate::hub::{Event, Filter, Hub};

type ResponseBody = BoxBody<Bytes, Infallible>;

/// How long open connections get to finish after shutdown starts (watches end at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the API on `listener` until `shutdown` resolves, then ends every watch and
/// waits (briefly) for the connections to finish.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let hub = hub.clone();
        let service = hyper::service::service_fn(move |req| {
            let response = handle(&hub, &req);
            tracing::debug!(%peer, method = %req.method(), uri = %req.uri(), status = response.status().as_u16(), "Request");
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "Connection ended with an error");
            }
        });
    }
    hub.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("Connections still open after the shutdown grace; closing them");
    }
}

/// Answers one request.
fn handle(hub: &Hub, req: &Request<Incoming>) -> Response<ResponseBody> {
    match answer(hub, req) {
        Ok(response) => response,
        Err(e) => {
            json_response(StatusCode::from_u16(e.code()).unwrap_or(StatusCode::BAD_REQUEST), api::status_json(&e))
        }
    }
}

fn answer(hub: &Hub, req: &Request<Incoming>) -> Result<Response<ResponseBody>, ApiError> {
    let route = api::route(req.uri().path())
        .ok_or_else(|| ApiError::NotFound("the server could not find the requested resource".into()))?;
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    match route {
        Route::Live => Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed())),
        Route::Ready if hub.is_synced() => Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed())),
        Route::Ready => Err(ApiError::NotReady),
        Route::Version => Ok(json_response(StatusCode::OK, api::version_json())),
        Route::Slice { namespace, name } => {
            let (_, slices) = hub.list(&Filter { namespace: Some(namespace), ..Filter::default() });
            let slice = slices.into_iter().find(|s| s.metadata.name.as_deref() == Some(name.as_str()));
            let slice = slice.ok_or_else(|| ApiError::NotFound(format!("endpointslices \"{name}\" not found")))?;
            Ok(json_response(StatusCode::OK, serde_json::to_vec(&slice).unwrap_or_default().into()))
        }
        Route::Slices { namespace } => {
            let query = api::parse_query(req.uri().query())?;
            let filter = query.filter(namespace);
            if query.watch {
                let watch = hub.watch(filter, query.start(), query.bookmarks);
                let body = WatchBody::new(watch.replay, watch.live, Instant::now() + query.timeout);
                return Ok(json_response_with(StatusCode::OK, body.boxed()));
            }
            let (version, items) = hub.list(&filter);
            query.check_list_version(version)?;
            Ok(json_response(StatusCode::OK, api::list_json(version, items)))
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    json_response_with(status, Full::new(body).boxed())
}

fn json_response_with(status: StatusCode, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// A watch's response body: the replayed events, then the live ones, one JSON line per
/// chunk, until the deadline or the end of the live channel.
struct WatchBody {
    replay: VecDeque<Event>,
    live: Option<mpsc::Receiver<Event>>,
    deadline: Pin<Box<Sleep>>,
}

impl WatchBody {
    fn new(replay: Vec<Event>, live: Option<mpsc::Receiver<Event>>, deadline: Instant) -> WatchBody {
        WatchBody { replay: replay.into(), live, deadline: Box::pin(tokio::time::sleep_until(deadline)) }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(event) = self.replay.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(api::event_line(&event)))));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.live = None;
            return Poll::Ready(None);
        }
        let Some(live) = self.live.as_mut() else {
            return Poll::Ready(None);
        };
        match live.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(Frame::data(api::event_line(&event))))),
            Poll::Ready(None) => {
                self.live = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty() && self.live.is_none()
    }
}

/// `slice-api health-check`: exit 0 when `GET /readyz` answers 200 within 2 s, that is
/// when the server is up and has listed the replicas (so proxies that wait for it start
/// with the full set).
pub async fn check_health(addr: std::net::SocketAddr) -> Result<(), String> {
    let check = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get("/readyz")
            .header(header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::OK => Ok(()),
            status => Err(format!("GET /readyz: {status}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), check).await.map_err(|_| "timed out after 2s".to_string())?
}
