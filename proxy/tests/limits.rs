//! The proxy's HTTP/2 front under hostile clients, in raw frames: the stream limit it
//! advertises is enforced, an oversized header list is refused without harming the
//! connection, and CONTINUATION and rapid-reset floods end the connection with bounded
//! work, and a client that stops answering is let go. After each, the proxy serves a
//! normal call. Each runs against the h2 front
//! (`mod h2`) and the frame relay (`mod relay`).

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{Cluster, Path};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK's integer with an `n`-bit prefix, the prefix's other bits zero.
fn int(out: &mut Vec<u8>, mut v: usize, n: u32) {
    let max = (1 << n) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literals without indexing, new names: no dynamic table involved.
fn block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0);
        int(&mut out, name.len(), 7);
        out.extend_from_slice(name.as_bytes());
        int(&mut out, value.len(), 7);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn say_hello(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut h = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/hello.HelloService/SayHello"),
        (":authority", "proxy"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    h.extend_from_slice(extra);
    block(&h)
}

/// A gRPC message carrying HelloRequest { name }.
fn message(name: &str) -> Vec<u8> {
    let mut pb = vec![0x0a, name.len() as u8];
    pb.extend_from_slice(name.as_bytes());
    let mut m = vec![0];
    m.extend_from_slice(&(pb.len() as u32).to_be_bytes());
    m.extend_from_slice(&pb);
    m
}

/// A raw HTTP/2 client connection.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// One frame read: type, flags, stream and payload.
type Frame = (u8, u8, u32, Vec<u8>);

impl Raw {
    async fn open(proxy: SocketAddr) -> Raw {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        tcp.write_all(&hello).await.unwrap();
        Raw { tcp, buf: Vec::new() }
    }

    /// The next frame, or `None` once the proxy closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (self.buf[0] as usize) << 16 | (self.buf[1] as usize) << 8 | self.buf[2] as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut chunk = [0; 16384];
            match tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("the proxy said nothing for 10 s"),
            }
        }
    }

    /// Frames until one matches, acknowledging the proxy's SETTINGS on the way.
    async fn until(&mut self, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
        while let Some(f) = self.next().await {
            if f.0 == SETTINGS && f.1 & 1 == 0 {
                let _ = self.tcp.write_all(&frame(SETTINGS, 1, 0, &[])).await;
            }
            if want(&f) {
                return Some(f);
            }
        }
        None
    }
}

fn error_code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(payload[at..at + 4].try_into().unwrap())
}

/// A normal call on a new connection is answered by the replica.
async fn still_serves(c: &Cluster) {
    let (counts, failures) = support::tally(&mut c.client().await, 5).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.values().sum::<usize>(), 5);
}

/// Waits until `done`, for 5 s at most.
async fn within_5s(done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !done() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cluster(path: Path) -> Cluster {
    let c = Cluster::start(path, &[("s1", "node-a")], &[]).await;
    c.wait_for(&["s1"]).await;
    c
}

// Against the h2 front and against the frame relay.
on_h2_and_relay! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_beyond_the_advertised_limit_are_refused() {
        let c = cluster(PATH).await;
        let mut raw = Raw::open(c.proxy).await;
        let settings = raw.until(|f| f.0 == SETTINGS && f.1 & 1 == 0).await.expect("the proxy's SETTINGS");
        let limit = settings.3.chunks(6).find(|s| s[..2] == [0, 3]).map(|s| error_code(s, 2)).expect("a stream limit");
        assert_eq!(limit, 200);
        // `limit` calls left open (no END_STREAM), then one more.
        let mut burst = Vec::new();
        for i in 0..=limit {
            burst.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &say_hello(&[])));
        }
        raw.tcp.write_all(&burst).await.unwrap();
        let over = 2 * limit + 1;
        let reset = raw.until(|f| f.0 == RST_STREAM || f.0 == GOAWAY).await.expect("a reset");
        assert_eq!((reset.0, reset.2, error_code(&reset.3, 0)), (RST_STREAM, over, REFUSED_STREAM));
        // The open ones still complete.
        raw.tcp.write_all(&frame(DATA, END_STREAM, 1, &message("raw"))).await.unwrap();
        let answer = raw.until(|f| f.0 == DATA && f.2 == 1).await.expect("stream 1 answered");
        assert!(String::from_utf8_lossy(&answer.3).contains("Hello, raw!"), "{answer:?}");
        still_serves(&c).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_header_list_is_refused_and_the_connection_serves_on() {
        let c = cluster(PATH).await;
        let mut raw = Raw::open(c.proxy).await;
        let big = "x".repeat(20_000);
        let mut block = say_hello(&[("x-big", &big)]);
        // Over two frames: the default maximum frame size is 16 KiB.
        let rest = block.split_off(16_000);
        raw.tcp.write_all(&frame(HEADERS, 0, 1, &block)).await.unwrap();
        raw.tcp.write_all(&frame(CONTINUATION, END_HEADERS, 1, &rest)).await.unwrap();
        let refused = raw.until(|f| f.2 == 1 && (f.0 == HEADERS || f.0 == RST_STREAM)).await.expect("an answer");
        if refused.0 == HEADERS {
            // A final answer from the front itself (h2's 431), not a gRPC response: ended
            // at once, and not `:status: 200` (static table entry 8, 0x88).
            assert!(refused.1 & END_STREAM != 0 && refused.3[0] != 0x88, "{refused:?}");
        }
        let mut call = frame(HEADERS, END_HEADERS, 3, &say_hello(&[]));
        call.extend(frame(DATA, END_STREAM, 3, &message("after")));
        raw.tcp.write_all(&call).await.unwrap();
        let answer = raw.until(|f| f.0 == DATA && f.2 == 3).await.expect("stream 3 answered on the same connection");
        assert!(String::from_utf8_lossy(&answer.3).contains("Hello, after!"), "{answer:?}");
        still_serves(&c).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_continuation_flood_ends_the_connection_early() {
        let c = cluster(PATH).await;
        let mut raw = Raw::open(c.proxy).await;
        raw.tcp.write_all(&frame(HEADERS, 0, 1, &say_hello(&[]))).await.unwrap();
        // Header fields without end, 16 KiB a frame: up to 64 MiB if nobody stops it.
        let junk = block(&[("x-flood", &"y".repeat(16_000))]);
        let mut sent = 0usize;
        let mut closed = false;
        while sent < 64 << 20 {
            if raw.tcp.write_all(&frame(CONTINUATION, 0, 1, &junk)).await.is_err() {
                closed = true;
                break;
            }
            sent += junk.len();
        }
        println!("the proxy closed after {sent} bytes of one header block");
        assert!(closed, "the proxy took 64 MiB of one header block");
        // What the sockets' buffers hold, at most, beyond what the proxy read.
        assert!(sent < 8 << 20, "the proxy took {sent} bytes of one header block before closing");
        still_serves(&c).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rapid_reset_flood_is_calmed() {
        let c = cluster(PATH).await;
        let mut raw = Raw::open(c.proxy).await;
        let mut burst = Vec::new();
        for i in 0..2000u32 {
            burst.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &say_hello(&[])));
            burst.extend(frame(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes())); // CANCEL
        }
        let _ = raw.tcp.write_all(&burst).await; // the proxy may close before reading all
        let goaway = raw.until(|f| f.0 == GOAWAY).await.expect("a GOAWAY");
        assert_eq!(error_code(&goaway.3, 4), ENHANCE_YOUR_CALM, "{goaway:?}");
        still_serves(&c).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_answering_is_let_go_and_its_call_cancelled() {
        let c = Cluster::start(PATH, &[("s1", "node-a")], &["--client-keepalive", "200ms"]).await;
        c.wait_for(&["s1"]).await;
        let mut raw = Raw::open(c.proxy).await;
        raw.until(|f| f.0 == SETTINGS && f.1 & 1 == 0).await.expect("the proxy's SETTINGS");
        let collect = block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/echo.Echo/Collect"),
            (":authority", "proxy"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        raw.tcp.write_all(&frame(HEADERS, END_HEADERS, 1, &collect)).await.unwrap();
        // From here on the client reads but never writes: it answers no ping.
        let echo = c.replica("s1").echo.clone();
        within_5s(|| echo.calls() >= 1).await;
        assert_eq!(echo.calls(), 1, "the call reached the replica");
        raw.until(|f| f.0 == PING && f.1 & 1 == 0).await.expect("a ping");
        let pinged = Instant::now();
        assert!(raw.until(|_| false).await.is_none(), "the proxy closes the connection");
        println!("let go {:?} after its ping", pinged.elapsed());
        // Twice the keepalive past the ping (the h2 path checks on its 200 ms ticks).
        assert!(pinged.elapsed() >= Duration::from_millis(350), "let go too soon: {:?}", pinged.elapsed());
        within_5s(|| echo.cancelled() >= 1).await;
        assert_eq!(echo.cancelled(), 1, "its call was cancelled at the replica");
        still_serves(&c).await;
    }
}
