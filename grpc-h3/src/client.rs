//! An HTTP/3 client over one QUIC connection: sends requests (the body pumped by a task
//! of its own) and returns responses whose bodies stream. A request abandoned before
//! its body is sent is reset, never finished cleanly.

use std::{future::Future, net::SocketAddr};

use bytes::Bytes;
use h3::{
    ConnectionState,
    error::{Code, ConnectionError, StreamError},
    quic::ConnectionErrorIncoming,
};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use crate::{
    BoxError,
    body::{ClientRecv, H3Body},
};

/// The body of responses the client returns.
pub type ClientBody = H3Body<ClientRecv>;

#[derive(Clone)]
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
}

/// A request that failed without a response.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SendError {
    pub error: StreamError,
    /// The request stream was opened: the server may have seen the request.
    pub sent: bool,
}

impl SendError {
    /// The server refused the request unprocessed (HTTP/3 REQUEST_REJECTED).
    pub fn is_rejected(&self) -> bool {
        matches!(&self.error, StreamError::RemoteTerminate { code, .. } if *code == Code::H3_REQUEST_REJECTED)
    }

    /// The server closed the connection gracefully (H3_NO_ERROR, after its GOAWAY) before
    /// this request got an answer. A draining server answers the requests it accepted
    /// first, so this one was not accepted, unless the server's drain deadline cut its
    /// requests short: a server should reset those rather than close over them.
    pub fn is_graceful_close(&self) -> bool {
        matches!(
            &self.error,
            StreamError::ConnectionError {
                0: ConnectionError::Remote { 0: ConnectionErrorIncoming::ApplicationClose { error_code }, .. },
                ..
            } if *error_code == Code::H3_NO_ERROR.value()
        )
    }

    /// The server reset the request with H3_REQUEST_CANCELLED.
    pub fn is_cancelled(&self) -> bool {
        matches!(&self.error, StreamError::RemoteTerminate { code, .. } if *code == Code::H3_REQUEST_CANCELLED)
    }
}

/// Connects to `addr`, verifying its certificate for `server_name`. The returned
/// future drives the connection and ends when it closes.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(H3Client, impl Future<Output = ConnectionError> + Send + use<>), BoxError> {
    let (client, driver, _goaway) = connect_watching_goaway(endpoint, addr, server_name).await?;
    Ok((client, driver))
}

/// [`connect`], also telling when the server sends GOAWAY: it takes no new requests,
/// while those open run on until the connection closes.
pub async fn connect_watching_goaway(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(H3Client, impl Future<Output = ConnectionError> + Send + use<>, oneshot::Receiver<()>), BoxError> {
    let quic = endpoint.connect(addr, server_name)?.await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic)).await?;
    let (goaway_tx, goaway) = oneshot::channel();
    let drive = async move {
        let mut goaway_tx = Some(goaway_tx);
        std::future::poll_fn(|cx| {
            // The GOAWAY is read off the control stream inside poll_close.
            let closed = driver.poll_close(cx);
            if goaway_tx.is_some() && driver.is_closing() {
                let _ = goaway_tx.take().map(|tx| tx.send(()));
            }
            closed
        })
        .await
    };
    Ok((H3Client { send }, drive, goaway))
}

/// Dropped when the caller lets go of the call: tells the pump to reset.
struct Cancel(#[allow(dead_code)] oneshot::Sender<()>);

impl H3Client {
    pub async fn send<B>(&mut self, req: Request<B>) -> Result<Response<ClientBody>, SendError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let (parts, body) = req.into_parts();
        let stream = self
            .send
            .send_request(Request::from_parts(parts, ()))
            .await
            .map_err(|error| SendError { error, sent: false })?;
        let (tx, mut rx) = stream.split();
        let (cancel, cancelled) = oneshot::channel();
        tokio::spawn(pump(tx, body, cancelled));
        let guard = Cancel(cancel);
        match rx.recv_response().await {
            Ok(resp) => Ok(resp.map(|()| H3Body::with_guard(rx, Box::new(guard)))),
            Err(error) => Err(SendError { error, sent: true }),
        }
    }
}

async fn pump<B>(
    mut tx: h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    body: B,
    mut cancelled: oneshot::Receiver<()>,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    tokio::pin!(body);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut cancelled => return tx.stop_stream(Code::H3_REQUEST_CANCELLED),
        };
        let sent = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => tx.send_data(data).await,
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => tx.send_trailers(t).await,
                    Err(_) => Ok(()),
                },
            },
            Some(Err(_)) => return tx.stop_stream(Code::H3_REQUEST_CANCELLED),
            None => break,
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = tx.finish().await;
}

/// An [`H3Client`] as a tower service, for tonic clients: requests that carry only a
/// path get the scheme and authority of the server.
#[derive(Clone)]
pub struct H3Channel {
    client: H3Client,
    authority: http::uri::Authority,
}

impl H3Channel {
    pub fn new(client: H3Client, authority: http::uri::Authority) -> Self {
        H3Channel { client, authority }
    }
}

impl<B> tower::Service<Request<B>> for H3Channel
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<ClientBody>;
    type Error = SendError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<ClientBody>, SendError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), SendError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if req.uri().authority().is_none() {
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTPS);
            parts.authority = Some(self.authority.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let mut client = self.client.clone();
        Box::pin(async move { client.send(req).await })
    }
}
