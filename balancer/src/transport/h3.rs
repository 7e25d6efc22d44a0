//! HTTP/3 over QUIC: the connection (keep-alive and idle timeout in grpc-h3), sending,
//! and what each failure means: a request whose stream never opened was not sent, one
//! the server rejected (REQUEST_REJECTED) or left unanswered when it closed gracefully
//! (H3_NO_ERROR after its GOAWAY) was refused, anything else went out.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use grpc_h3::client::H3Client;
use h3::error::StreamError;
use http::{Request, Response};
use lb_core::{Code, call::Ended, goaway::NO_ERROR};
use tokio::sync::oneshot;

use super::{Body, Connected, ConnectionEnd, Failure, Upstream};
use crate::{connect::H3, replay::BoxError};

pub(crate) async fn connect<B>(h3: &H3, addr: SocketAddr, timeout: Duration) -> Result<Connected<B>, String> {
    let connect = grpc_h3::client::connect_watching_goaway(&h3.endpoint, addr, &h3.server_name);
    let (client, driver, h3_goaway) = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("HTTP/3 connect: {e}")),
        Err(_) => return Err(format!("HTTP/3 connect: timed out after {timeout:?}")),
    };
    let (tx, ended) = oneshot::channel();
    let (goaway_tx, goaway) = oneshot::channel();
    tokio::spawn(async move {
        tokio::pin!(driver);
        let e = tokio::select! {
            e = &mut driver => e,
            Ok(()) = h3_goaway => {
                let _ = goaway_tx.send(NO_ERROR); // HTTP/3's GOAWAY carries no error code
                driver.await
            }
        };
        let why =
            if e.is_h3_no_error() { "connection closed (GOAWAY)".to_owned() } else { format!("connection lost: {e}") };
        let _ = tx.send(ConnectionEnd { why, too_many_pings: false });
    });
    Ok(Connected { upstream: Upstream::H3(client), ended, goaway: Some(goaway) })
}

pub(super) async fn send<B>(mut client: H3Client, req: Request<B>) -> Result<Response<Body>, Failure>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    match client.send(req).await {
        Ok(resp) => Ok(resp.map(Body::H3)),
        Err(e) => {
            let ended = if !e.sent {
                Ended::NotSent
            } else if e.is_rejected() || e.is_graceful_close() {
                Ended::Refused
            } else {
                Ended::Failed { code: if e.is_cancelled() { Code::Cancelled } else { Code::Unavailable } }
            };
            Err(Failure { ended, error: e.into() })
        }
    }
}

/// The gRPC status for an HTTP/3 body that failed mid-response.
pub(super) fn code_of(err: &StreamError) -> Code {
    match err {
        StreamError::RemoteTerminate { code, .. } if *code == h3::error::Code::H3_REQUEST_CANCELLED => Code::Cancelled,
        _ => Code::Unavailable,
    }
}
