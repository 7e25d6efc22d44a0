//! The proxies' admin API over plain HTTP/1.1: a GET with a deadline, and
//! `/admin/events` read as Server-Sent Events. The only network IO of `client top`;
//! [`Sse`], which splits the stream into messages, is pure.

use std::time::Duration;

use balancer::HostPort;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `GET path` on `admin`: the body of a 2xx answer, or why there is none within
/// `timeout`, in words for the screen.
pub async fn get(admin: &HostPort, path: &str, timeout: Duration) -> Result<String, String> {
    let answer = async {
        let body = open(admin, path).await?;
        let bytes = body.collect().await.map_err(|e| format!("reading {path}: {e}"))?.to_bytes();
        String::from_utf8(bytes.into()).map_err(|_| format!("{path} is not UTF-8"))
    };
    tokio::time::timeout(timeout, answer).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// `GET /admin/events` on `admin`: the body, streaming, once the answer's head is in
/// within `timeout`.
pub async fn events(admin: &HostPort, timeout: Duration) -> Result<Incoming, String> {
    let open = open(admin, "/admin/events");
    tokio::time::timeout(timeout, open).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// One request on a new connection; the connection ends with the body.
async fn open(admin: &HostPort, path: &str) -> Result<Incoming, String> {
    let tcp = TcpStream::connect((admin.host.as_str(), admin.port)).await.map_err(|e| format!("connecting: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("HTTP/1.1: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let resp = send.send_request(req).await.map_err(|e| format!("GET {path}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {path}: {}", resp.status()));
    }
    Ok(resp.into_body())
}

/// One message of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `event:` (`message` when absent) and the `data:` lines joined.
    Event { name: String, data: String },
    /// A message of `:` lines only, such as `: missed 12 events`.
    Comment(String),
}

/// Splits an event stream into [`Message`]s as its bytes arrive, in any chunks.
#[derive(Debug, Default)]
pub struct Sse {
    /// Bytes of a message whose blank line has not arrived yet.
    pending: Vec<u8>,
}

impl Sse {
    /// The messages `bytes` completes.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        self.pending.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let mut out = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = self.pending.drain(..end + 2).collect();
            out.extend(message(&String::from_utf8_lossy(&raw)));
        }
        out
    }
}

fn message(text: &str) -> Option<Message> {
    let (mut name, mut data, mut comment) = (None, Vec::new(), None);
    for line in text.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => comment = comment.or(Some(value.to_owned())),
            "event" => name = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if !data.is_empty() {
        return Some(Message::Event { name: name.unwrap_or_else(|| "message".to_owned()), data: data.join("\n") });
    }
    comment.map(Message::Comment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> Message {
        Message::Event { name: name.into(), data: data.into() }
    }

    #[test]
    fn messages_end_at_a_blank_line_whatever_the_chunks() {
        let stream = b": events as they happen\n\nevent: state\ndata: {\"kind\":\"state\"}\n\nevent: ejected\r\ndata: {}\r\n\r\n";
        let whole = Sse::default().feed(stream);
        let want = [
            Message::Comment("events as they happen".into()),
            event("state", "{\"kind\":\"state\"}"),
            event("ejected", "{}"),
        ];
        assert_eq!(whole, want);
        let mut sse = Sse::default();
        let bytewise: Vec<_> = stream.iter().flat_map(|b| sse.feed(&[*b])).collect();
        assert_eq!(bytewise, want);
    }

    #[test]
    fn an_unfinished_message_waits_for_its_blank_line() {
        let mut sse = Sse::default();
        assert_eq!(sse.feed(b"data: a\ndata: b\n"), []);
        assert_eq!(
            sse.feed(b"\n: missed 3 events\n\n"),
            [event("message", "a\nb"), Message::Comment("missed 3 events".into())]
        );
    }

    #[tokio::test]
    async fn an_admin_api_that_does_not_listen_is_a_connect_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin: HostPort = closed.local_addr().unwrap().to_string().parse().unwrap();
        drop(closed);
        let e = get(&admin, "/admin/endpoints", Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with("connecting: "), "{e}");
    }

    #[tokio::test]
    async fn reads_a_body_and_refuses_an_error_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin: HostPort = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            for answer in ["200 OK\r\nContent-Length: 2\r\n\r\n{}", "404 Not Found\r\nContent-Length: 0\r\n\r\n"] {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = [0; 1024];
                let _ = tcp.read(&mut head).await.unwrap();
                tcp.write_all(format!("HTTP/1.1 {answer}").as_bytes()).await.unwrap();
            }
        });
        assert_eq!(get(&admin, "/admin/endpoints", Duration::from_secs(5)).await, Ok("{}".to_owned()));
        let e = get(&admin, "/nope", Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e, "GET /nope: 404 Not Found");
    }
}
