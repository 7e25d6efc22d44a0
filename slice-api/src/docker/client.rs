//! A minimal Docker Engine API client: GETs over the engine's unix socket (HTTP/1.1, a
//! connection per request), unversioned paths so any engine answers in its own version.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixStream;

/// Talks to one engine.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// Why talking to Docker failed; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The socket is missing or refuses us (not mounted, no permission, no daemon).
    #[error("connecting to {socket}: {source}")]
    Connect { socket: PathBuf, source: std::io::Error },
    /// The HTTP exchange broke.
    #[error("{path}: {source}")]
    Http { path: String, source: hyper::Error },
    /// The engine answered with an error.
    #[error("{path}: {status}: {body}")]
    Status { path: String, status: StatusCode, body: String },
    /// The engine answered something that is not the JSON expected.
    #[error("{path}: unexpected answer: {detail}")]
    Answer { path: String, detail: String },
}

/// Docker's event stream: one JSON object per line.
pub struct Events {
    body: Incoming,
    buffer: BytesMut,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ids of the running containers of `project` that carry `label`.
    pub async fn list(&self, project: &str, label: &str) -> Result<Vec<String>, DockerError> {
        let filters = json!({ "label": [format!("com.docker.compose.project={project}"), label] });
        let path = format!("/containers/json?filters={}", encode(&filters));
        let list = self.get_json(&path).await?.unwrap_or_default();
        let ids = list.as_array().ok_or_else(|| answer(&path, "not a list"))?.iter();
        Ok(ids.filter_map(|c| c.get("Id").and_then(Value::as_str).map(str::to_owned)).collect())
    }

    /// `docker inspect` of a container; `None` when it no longer exists.
    pub async fn inspect(&self, id: &str) -> Result<Option<Value>, DockerError> {
        self.get_json(&format!("/containers/{id}/json")).await
    }

    /// Subscribes to the container events of `project` with these actions.
    pub async fn events(&self, project: &str, actions: &[&str]) -> Result<Events, DockerError> {
        let filters = json!({
            "type": ["container"],
            "label": [format!("com.docker.compose.project={project}")],
            "event": actions,
        });
        let path = format!("/events?filters={}", encode(&filters));
        let response = self.get(&path).await?;
        if response.status() != StatusCode::OK {
            return Err(status_error(&path, response).await);
        }
        Ok(Events { body: response.into_body(), buffer: BytesMut::new() })
    }

    async fn get_json(&self, path: &str) -> Result<Option<Value>, DockerError> {
        let response = self.get(path).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(path, response).await),
        }
        let body = response.into_body().collect().await.map_err(|source| http(path, source))?.to_bytes();
        serde_json::from_slice(&body).map(Some).map_err(|e| answer(path, &e.to_string()))
    }

    async fn get(&self, path: &str) -> Result<hyper::Response<Incoming>, DockerError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(path, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Docker connection ended with an error");
            }
        });
        let request = Request::get(path)
            .header(header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| answer(path, &e.to_string()))?;
        sender.send_request(request).await.map_err(|e| http(path, e))
    }
}

impl Events {
    /// The next event, or `None` when the engine ended the stream.
    pub async fn next(&mut self) -> Result<Option<Value>, DockerError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice(&line) {
                    Ok(event) => return Ok(Some(event)),
                    Err(e) => tracing::warn!(error = %e, "Skipping an unreadable Docker event"),
                }
                continue;
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(source)) => return Err(http("/events", source)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn encode(filters: &Value) -> String {
    form_urlencoded::byte_serialize(filters.to_string().as_bytes()).collect()
}

async fn status_error(path: &str, response: hyper::Response<Incoming>) -> DockerError {
    let status = response.status();
    let body = match response.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
        Err(e) => e.to_string(),
    };
    DockerError::Status { path: path.to_owned(), status, body }
}

fn http(path: &str, source: hyper::Error) -> DockerError {
    DockerError::Http { path: path.to_owned(), source }
}

fn answer(path: &str, detail: &str) -> DockerError {
    DockerError::Answer { path: path.to_owned(), detail: detail.to_owned() }
}
