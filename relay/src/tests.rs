//! The relay driven by hand-made frames: exact sequences in, frames out.

use std::{cell::RefCell, net::SocketAddr, rc::Rc};

use bytes::BytesMut;
use loona_hpack::{Decoder, Encoder};

use lb_core::retry::{HedgingPolicy, policy::CodeSet};

use super::*;

mod fuzz;
use frame::{CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM, SETTINGS, WINDOW_UPDATE};

type Log = Rc<RefCell<Vec<(SocketAddr, Outcome)>>>;

/// Picks replicas in turn, skipping those to avoid while another is left.
struct Turns {
    replicas: Vec<SocketAddr>,
    next: usize,
    log: Log,
    serving: bool,
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    /// How long a call finding no replica waits for one (`None`: fails at once).
    wait: Option<Duration>,
    hedging: Option<HedgingPolicy>,
    /// What each pick was told: the replicas to avoid and the retries so far.
    asked: Vec<(Vec<SocketAddr>, u32)>,
    /// Each call as it ended: the status the client heard, and its counts.
    calls: RefCell<Vec<(u8, Stats)>>,
    /// And its path.
    told: RefCell<Vec<String>>,
    throttle: Option<Throttle>,
    /// A local replica is connecting, for this long more: calls that may wait for it
    /// are told so rather than given one of `replicas`.
    local_soon: Option<Duration>,
}

struct Logged(SocketAddr, Log);

impl Attempt for Logged {
    fn ended(self, _path: &str, outcome: Outcome) {
        self.1.borrow_mut().push((self.0, outcome));
    }
}

impl Picker for Turns {
    type Attempt = Logged;
    fn pick(&mut self, _path: &str, avoid: &[SocketAddr], retries: u32, may_wait: bool) -> Pick<Logged> {
        self.asked.push((avoid.to_vec(), retries));
        if may_wait && let Some(grace) = self.local_soon {
            return Pick::LocalSoon(grace);
        }
        let n = self.replicas.len();
        let fresh = (0..n).map(|i| self.replicas[(self.next + i) % n]).find(|a| !avoid.contains(a));
        let Some(addr) = fresh.or_else(|| self.replicas.get(self.next % n.max(1)).copied()) else {
            return Pick::NoneReady;
        };
        self.next += 1;
        Pick::Replica(addr, Logged(addr, self.log.clone()))
    }
    fn serving(&self) -> bool {
        self.serving
    }
    fn retry_policy(&self, _path: &str) -> Option<RetryPolicy> {
        self.retry.clone()
    }
    fn method_timeout(&self, _path: &str) -> Option<Duration> {
        self.timeout
    }
    fn ready_wait(&self, _path: &str) -> Option<Duration> {
        self.wait
    }
    fn hedging_policy(&self, _path: &str) -> Option<HedgingPolicy> {
        self.hedging.clone()
    }
    fn unavailable(&self, waited: Duration) -> String {
        format!("no ready replica after {waited:?}")
    }
    fn throttle(&self) -> Option<&Throttle> {
        self.throttle.as_ref()
    }
    fn call_ended(&self, path: &str, code: u8, stats: &Stats, _took: Duration) {
        self.calls.borrow_mut().push((code, *stats));
        self.told.borrow_mut().push(path.to_owned());
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 50051))
}

fn relay(replicas: &[u8]) -> (Relay<Turns>, Log) {
    let log = Log::default();
    let replicas = replicas.iter().map(|&i| addr(i)).collect();
    let picker = Turns {
        replicas,
        next: 0,
        log: log.clone(),
        serving: true,
        retry: None,
        timeout: None,
        wait: None,
        hedging: None,
        asked: Vec::new(),
        calls: RefCell::default(),
        told: RefCell::default(),
        throttle: None,
        local_soon: None,
    };
    (Relay::new(picker, Limits::default(), 7), log)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct F {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Every whole frame in `out`, taken out of it.
fn frames(out: &mut BytesMut) -> Vec<F> {
    let mut v = Vec::new();
    if out.starts_with(frame::PREFACE) {
        out.advance(frame::PREFACE.len());
    }
    while let Some(h) = Head::parse(out) {
        let f = out.split_to(frame::HEADER_LEN + h.len);
        v.push(F { kind: h.kind, flags: h.flags, stream: h.stream, payload: f[frame::HEADER_LEN..].to_vec() });
    }
    v
}

/// Frames of interest: no SETTINGS, acks or connection window updates.
fn calls(out: &mut BytesMut) -> Vec<F> {
    frames(out).into_iter().filter(|f| f.kind != SETTINGS && !(f.kind == WINDOW_UPDATE && f.stream == 0)).collect()
}

fn put(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    frame::put(out, kind, flags, stream, payload);
}

fn request(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [(":method", "POST"), (":scheme", "http"), (":path", path), ("content-type", "application/grpc")] {
        hpack::encode(n.as_bytes(), v.as_bytes(), &mut b);
    }
    b
}

fn response_headers() -> Vec<u8> {
    let mut b = Vec::new();
    hpack::encode(b":status", b"200", &mut b);
    hpack::encode(b"content-type", b"application/grpc", &mut b);
    b
}

fn trailers(code: &str) -> Vec<u8> {
    let mut b = Vec::new();
    hpack::encode(b"grpc-status", code.as_bytes(), &mut b);
    b
}

fn decode(block: &[u8]) -> Vec<(String, String)> {
    Decoder::new()
        .decode(block)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
        .collect()
}

fn header<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A client that sent its preface and SETTINGS, and one call on `stream`.
fn client_calls(r: &mut Relay<Turns>, streams: &[u32], body: &[u8]) {
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    for &id in streams {
        put(&mut buf, HEADERS, END_HEADERS, id, &request("/hello.HelloService/SayHello"));
        put(&mut buf, DATA, END_STREAM, id, body);
    }
    r.client_read(&mut buf);
    assert!(buf.is_empty());
}

/// The back at `slot`'s output, as frames.
/// A client's first call, on stream 1 to `path`: one message of 96 KiB (its 5-byte
/// prefix included) in six DATA frames, the stream left open. Returns the message.
fn send_96_kib(r: &mut Relay<Turns>, path: &str) -> Vec<u8> {
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request(path));
    let mut message = vec![7; 6 * 16_384];
    message[..5].copy_from_slice(&[0, 0, 1, 0x7f, 0xfb]);
    for chunk in message.chunks(16_384) {
        put(&mut buf, DATA, 0, 1, chunk);
    }
    r.client_read(&mut buf);
    message
}

fn back_frames(r: &mut Relay<Turns>, slot: u64) -> Vec<F> {
    calls(r.back_out(slot).expect("a live back"))
}

/// A replica's answer on its stream `up`: headers, one message, status.
fn answer(r: &mut Relay<Turns>, slot: u64, up: u32, message: &[u8], code: &str) {
    let mut buf = BytesMut::new();
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, up, &response_headers());
    put(&mut buf, DATA, 0, up, message);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, up, &trailers(code));
    r.back_read(slot, &mut buf);
}

/// The `grpc-status` of the last header block the client was sent since the last call.
fn status_heard(r: &mut Relay<Turns>) -> Option<String> {
    let got = calls(r.client_out());
    let last = got.iter().rev().find(|f| f.kind == HEADERS)?;
    header(&decode(&last.payload), "grpc-status").map(str::to_owned)
}

#[test]
fn a_unary_call_goes_through_with_its_stream_ids_rewritten() {
    let (mut r, log) = relay(&[1]);
    client_calls(&mut r, &[5], b"\0\0\0\0\x02hi");
    let live: Vec<_> = r.backs().map(|b| (b.id, b.addr)).collect();
    assert_eq!(live, vec![(0, addr(1))]);
    assert!(r.back_out(0).unwrap().starts_with(frame::PREFACE));
    let sent = back_frames(&mut r, 0);
    assert_eq!(
        sent.iter().map(|f| (f.kind, f.flags, f.stream)).collect::<Vec<_>>(),
        vec![(HEADERS, END_HEADERS, 1), (DATA, END_STREAM, 1)]
    );
    assert_eq!(header(&decode(&sent[0].payload), ":path"), Some("/hello.HelloService/SayHello"));
    assert_eq!(sent[1].payload, b"\0\0\0\0\x02hi");
    answer(&mut r, 0, 1, b"\0\0\0\0\x02yo", "0");
    let got = calls(r.client_out());
    assert_eq!(
        got.iter().map(|f| (f.kind, f.flags, f.stream)).collect::<Vec<_>>(),
        vec![(HEADERS, END_HEADERS, 5), (DATA, 0, 5), (HEADERS, END_HEADERS | END_STREAM, 5)]
    );
    assert_eq!(header(&decode(&got[2].payload), "grpc-status"), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn calls_take_turns_and_share_one_connection_per_replica() {
    let (mut r, _) = relay(&[1, 2]);
    client_calls(&mut r, &[1, 3, 5], b"\0\0\0\0\0");
    let addrs: Vec<_> = r.backs().map(|b| b.addr).collect();
    assert_eq!(addrs, vec![addr(1), addr(2)]);
    let ids = |f: Vec<F>| f.iter().filter(|f| f.kind == HEADERS).map(|f| f.stream).collect::<Vec<_>>();
    assert_eq!(ids(back_frames(&mut r, 0)), vec![1, 3]);
    assert_eq!(ids(back_frames(&mut r, 1)), vec![1]);
}

#[test]
fn a_refused_stream_goes_to_another_replica_with_its_request() {
    let (mut r, log) = relay(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    back_frames(&mut r, 0);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::RefusedStream);
    r.back_read(0, &mut buf);
    let again = back_frames(&mut r, 1);
    assert_eq!(
        again.iter().map(|f| (f.kind, f.flags)).collect::<Vec<_>>(),
        vec![(HEADERS, END_HEADERS), (DATA, END_STREAM)]
    );
    assert_eq!(again[1].payload, b"\0\0\0\0\x01x");
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Refused), (addr(2), Outcome::Status(0))]);
    assert!(calls(r.client_out()).iter().all(|f| f.kind != RST_STREAM));
}

#[test]
fn streams_above_a_goaway_go_elsewhere_and_those_below_finish() {
    let (mut r, log) = relay(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    // Both later calls on replica 1's connection: replica 2 is not ready.
    r.picker.replicas = vec![addr(1)];
    client_calls_more(&mut r, &[3, 5]);
    r.picker.replicas = vec![addr(1), addr(2)];
    back_frames(&mut r, 0);
    let mut buf = BytesMut::new();
    frame::put_goaway(&mut buf, 1, Reason::NoError);
    r.back_read(0, &mut buf);
    let moved: Vec<_> = back_frames(&mut r, 1).iter().filter(|f| f.kind == HEADERS).map(|f| f.stream).collect();
    assert_eq!(moved, vec![1, 3], "client streams 3 and 5, as streams 1 and 3 on replica 2");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert!(r.backs().all(|b| b.id != 0), "the closing connection is let go once empty");
    assert_eq!(log.borrow()[..2], [(addr(1), Outcome::Refused), (addr(1), Outcome::Refused)]);
    assert_eq!(log.borrow()[2], (addr(1), Outcome::Status(0)));
}

fn client_calls_more(r: &mut Relay<Turns>, streams: &[u32]) {
    let mut buf = BytesMut::new();
    for &id in streams {
        put(&mut buf, HEADERS, END_HEADERS, id, &request("/hello.HelloService/SayHello"));
        put(&mut buf, DATA, END_STREAM, id, b"\0\0\0\0\0");
    }
    r.client_read(&mut buf);
}

#[test]
fn a_connection_never_made_sends_its_calls_elsewhere_and_one_lost_fails_them() {
    let (mut r, log) = relay(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.back_lost(0);
    assert!(back_frames(&mut r, 1).iter().any(|f| f.kind == HEADERS));
    r.back_connected(1);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, DATA, 0, 1, b"\0\0\0\0\0");
    r.back_read(1, &mut buf);
    r.back_lost(1);
    let got = calls(r.client_out());
    let last = got.last().unwrap();
    assert_eq!((last.kind, last.flags & END_STREAM), (HEADERS, END_STREAM));
    assert_eq!(header(&decode(&last.payload), "grpc-status"), Some("14"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Refused), (addr(2), Outcome::Lost)]);
}

#[test]
fn no_ready_replica_is_unavailable_at_once() {
    let (mut r, _) = relay(&[]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    let got = calls(r.client_out());
    assert_eq!((got[0].kind, got[0].flags & END_STREAM), (HEADERS, END_STREAM));
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("14"));
}

#[test]
fn a_call_finding_no_ready_replica_waits_for_one_and_goes_out_when_one_is() {
    let (mut r, log) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    assert!(calls(r.client_out()).is_empty(), "no status while it waits");
    assert_eq!(r.next_timer(), Some(Duration::from_secs(1)));
    r.tick(Duration::from_millis(400));
    r.ready_changed();
    assert!(calls(r.client_out()).is_empty(), "still none ready: still waiting");
    r.picker.replicas = vec![addr(1)];
    r.ready_changed();
    let sent = back_frames(&mut r, 0);
    assert_eq!(
        sent.iter().map(|f| (f.kind, f.flags & END_STREAM)).collect::<Vec<_>>(),
        [(HEADERS, 0), (DATA, END_STREAM)]
    );
    assert_eq!(sent[1].payload, b"\0\0\0\0\0", "the request it held");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
    r.tick(Duration::from_secs(2));
    assert!(calls(r.client_out()).is_empty(), "its wait's end, come after it went out, changes nothing");
}

/// Call 1 was just sent whole to replica `i`, which answers OK: the client hears it, and
/// the attempt ends there.
fn goes_out_and_succeeds_on(r: &mut Relay<Turns>, log: &Log, i: u8, why: &str) {
    assert_eq!(back_frames(r, 0).len(), 2, "{why}");
    answer(r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(i), Outcome::Status(0))]);
}

/// A relay whose picker has `replicas` ready but a local one connecting for `grace_ms`
/// more, with call 1 made (waiting up to `wait_ms` for a replica).
fn waiting_for_local(replicas: &[u8], wait_ms: u64, grace_ms: u64) -> (Relay<Turns>, Log) {
    let (mut r, log) = relay(replicas);
    r.picker.wait = Some(Duration::from_millis(wait_ms));
    r.picker.local_soon = Some(Duration::from_millis(grace_ms));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    (r, log)
}

#[test]
fn a_call_waits_for_a_connecting_local_replica_and_goes_to_another_node_when_its_time_is_up() {
    let (mut r, log) = waiting_for_local(&[2], 5000, 500);
    assert!(r.backs().next().is_none(), "not sent to the other node while the local replica connects");
    assert_eq!(r.next_timer(), Some(Duration::from_millis(500)), "asks again when the local replica's time is up");
    r.tick(Duration::from_millis(499));
    assert!(r.backs().next().is_none());
    r.picker.local_soon = None; // the balancer's grace is over
    r.tick(Duration::from_millis(500));
    let sent = back_frames(&mut r, 0);
    assert_eq!(sent.iter().map(|f| f.kind).collect::<Vec<_>>(), [HEADERS, DATA], "sent to the other node");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(2), Outcome::Status(0))]);
    assert!(!r.is_waiting());
}

#[test]
fn a_call_waiting_for_a_connecting_local_replica_goes_to_it_once_it_is_ready() {
    let (mut r, log) = waiting_for_local(&[2], 5000, 500);
    r.tick(Duration::from_millis(200));
    r.picker.local_soon = None;
    r.picker.replicas = vec![addr(1), addr(2)];
    r.ready_changed();
    assert_eq!(back_frames(&mut r, 0).len(), 2, "sent as the local replica is ready");
    assert_eq!(r.backs().map(|b| b.addr).collect::<Vec<_>>(), [addr(1)]);
    r.tick(Duration::from_millis(500));
    assert_eq!(r.backs().count(), 1, "the local replica's time running out sends nothing more");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
}

#[test]
fn a_call_that_may_not_wait_goes_to_another_node_at_once_while_a_local_replica_connects() {
    let (mut r, log) = relay(&[2]);
    r.picker.local_soon = Some(Duration::from_millis(500)); // and `wait` is None
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    goes_out_and_succeeds_on(&mut r, &log, 2, "sent at once");
}

#[test]
fn a_call_whose_wait_ends_before_a_connecting_local_replicas_time_fails_then() {
    let (mut r, log) = waiting_for_local(&[2], 300, 500);
    r.tick(Duration::from_millis(299));
    assert!(calls(r.client_out()).is_empty());
    r.tick(Duration::from_millis(300));
    assert_eq!(status_heard(&mut r).as_deref(), Some("14"), "as the h2 stack's waiting pick ends");
    assert!(log.borrow().is_empty());
    assert!(!r.is_waiting());
}

#[test]
fn a_call_told_its_local_replicas_time_is_all_but_up_goes_to_another_node_at_once() {
    let (mut r, log) = waiting_for_local(&[2], 5000, 0);
    goes_out_and_succeeds_on(&mut r, &log, 2, "sent without waiting");
}

#[test]
fn a_call_asked_again_late_and_told_its_local_replicas_time_is_all_but_up_is_sent() {
    let (mut r, log) = waiting_for_local(&[2], 5000, 100);
    // Its timer comes due while the balancer's grace has a moment left; then it ends.
    r.picker.local_soon = Some(Duration::from_millis(1));
    r.tick(Duration::from_millis(100));
    assert_eq!(r.next_timer(), Some(Duration::from_millis(101)), "asked again when that moment is up");
    r.picker.local_soon = None;
    r.tick(Duration::from_millis(101));
    goes_out_and_succeeds_on(&mut r, &log, 2, "sent to the other node, not left waiting");
}

#[test]
fn a_call_whose_local_replicas_time_ran_out_often_is_asked_for_once_per_endpoint_change() {
    let (mut r, _) = waiting_for_local(&[], 5000, 100);
    for i in 1..=10 {
        r.tick(Duration::from_millis(100 * i));
    }
    for _ in 0..2 {
        let before = r.picker.asked.len();
        r.ready_changed();
        assert_eq!(r.picker.asked.len() - before, 1, "one pick for the one waiting call");
    }
}

#[test]
fn a_call_finding_none_ready_once_its_local_replicas_time_is_up_waits_on_to_its_own_end() {
    let (mut r, log) = waiting_for_local(&[], 1000, 500);
    r.picker.local_soon = None;
    r.tick(Duration::from_millis(500));
    assert!(r.is_waiting());
    assert_eq!(r.next_timer(), Some(Duration::from_secs(1)));
    r.tick(Duration::from_millis(999));
    assert!(calls(r.client_out()).is_empty());
    r.tick(Duration::from_secs(1));
    let got = calls(r.client_out());
    let status = decode(&got[0].payload);
    assert_eq!(header(&status, "grpc-status"), Some("14"));
    assert_eq!(header(&status, "grpc-message"), Some("no ready replica after 1s"), "counted from when it began");
    assert!(log.borrow().is_empty());
    assert!(!r.is_waiting());
}

#[test]
fn a_call_whose_deadline_comes_within_its_local_replicas_time_is_deadline_exceeded() {
    let (mut r, log) = relay(&[2]);
    r.picker.wait = Some(Duration::from_secs(5));
    r.picker.local_soon = Some(Duration::from_millis(500));
    call_with_timeout(&mut r, 1, "200m");
    r.tick(Duration::from_millis(200));
    assert_eq!(status_heard(&mut r).as_deref(), Some("4"));
    assert!(log.borrow().is_empty());
    assert!(!r.is_waiting());
    r.picker.local_soon = None;
    r.tick(Duration::from_millis(500));
    assert!(r.backs().next().is_none(), "its grace's end sends nothing");
}

#[test]
fn a_hedge_does_not_wait_for_a_connecting_local_replica() {
    let (mut r, _) = hedging(&[1, 2], 2);
    r.picker.wait = Some(Duration::from_secs(5));
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    assert_eq!(back_frames(&mut r, 0).len(), 2);
    r.picker.local_soon = Some(Duration::from_millis(500));
    r.tick(Duration::from_millis(50));
    assert_eq!(back_frames(&mut r, 1).len(), 2, "the hedge goes at its delay");
}

#[test]
fn a_call_waiting_without_a_deadline_fails_unavailable_when_its_wait_ends() {
    let (mut r, log) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    r.tick(Duration::from_secs(3));
    client_calls(&mut r, &[1, 3], b"\0\0\0\0\0");
    // Endpoints change with none ready (a dead replica's reconnects): the wait goes on
    // from when it began.
    r.tick(Duration::from_millis(3500));
    r.ready_changed();
    r.tick(Duration::from_millis(3999));
    assert!(calls(r.client_out()).is_empty());
    r.tick(Duration::from_secs(4));
    let got = calls(r.client_out());
    let ended: Vec<_> = got.iter().filter(|f| f.kind == HEADERS).map(|f| (f.stream, decode(&f.payload))).collect();
    assert_eq!(ended.len(), 2, "both calls: {got:?}");
    for (_, status) in &ended {
        assert_eq!(header(status, "grpc-status"), Some("14"));
        assert_eq!(header(status, "grpc-message"), Some("no ready replica after 1s"));
    }
    assert!(log.borrow().is_empty(), "no replica heard of them");
    assert_eq!(r.open_calls(), 0);
    assert!(!r.is_waiting(), "nothing left to wait for");
}

#[test]
fn a_waiting_call_the_client_resets_waits_no_more() {
    let (mut r, log) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    assert!(r.is_waiting());
    let mut buf = BytesMut::new();
    put(&mut buf, RST_STREAM, 0, 1, &8u32.to_be_bytes());
    r.client_read(&mut buf);
    assert!(!r.is_waiting(), "the shell stops watching the endpoints");
    r.picker.replicas = vec![addr(1)];
    r.ready_changed();
    assert!(r.backs().next().is_none(), "nothing placed");
    r.tick(Duration::from_secs(2));
    assert!(calls(r.client_out()).is_empty(), "no status for a call the client reset");
    assert!(log.borrow().is_empty());
}

#[test]
fn a_waiting_call_with_a_deadline_waits_until_it() {
    let (mut r, _) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    call_with_timeout(&mut r, 1, "3S");
    r.tick(Duration::from_millis(2999));
    assert!(calls(r.client_out()).is_empty(), "the deadline, not the wait without one, bounds it");
    r.tick(Duration::from_secs(3));
    let got = calls(r.client_out());
    assert_eq!(got.iter().filter(|f| f.kind == HEADERS).count(), 1, "one answer: {got:?}");
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_waiting_call_whose_request_outgrows_the_replay_buffer_still_goes_out_once() {
    let (mut r, log) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    // Past the 64 KiB kept for replays.
    let message = send_96_kib(&mut r, "/echo.Echo/Upload");
    assert!(calls(r.client_out()).is_empty(), "still waiting");
    r.picker.replicas = vec![addr(1)];
    r.ready_changed();
    assert!(calls(r.client_out()).is_empty(), "not failed: it was never sent, and all of it is held");
    let sent = back_frames(&mut r, 0);
    assert_eq!(sent[0].kind, HEADERS);
    let data: Vec<u8> = sent.iter().filter(|f| f.kind == DATA).flat_map(|f| f.payload.clone()).collect();
    assert_eq!(data, message[..frame::DEFAULT_WINDOW as usize], "as much as the replica's first window takes");
    // Sent once, it cannot be sent again: a lost connection now fails the call.
    r.back_lost(0);
    let got = calls(r.client_out());
    let status = got.iter().find(|f| f.kind == HEADERS).expect("a status");
    assert_eq!(header(&decode(&status.payload), "grpc-status"), Some("14"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Lost)]);
}

#[test]
fn request_bytes_wait_for_the_replica_window_and_are_credited_only_once_sent() {
    let (mut r, _) = relay(&[1]);
    send_96_kib(&mut r, "/echo.Echo/Stream");
    calls(r.client_out());
    let sent: usize = back_frames(&mut r, 0).iter().filter(|f| f.kind == DATA).map(|f| f.payload.len()).sum();
    assert_eq!(sent, 65_535, "the replica's default window");
    let mut buf = BytesMut::new();
    frame::put_window_update(&mut buf, 1, 100_000);
    frame::put_window_update(&mut buf, 0, 100_000);
    r.back_read(0, &mut buf);
    let sent: usize = back_frames(&mut r, 0).iter().filter(|f| f.kind == DATA).map(|f| f.payload.len()).sum();
    assert_eq!(sent, 6 * 16_384 - 65_535);
    // 96 KiB forwarded of a 1 MiB stream window: no stream credit yet (half a window).
    assert!(calls(r.client_out()).is_empty());
}

/// A client whose streams take 10 bytes at a time calls `/a/b` on stream 1 (`end`:
/// END_STREAM, or 0 to send more).
fn narrow_client_calls(r: &mut Relay<Turns>, end: u8) {
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10)]);
    put(&mut buf, HEADERS, END_HEADERS | end, 1, &request("/a/b"));
    r.client_read(&mut buf);
}

#[test]
fn a_response_waits_for_the_client_window_and_trailers_follow_it() {
    let (mut r, log) = relay(&[1]);
    narrow_client_calls(&mut r, END_STREAM);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, DATA, 0, 1, &[1; 25]);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &trailers("0"));
    r.back_read(0, &mut buf);
    let shape = |f: Vec<F>| f.iter().map(|f| (f.kind, f.flags, f.payload.len())).collect::<Vec<_>>();
    assert_eq!(shape(calls(r.client_out())), vec![(HEADERS, END_HEADERS, 20), (DATA, 0, 10)]);
    let mut buf = BytesMut::new();
    frame::put_window_update(&mut buf, 1, 100);
    r.client_read(&mut buf);
    let rest = shape(calls(r.client_out()));
    assert_eq!(rest[0], (DATA, 0, 15));
    assert_eq!((rest[1].0, rest[1].1), (HEADERS, END_HEADERS | END_STREAM));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
}

#[test]
fn a_header_block_naming_dynamic_entries_is_encoded_again_with_the_same_headers() {
    let (mut r, _) = relay(&[1]);
    let mut enc = Encoder::new();
    let headers: Vec<(&[u8], &[u8])> =
        vec![(b":method", b"POST"), (b":path", b"/a/b"), (b"x-key", b"value"), (b":scheme", b"http")];
    let first = enc.encode(headers.iter().copied());
    let second = enc.encode(headers.iter().copied());
    assert!(second.len() < first.len(), "the encoder used its table");
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &first);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 3, &second);
    r.client_read(&mut buf);
    let sent = back_frames(&mut r, 0);
    let want: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (String::from_utf8(n.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap()))
        .collect();
    // Each block stands alone: a fresh decoder reads both.
    assert_eq!(decode(&sent[0].payload), want);
    assert_eq!(decode(&sent[1].payload), want);
}

#[test]
fn a_client_cannot_grow_the_relays_header_table() {
    let (mut r, _) = relay(&[1]);
    let mut block = vec![0x3f, 0xe1, 0xff, 0x03]; // a table size update to 65,536
    block.extend(request("/a/b"));
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &block);
    r.client_read(&mut buf);
    assert!(r.is_done());
    let goaway = frames(r.client_out()).into_iter().find(|f| f.kind == GOAWAY).unwrap();
    assert_eq!(frame::u32_at(&goaway.payload, 4), Some(Reason::Compression as u32));
}

#[test]
fn the_stream_limit_refuses_the_next_stream() {
    let (mut r, _) = relay(&[1]);
    let ids: Vec<u32> = (0..=200).map(|i| 2 * i + 1).collect();
    let mut buf = BytesMut::from(frame::PREFACE);
    for &id in &ids {
        put(&mut buf, HEADERS, END_HEADERS, id, &request("/a/b"));
    }
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].kind, got[0].stream, got[0].payload.clone()), (RST_STREAM, 401, 7u32.to_be_bytes().to_vec()));
    assert_eq!(r.open_calls(), 200);
}

#[test]
fn an_oversized_header_list_is_answered_431_and_the_connection_goes_on() {
    let (mut r, _) = relay(&[1]);
    let mut block = request("/a/b");
    hpack::encode(b"x-big", &[b'x'; 20_000], &mut block);
    let rest = block.split_off(16_000);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, 0, 1, &block);
    put(&mut buf, CONTINUATION, END_HEADERS | END_STREAM, 1, &rest);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 3, &request("/a/b"));
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!((got[0].kind, got[0].stream), (HEADERS, 1));
    assert_eq!(header(&decode(&got[0].payload), ":status"), Some("431"));
    assert!(back_frames(&mut r, 0).iter().any(|f| f.kind == HEADERS && f.stream == 1), "stream 3 went on");
    assert!(!r.is_done());
}

#[test]
fn a_continuation_flood_ends_the_connection() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, 0, 1, &request("/a/b"));
    r.client_read(&mut buf);
    let mut fed = 0;
    while !r.is_done() {
        let mut buf = BytesMut::new();
        put(&mut buf, CONTINUATION, 0, 1, &[0x40; 16_000]);
        r.client_read(&mut buf);
        fed += 16_000;
        assert!(fed < 1 << 20, "still reading one header block after {fed} bytes");
    }
    let goaway = frames(r.client_out()).into_iter().find(|f| f.kind == GOAWAY).unwrap();
    assert_eq!(frame::u32_at(&goaway.payload, 4), Some(Reason::EnhanceYourCalm as u32));
}

#[test]
fn a_rapid_reset_flood_is_calmed_and_cancels_reach_the_replica() {
    let (mut r, log) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    for i in 0..2000u32 {
        put(&mut buf, HEADERS, END_HEADERS, 2 * i + 1, &request("/a/b"));
        frame::put_rst(&mut buf, 2 * i + 1, Reason::Cancel);
    }
    r.client_read(&mut buf);
    assert!(r.is_done());
    let goaway = frames(r.client_out()).into_iter().find(|f| f.kind == GOAWAY).unwrap();
    assert_eq!(frame::u32_at(&goaway.payload, 4), Some(Reason::EnhanceYourCalm as u32));
    assert_eq!(log.borrow().len(), 1025);
    assert!(log.borrow().iter().all(|(_, o)| *o == Outcome::Cancelled));
    let resets = back_frames(&mut r, 0).iter().filter(|f| f.kind == RST_STREAM).count();
    assert_eq!(resets, 1025);
}

#[test]
fn garbage_instead_of_a_preface_ends_the_connection() {
    let (mut r, _) = relay(&[1]);
    r.client_read(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]));
    assert!(r.is_done());
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    buf.extend_from_slice(&[0xff, 0xff, 0xff, 0]);
    r.client_read(&mut buf);
    assert!(!r.is_done(), "part of a frame header waits for the rest");
    buf.extend_from_slice(&[0, 0, 0, 0, 0]);
    r.client_read(&mut buf);
    assert!(r.is_done(), "a 16 MiB frame is refused before it is read");
}

#[test]
fn a_message_over_the_limit_fails_the_call_and_resets_the_replica_stream() {
    let (mut r, log) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/a/b"));
    put(&mut buf, DATA, 0, 1, &[0, 0, 0x40, 0, 1]); // 4 MiB + 1
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("8"));
    assert_eq!((got[1].kind, got[1].stream), (RST_STREAM, 1), "the client is told to stop sending");
    assert_eq!(back_frames(&mut r, 0).last().map(|f| f.kind), Some(RST_STREAM));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled)]);
}

#[test]
fn health_checks_are_answered_by_the_relay() {
    for (serving, want) in [(true, 1u8), (false, 2)] {
        let (mut r, _) = relay(&[1]);
        r.picker.serving = serving;
        let mut buf = BytesMut::from(frame::PREFACE);
        put(&mut buf, HEADERS, END_HEADERS, 1, &request("/grpc.health.v1.Health/Check"));
        put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
        r.client_read(&mut buf);
        let got = calls(r.client_out());
        assert_eq!(got[1].payload, [0, 0, 0, 0, 2, 0x08, want]);
        assert_eq!(header(&decode(&got[2].payload), "grpc-status"), Some("0"));
        assert!(r.backs().next().is_none(), "no replica asked");
    }
}

#[test]
fn a_client_reset_cancels_the_replica_stream() {
    let (mut r, log) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/a/b"));
    frame::put_rst(&mut buf, 1, Reason::Cancel);
    r.client_read(&mut buf);
    let sent = back_frames(&mut r, 0);
    assert_eq!(
        sent.last().map(|f| (f.kind, f.stream, f.payload.clone())),
        Some((RST_STREAM, 1, 8u32.to_be_bytes().to_vec()))
    );
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled)]);
}

#[test]
fn a_drain_refuses_new_streams_and_ends_once_calls_finish() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &request("/a/b"));
    r.client_read(&mut buf);
    r.drain();
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 3, &request("/a/b"));
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!((got[0].kind, frame::u31(&got[0].payload, 0)), (GOAWAY, Some(1)));
    assert_eq!((got[1].kind, got[1].stream), (RST_STREAM, 3));
    assert!(!r.is_done());
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert!(r.is_done());
}

/// Retry UNAVAILABLE up to 3 attempts, backoff 10 ms (jittered below it).
fn retrying(replicas: &[u8]) -> (Relay<Turns>, Log) {
    let (mut r, log) = relay(replicas);
    let mut retryable = CodeSet::default();
    retryable.insert(Code::Unavailable);
    r.picker.retry = Some(RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
        multiplier: 1.0,
        retryable,
    });
    (r, log)
}

/// A trailers-only answer on the replica's stream `up`, with more fields.
fn refuse(r: &mut Relay<Turns>, slot: u64, up: u32, code: &str, more: &[(&str, &str)]) {
    let mut block = response_headers();
    hpack::encode(b"grpc-status", code.as_bytes(), &mut block);
    for (n, v) in more {
        hpack::encode(n.as_bytes(), v.as_bytes(), &mut block);
    }
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, up, &block);
    r.back_read(slot, &mut buf);
}

#[test]
fn a_retryable_status_is_sent_again_after_the_backoff_and_the_client_hears_only_the_last() {
    let (mut r, log) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    calls(r.client_out());
    back_frames(&mut r, 0);
    refuse(&mut r, 0, 1, "14", &[]);
    assert!(calls(r.client_out()).is_empty(), "the failed attempt is not passed on");
    let due = r.next_timer().expect("a backoff");
    assert!(due <= Duration::from_millis(10), "{due:?}");
    assert!(r.backs().all(|b| b.id != 1), "nothing sent before the backoff is over");
    r.tick(due);
    let again = back_frames(&mut r, 1);
    assert_eq!(
        again.iter().map(|f| (f.kind, f.flags)).collect::<Vec<_>>(),
        vec![(HEADERS, END_HEADERS), (DATA, END_STREAM)]
    );
    assert_eq!(header(&decode(&again[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    assert_eq!(again[1].payload, b"\0\0\0\0\x01x");
    assert_eq!(r.picker.asked[1], (vec![addr(1)], 1), "the second pick avoids the first replica");
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    assert_eq!(header(&decode(&got[2].payload), "grpc-status"), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14)), (addr(2), Outcome::Status(0))]);
}

#[test]
fn a_status_not_listed_or_after_the_last_attempt_reaches_the_client() {
    let (mut r, log) = retrying(&[1]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    refuse(&mut r, 0, 1, "13", &[]);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("13"), "INTERNAL is not retried");
    assert_eq!(r.next_timer(), None);

    client_calls_more(&mut r, &[3]);
    for (attempt, up) in [(1, 3), (2, 5), (3, 7)] {
        refuse(&mut r, 0, up, "14", &[]);
        if attempt < 3 {
            r.tick(r.next_timer().expect("a backoff"));
        }
    }
    let got = calls(r.client_out());
    assert_eq!(got.len(), 1, "{got:?}");
    let last = decode(&got[0].payload);
    assert_eq!(header(&last, "grpc-status"), Some("14"));
    assert_eq!(header(&last, "grpc-previous-rpc-attempts"), Some("2"), "3 attempts in all");
    let outcomes: Vec<Outcome> = log.borrow().iter().map(|(_, o)| *o).collect();
    assert_eq!(outcomes, [Outcome::Status(13), Outcome::Retried(14), Outcome::Retried(14), Outcome::Status(14)]);
}

#[test]
fn response_headers_commit_the_call_and_a_later_status_is_not_retried() {
    let (mut r, log) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &trailers("14"));
    r.back_read(0, &mut buf);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[1].payload), "grpc-status"), Some("14"));
    assert_eq!(r.next_timer(), None);
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(14))]);
}

#[test]
fn pushback_sets_the_delay_and_a_negative_one_stops_retries() {
    let (mut r, _) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_secs(1));
    refuse(&mut r, 0, 1, "14", &[("grpc-retry-pushback-ms", "250")]);
    assert_eq!(r.next_timer(), Some(Duration::from_millis(1250)), "exactly the pushback");
    r.tick(Duration::from_millis(1249));
    assert!(r.backs().all(|b| b.id != 1), "not before");
    r.tick(Duration::from_millis(1250));
    assert!(back_frames(&mut r, 1).iter().any(|f| f.kind == HEADERS));
    refuse(&mut r, 1, 1, "14", &[("grpc-retry-pushback-ms", "-1")]);
    assert_eq!(r.next_timer(), None);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("14"), "no retry after a negative pushback");
}

#[test]
fn a_connection_lost_before_any_response_is_retried_as_unavailable() {
    let (mut r, log) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.back_connected(0);
    r.back_lost(0);
    r.tick(r.next_timer().expect("a backoff"));
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[2].payload), "grpc-status"), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14)), (addr(2), Outcome::Status(0))]);
}

#[test]
fn a_call_cancelled_in_its_backoff_is_not_sent_again() {
    let (mut r, log) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    refuse(&mut r, 0, 1, "14", &[]);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::Cancel);
    r.client_read(&mut buf);
    r.tick(Duration::from_secs(1));
    assert!(r.backs().all(|b| b.id != 1), "no new attempt");
    assert_eq!(r.open_calls(), 0);
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14))]);
}

/// Connection-level credit the relay sent on its output, in all.
fn connection_credit(frames: &[F]) -> u32 {
    frames.iter().filter(|f| f.kind == WINDOW_UPDATE && f.stream == 0).map(|f| frame::u31(&f.payload, 0).unwrap()).sum()
}

#[test]
fn bytes_pending_when_a_call_ends_are_credited_back_to_the_connection() {
    let log = Log::default();
    let picker = Turns {
        replicas: vec![addr(1)],
        next: 0,
        log,
        serving: true,
        retry: None,
        timeout: None,
        wait: None,
        hedging: None,
        asked: Vec::new(),
        calls: RefCell::default(),
        told: RefCell::default(),
        throttle: None,
        local_soon: None,
    };
    // Connection credit goes out in steps of 10,000 bytes.
    let limits = Limits { conn_window: 20_000, ..Limits::default() };
    let mut r = Relay::new(picker, limits, 7);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/echo.Echo/Stream"));
    r.client_read(&mut buf);
    let mut buf = BytesMut::new();
    frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10_000)]);
    r.back_read(0, &mut buf);
    frames(r.client_out());
    // 60,000 request bytes; the replica's window takes 10,000 of them.
    let mut message = vec![7; 60_000];
    message[..5].copy_from_slice(&[0, 0, 0, 0xea, 0x5b]);
    let mut buf = BytesMut::new();
    for chunk in message.chunks(15_000) {
        put(&mut buf, DATA, 0, 1, chunk);
    }
    r.client_read(&mut buf);
    assert_eq!(connection_credit(&frames(r.client_out())), 10_000, "what went on is credited");
    // The replica fails the call: the 50,000 bytes still waiting are let go.
    refuse(&mut r, 0, 1, "13", &[]);
    assert_eq!(connection_credit(&frames(r.client_out())), 50_000, "and what never went on, once the call is over");
}

#[test]
fn a_reset_after_the_trailers_does_not_lose_the_response_still_queued() {
    let (mut r, log) = relay(&[1]);
    narrow_client_calls(&mut r, 0);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, DATA, 0, 1, &[1; 25]);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &trailers("0"));
    frame::put_rst(&mut buf, 1, Reason::NoError); // as grpc-go does while the client sends
    r.back_read(0, &mut buf);
    let mut buf = BytesMut::new();
    frame::put_window_update(&mut buf, 1, 100);
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert!(got.iter().all(|f| f.kind != RST_STREAM || f.payload == 0u32.to_be_bytes()), "{got:?}");
    let last = got.iter().rev().find(|f| f.kind == HEADERS).unwrap();
    assert_eq!(header(&decode(&last.payload), "grpc-status"), Some("0"));
    assert_eq!(got.iter().filter(|f| f.kind == DATA).map(|f| f.payload.len()).sum::<usize>(), 25);
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
}

#[test]
fn two_window_sizes_in_one_settings_frame_apply_the_last() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &request("/a/b"));
    r.client_read(&mut buf);
    let mut buf = BytesMut::new();
    frame::put_settings(
        &mut buf,
        &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10), (frame::SETTINGS_INITIAL_WINDOW_SIZE, 20)],
    );
    r.client_read(&mut buf);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, DATA, 0, 1, &[1; 25]);
    r.back_read(0, &mut buf);
    let sent: usize = calls(r.client_out()).iter().filter(|f| f.kind == DATA).map(|f| f.payload.len()).sum();
    assert_eq!(sent, 20);
}

/// A call to `/a/b` with `grpc-timeout: timeout` and no body yet.
fn call_with_timeout(r: &mut Relay<Turns>, id: u32, timeout: &str) {
    let mut block = request("/a/b");
    hpack::encode(b"grpc-timeout", timeout.as_bytes(), &mut block);
    let mut buf = BytesMut::new();
    if id == 1 {
        buf.extend_from_slice(frame::PREFACE);
    }
    put(&mut buf, HEADERS, END_HEADERS, id, &block);
    r.client_read(&mut buf);
}

#[test]
fn the_callers_deadline_passes_to_the_replica_and_ends_the_call_when_it_passes() {
    let (mut r, log) = relay(&[1]);
    r.tick(Duration::from_secs(5));
    call_with_timeout(&mut r, 1, "100m");
    let sent = back_frames(&mut r, 0);
    assert_eq!(header(&decode(&sent[0].payload), "grpc-timeout"), Some("100000u"));
    r.tick(Duration::from_millis(5099));
    assert!(calls(r.client_out()).is_empty());
    assert_eq!(r.next_timer(), Some(Duration::from_millis(5100)));
    r.tick(Duration::from_millis(5100));
    let got = calls(r.client_out());
    let status = decode(&got[0].payload);
    assert_eq!(header(&status, "grpc-status"), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(header(&status, "grpc-message"), Some("deadline exceeded after 1 attempt(s)"));
    let reset = back_frames(&mut r, 0);
    assert_eq!(
        reset.iter().map(|f| (f.kind, f.payload.clone())).collect::<Vec<_>>(),
        vec![(RST_STREAM, 8u32.to_be_bytes().to_vec())]
    );
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled)]);
}

#[test]
fn the_methods_timeout_wins_when_sooner_and_a_retry_carries_the_time_left() {
    let (mut r, _) = retrying(&[1, 2]);
    r.picker.timeout = Some(Duration::from_millis(50));
    call_with_timeout(&mut r, 1, "10S");
    assert_eq!(header(&decode(&back_frames(&mut r, 0)[0].payload), "grpc-timeout"), Some("50000u"));
    r.tick(Duration::from_millis(20));
    refuse(&mut r, 0, 1, "14", &[("grpc-retry-pushback-ms", "5")]);
    r.tick(Duration::from_millis(25));
    let again = back_frames(&mut r, 1);
    assert_eq!(header(&decode(&again[0].payload), "grpc-timeout"), Some("25000u"), "50 ms less the 25 gone");
    r.tick(Duration::from_millis(50));
    let got = calls(r.client_out());
    let status = decode(&got[0].payload);
    assert_eq!(header(&status, "grpc-status"), Some("4"));
    assert_eq!(header(&status, "grpc-previous-rpc-attempts"), Some("1"));
}

#[test]
fn deadlines_of_calls_already_over_are_not_kept_without_bound() {
    let (mut r, _) = relay(&[1]);
    // 5,000 calls, each with an hour to spare, each answered at once.
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        call_with_timeout(&mut r, id, "1H");
        answer(&mut r, 0, id, b"\0\0\0\0\0", "0");
    }
    assert!(!r.is_done());
    assert_eq!(r.open_calls(), 0);
    assert!(r.deadlines.len() <= 100, "{} deadlines held for calls long over", r.deadlines.len());
}

/// A relay pinging its replicas after a second of silence, with one call on replica 1
/// placed at time zero.
fn pinging() -> (Relay<Turns>, Log) {
    let (r, log) = relay(&[1]);
    let limits = Limits { keepalive: Some(Duration::from_secs(1)), ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.back_connected(0);
    assert_eq!(back_frames(&mut r, 0).len(), 2, "the call went out");
    (r, log)
}

fn pings(r: &mut Relay<Turns>) -> usize {
    back_frames(r, 0).iter().filter(|f| f.kind == frame::PING && f.flags & frame::ACK == 0).count()
}

#[test]
fn a_replica_silent_past_a_ping_loses_its_calls_as_a_lost_connection() {
    let (mut r, log) = pinging();
    r.tick(Duration::from_millis(999));
    assert_eq!(pings(&mut r), 0);
    assert_eq!(r.next_timer(), Some(Duration::from_secs(1)));
    r.tick(Duration::from_secs(1));
    assert_eq!(pings(&mut r), 1, "a second with nothing heard");
    r.tick(Duration::from_millis(1749));
    assert!(calls(r.client_out()).is_empty());
    assert_eq!(r.next_timer(), Some(Duration::from_millis(1750)));
    r.tick(Duration::from_millis(1750));
    let got = calls(r.client_out());
    let status = decode(&got.iter().find(|f| f.kind == HEADERS).expect("a status").payload);
    assert_eq!(header(&status, "grpc-status"), Some("14"));
    assert_eq!(
        header(&status, "grpc-message"),
        Some("the connection to replica 127.0.0.1:50051 went silent: no answer to a ping within 750ms")
    );
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Lost)]);
    assert!(r.backs().next().is_none(), "its connection is let go");
}

#[test]
fn a_replica_that_answers_its_ping_keeps_its_calls() {
    let (mut r, log) = pinging();
    r.tick(Duration::from_secs(1));
    assert_eq!(pings(&mut r), 1);
    r.tick(Duration::from_millis(1200));
    let mut buf = BytesMut::new();
    put(&mut buf, frame::PING, frame::ACK, 0, &[0; 8]);
    r.back_read(0, &mut buf);
    r.tick(Duration::from_millis(1750));
    assert!(calls(r.client_out()).is_empty(), "the call goes on");
    assert_eq!(r.next_timer(), Some(Duration::from_millis(2200)), "the next ping, a second after the answer");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(0))]);
}

#[test]
fn a_replica_connection_with_no_call_open_is_not_pinged() {
    let (mut r, _) = pinging();
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(r.next_timer(), None);
    r.tick(Duration::from_secs(10));
    assert_eq!(pings(&mut r), 0);
}

/// A relay that pings its client after 10 s with nothing heard from it, and lets it go
/// 20 s past an unanswered ping.
fn pinging_client() -> (Relay<Turns>, Log) {
    let (r, log) = relay(&[1]);
    let limits = Limits {
        client_keepalive: Some(Duration::from_secs(10)),
        client_ping_timeout: Duration::from_secs(20),
        ..Limits::default()
    };
    (Relay::new(r.picker, limits, 7), log)
}

fn client_pings(r: &mut Relay<Turns>) -> usize {
    frames(r.client_out()).iter().filter(|f| f.kind == frame::PING && f.flags & frame::ACK == 0).count()
}

/// A client connection open at 0 s and pinged at 10 s, nothing heard since.
fn pinged_client() -> Relay<Turns> {
    let (mut r, _) = pinging_client();
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    r.client_read(&mut buf);
    r.tick(Duration::from_secs(10));
    assert_eq!(client_pings(&mut r), 1);
    r
}

#[test]
fn a_client_silent_past_a_ping_is_let_go_and_its_calls_cancelled() {
    let (mut r, log) = pinging_client();
    assert_eq!(r.next_timer(), Some(Duration::from_secs(10)), "an idle connection is pinged too");
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/hello.HelloService/SayHello"));
    r.tick(Duration::from_secs(1));
    r.client_read(&mut buf);
    r.back_connected(0);
    assert_eq!(back_frames(&mut r, 0).len(), 1, "the call went out");
    r.tick(Duration::from_millis(10_999));
    assert_eq!(client_pings(&mut r), 0);
    r.tick(Duration::from_secs(11));
    assert_eq!(client_pings(&mut r), 1, "ten seconds with nothing heard");
    r.tick(Duration::from_millis(30_999));
    assert!(!r.client_silent() && !r.is_done());
    assert_eq!(r.next_timer(), Some(Duration::from_secs(31)));
    r.tick(Duration::from_secs(31));
    assert!(r.client_silent(), "twenty seconds past the ping");
    assert!(r.is_done());
    let reset = back_frames(&mut r, 0);
    assert_eq!((reset[0].kind, reset[0].stream, &reset[0].payload[..]), (RST_STREAM, 1, &[0, 0, 0, 8][..]));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled)]);
    assert_eq!(r.next_timer(), None, "nothing more to wait for");
}

#[test]
fn a_client_heard_from_after_its_ping_is_kept() {
    let mut r = pinged_client();
    let mut buf = BytesMut::new();
    r.tick(Duration::from_secs(15));
    put(&mut buf, frame::PING, frame::ACK, 0, &[0; 8]);
    r.client_read(&mut buf);
    r.tick(Duration::from_secs(30));
    assert!(!r.client_silent() && !r.is_done());
    assert_eq!(client_pings(&mut r), 1, "the next ping, ten seconds after the answer");
    r.tick(Duration::from_secs(40));
    put(&mut buf, WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]);
    r.client_read(&mut buf);
    r.tick(Duration::from_secs(60));
    assert!(!r.client_silent(), "any frame is an answer");
}

/// A client opening `Health/Watch` for the whole proxy on stream 1, with `settings`.
fn watch(serving: bool, settings: &[(u16, u32)]) -> Relay<Turns> {
    let (mut r, _) = relay(&[1]);
    r.picker.serving = serving;
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, settings);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/grpc.health.v1.Health/Watch"));
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
    r.client_read(&mut buf);
    r
}

const SERVING: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 1];
const NOT_SERVING: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 2];

#[test]
fn a_health_watch_hears_the_status_at_once_and_then_each_change() {
    let mut r = watch(true, &[]);
    let got = calls(r.client_out());
    assert_eq!(got.len(), 2, "headers and a status, the stream left open: {got:?}");
    assert_eq!((got[0].kind, got[0].flags & END_STREAM), (HEADERS, 0));
    assert_eq!(header(&decode(&got[0].payload), ":status"), Some("200"));
    assert_eq!((got[1].kind, &got[1].payload[..]), (DATA, &SERVING[..]));
    assert!(r.follows_readiness(), "the shell tells it of changes");
    r.ready_changed();
    assert!(calls(r.client_out()).is_empty(), "no change, no message");
    r.picker.serving = false;
    r.ready_changed();
    let got = calls(r.client_out());
    assert_eq!((got.len(), got[0].kind, &got[0].payload[..]), (1, DATA, &NOT_SERVING[..]));
    r.picker.serving = true;
    r.ready_changed();
    assert_eq!(calls(r.client_out())[0].payload, SERVING);
    assert!(r.backs().next().is_none(), "no replica asked");
}

#[test]
fn a_health_watch_waits_for_the_clients_window() {
    let mut r = watch(false, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)]);
    let got = calls(r.client_out());
    assert_eq!(got.len(), 1, "headers only: no window for the status");
    r.picker.serving = true;
    r.ready_changed();
    assert!(calls(r.client_out()).is_empty());
    let mut buf = BytesMut::new();
    put(&mut buf, WINDOW_UPDATE, 0, 1, &[0, 0, 0, 7]);
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!(got.len(), 1, "the latest status only: {got:?}");
    assert_eq!(got[0].payload, SERVING);
}

#[test]
fn a_health_watch_ends_unavailable_when_the_proxy_drains_and_on_a_client_reset() {
    let mut r = watch(true, &[]);
    calls(r.client_out());
    r.drain();
    let got = frames(r.client_out());
    let trailers = got.iter().find(|f| f.kind == HEADERS).expect("trailers");
    assert_eq!(trailers.flags & END_STREAM, END_STREAM);
    assert_eq!(header(&decode(&trailers.payload), "grpc-status"), Some("14"));
    assert!(r.is_done(), "no watch holds the connection open");

    let mut r = watch(true, &[]);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::Cancel);
    r.client_read(&mut buf);
    calls(r.client_out());
    assert!(!r.follows_readiness());
    r.picker.serving = false;
    r.ready_changed();
    assert!(calls(r.client_out()).is_empty(), "a watch reset hears nothing more");
}

#[test]
fn a_health_status_begun_in_a_small_window_is_finished_before_the_next() {
    let mut r = watch(false, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 3)]);
    let mut got: Vec<u8> =
        calls(r.client_out()).into_iter().filter(|f| f.kind == DATA).flat_map(|f| f.payload).collect();
    assert_eq!(got, NOT_SERVING[..3]);
    r.picker.serving = true;
    r.ready_changed();
    let mut buf = BytesMut::new();
    put(&mut buf, WINDOW_UPDATE, 0, 1, &[0, 0, 0, 100]);
    r.client_read(&mut buf);
    got.extend(calls(r.client_out()).into_iter().filter(|f| f.kind == DATA).flat_map(|f| f.payload));
    assert_eq!(got, [NOT_SERVING, SERVING].concat(), "whole messages, the latest last");
}

#[test]
fn requests_kept_for_replays_share_one_budget_and_give_it_back() {
    let (r, log) = relay(&[1, 2]);
    let budget = Budget::new(10);
    let limits = Limits { replay_budget: budget.clone(), ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    // Two calls of 6 request bytes each, on replicas 1 and 2: the second is past the
    // budget of 10, so it is sent but not kept.
    client_calls(&mut r, &[1, 3], b"\0\0\0\0\x01x");
    assert_eq!(budget.used(), 6);
    back_frames(&mut r, 0);
    back_frames(&mut r, 1);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::RefusedStream);
    r.back_read(0, &mut buf.clone());
    let again = back_frames(&mut r, 1);
    assert_eq!((again[0].kind, again[0].stream), (HEADERS, 3), "call 1 replayed on replica 2");
    assert_eq!(again[1].payload, b"\0\0\0\0\x01x");
    r.back_read(1, &mut buf);
    let passed_on = calls(r.client_out());
    assert_eq!(passed_on.len(), 1, "{passed_on:?}");
    let f = &passed_on[0];
    assert_eq!(
        (f.kind, f.stream, &f.payload[..]),
        (RST_STREAM, 3, &[0, 0, 0, 7][..]),
        "call 3's refusal, for the client to retry"
    );
    answer(&mut r, 1, 3, b"\0\0\0\0\0", "0");
    assert_eq!(budget.used(), 0, "given back once the response began");
    assert_eq!(log.borrow().last(), Some(&(addr(2), Outcome::Status(0))));
}

#[test]
fn a_call_waiting_when_the_proxy_drains_still_goes_out_and_the_connection_ends_after_it() {
    let (mut r, _) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.drain();
    let got = frames(r.client_out());
    assert!(got.iter().any(|f| f.kind == GOAWAY), "{got:?}");
    assert!(!r.is_done(), "the waiting call holds the connection open");
    assert!(r.follows_readiness());
    r.picker.replicas = vec![addr(1)];
    r.ready_changed();
    assert_eq!(back_frames(&mut r, 0)[0].kind, HEADERS, "placed once a replica is ready");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert!(r.is_done());
}

#[test]
fn a_waiting_call_placed_on_a_replica_that_refuses_it_goes_to_the_next() {
    let (mut r, log) = relay(&[]);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    r.picker.replicas = vec![addr(1), addr(2)];
    r.ready_changed();
    back_frames(&mut r, 0);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::RefusedStream);
    r.back_read(0, &mut buf);
    let again = back_frames(&mut r, 1);
    assert_eq!(again[1].payload, b"\0\0\0\0\x01x", "its request, held while it waited");
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Refused), (addr(2), Outcome::Status(0))]);
}

/// A relay whose method hedges: up to `attempts`, 50 ms apart, UNAVAILABLE non-fatal.
fn hedging(replicas: &[u8], attempts: u32) -> (Relay<Turns>, Log) {
    let (mut r, log) = relay(replicas);
    let mut non_fatal = CodeSet::default();
    non_fatal.insert(Code::Unavailable);
    r.picker.hedging = Some(HedgingPolicy { max_attempts: attempts, delay: Duration::from_millis(50), non_fatal });
    (r, log)
}

fn kinds(frames: &[F]) -> Vec<(u8, u8)> {
    frames.iter().map(|f| (f.kind, f.flags)).collect()
}

#[test]
fn a_hedge_goes_to_another_replica_after_the_delay_and_the_first_response_wins() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    assert_eq!(back_frames(&mut r, 0).len(), 2, "the first attempt at once");
    assert_eq!(r.next_timer(), Some(Duration::from_millis(50)));
    r.tick(Duration::from_millis(49));
    assert!(r.backs().all(|b| b.id != 1), "no hedge before the delay");
    r.tick(Duration::from_millis(50));
    let hedge = back_frames(&mut r, 1);
    assert_eq!(kinds(&hedge), [(HEADERS, END_HEADERS), (DATA, END_STREAM)]);
    assert_eq!(header(&decode(&hedge[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    assert_eq!(hedge[1].payload, b"\0\0\0\0\x01x", "the same request");
    assert_eq!(r.picker.asked[1].0, vec![addr(1)], "on a replica not tried");
    assert_eq!(r.open_calls(), 1, "one call, two attempts");
    answer(&mut r, 1, 1, b"\0\0\0\0\x02ok", "0");
    let lost = back_frames(&mut r, 0);
    assert_eq!((lost[0].kind, lost[0].stream, &lost[0].payload[..]), (RST_STREAM, 1, &[0, 0, 0, 8][..]));
    let got = calls(r.client_out());
    assert_eq!(kinds(&got), [(HEADERS, END_HEADERS), (DATA, 0), (HEADERS, END_HEADERS | END_STREAM)]);
    assert_eq!(header(&decode(&got[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    assert_eq!(got[1].payload, b"\0\0\0\0\x02ok");
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled), (addr(2), Outcome::Status(0))]);
    r.tick(Duration::from_millis(100));
    assert!(r.backs().all(|b| b.id != 2), "no third attempt once committed");
    assert!(r.is_done() || r.open_calls() == 0);
}

#[test]
fn a_non_fatal_failure_sends_the_next_hedge_at_once_and_a_fatal_one_ends_the_call() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    back_frames(&mut r, 0);
    r.tick(Duration::from_millis(10));
    refuse(&mut r, 0, 1, "14", &[]);
    assert!(calls(r.client_out()).is_empty(), "the failure is not passed on");
    let hedge = back_frames(&mut r, 1);
    assert_eq!(kinds(&hedge), [(HEADERS, END_HEADERS), (DATA, END_STREAM)], "at once, not at 50 ms");
    r.tick(Duration::from_millis(59));
    assert!(r.backs().all(|b| b.id != 2), "the next, a delay after this one");
    refuse(&mut r, 1, 1, "13", &[]);
    let got = calls(r.client_out());
    assert_eq!(got.len(), 1);
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("13"), "INTERNAL is fatal");
    assert_eq!(header(&decode(&got[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14)), (addr(2), Outcome::Status(13))]);
    r.tick(Duration::from_millis(100));
    assert!(r.backs().all(|b| b.id != 2), "no attempt after the call ended");
}

#[test]
fn the_last_non_fatal_failure_reaches_the_client_once_attempts_run_out() {
    let (mut r, log) = hedging(&[1, 2], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    assert_eq!(back_frames(&mut r, 1).len(), 2, "the hedge");
    refuse(&mut r, 1, 1, "14", &[]);
    assert!(calls(r.client_out()).is_empty(), "the first attempt still runs");
    refuse(&mut r, 0, 1, "14", &[]);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("14"));
    assert_eq!(*log.borrow(), vec![(addr(2), Outcome::Retried(14)), (addr(1), Outcome::Status(14))]);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_failed_first_attempt_hands_the_call_to_a_running_hedge() {
    let (mut r, log) = hedging(&[1, 2], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    refuse(&mut r, 0, 1, "14", &[]);
    assert!(calls(r.client_out()).is_empty());
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14)), (addr(2), Outcome::Status(0))]);
}

#[test]
fn a_client_reset_cancels_every_hedge() {
    let (mut r, log) = hedging(&[1, 2], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 0);
    back_frames(&mut r, 1);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::Cancel);
    r.client_read(&mut buf);
    for slot in [0, 1] {
        let got = back_frames(&mut r, slot);
        assert_eq!((got[0].kind, got[0].stream), (RST_STREAM, 1), "replica {slot}: {got:?}");
    }
    let mut outcomes: Vec<_> = log.borrow().clone();
    outcomes.sort_by_key(|(a, _)| *a);
    assert_eq!(outcomes, vec![(addr(1), Outcome::Cancelled), (addr(2), Outcome::Cancelled)]);
    assert!(r.is_done() || r.open_calls() == 0);
    assert_eq!(r.next_timer(), None);
}

#[test]
fn a_hedge_waits_for_the_whole_request() {
    let (mut r, _) = hedging(&[1, 2], 2);
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/echo.Echo/Collect"));
    put(&mut buf, DATA, 0, 1, b"\0\0\0\0\x01a");
    r.client_read(&mut buf);
    r.tick(Duration::from_millis(80));
    assert!(r.backs().all(|b| b.id != 1), "half a request is not hedged");
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\x01b");
    r.client_read(&mut buf);
    let hedge = back_frames(&mut r, 1);
    let data: Vec<u8> = hedge.iter().filter(|f| f.kind == DATA).flat_map(|f| f.payload.clone()).collect();
    assert_eq!(data, b"\0\0\0\0\x01a\0\0\0\0\x01b", "the whole request, once it is");
    assert_eq!(hedge.last().unwrap().flags & END_STREAM, END_STREAM);
}

#[test]
fn health_checks_answered_between_resets_do_not_offset_them() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    for i in 0..2000u32 {
        put(&mut buf, HEADERS, END_HEADERS, 4 * i + 1, &request("/a/b"));
        frame::put_rst(&mut buf, 4 * i + 1, Reason::Cancel);
        put(&mut buf, HEADERS, END_HEADERS, 4 * i + 3, &request("/grpc.health.v1.Health/Check"));
        put(&mut buf, DATA, END_STREAM, 4 * i + 3, b"\0\0\0\0\0");
    }
    r.client_read(&mut buf);
    let goaway = frames(r.client_out()).into_iter().find(|f| f.kind == GOAWAY).expect("calmed");
    assert_eq!(frame::u32_at(&goaway.payload, 4), Some(Reason::EnhanceYourCalm as u32));
}

#[test]
fn a_health_watch_answered_after_a_drain_ends_at_once() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/grpc.health.v1.Health/Watch"));
    r.client_read(&mut buf);
    r.drain();
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    let trailers = got.iter().rfind(|f| f.kind == HEADERS).expect("trailers");
    assert_eq!(trailers.flags & END_STREAM, END_STREAM, "{got:?}");
    assert_eq!(header(&decode(&trailers.payload), "grpc-status"), Some("14"));
    assert!(r.is_done(), "nothing holds the draining connection open");
}

#[test]
fn a_health_watch_that_ended_hears_no_more_changes() {
    let (mut r, _) = relay(&[1]);
    r.picker.serving = false;
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 3)]);
    let mut block = request("/grpc.health.v1.Health/Watch");
    hpack::encode(b"grpc-timeout", b"100m", &mut block);
    put(&mut buf, HEADERS, END_HEADERS, 1, &block);
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
    r.client_read(&mut buf);
    r.tick(Duration::from_millis(100));
    r.picker.serving = true;
    r.ready_changed();
    put(&mut buf, WINDOW_UPDATE, 0, 1, &[0, 0, 1, 0]);
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    let data: Vec<u8> = got.iter().filter(|f| f.kind == DATA).flat_map(|f| f.payload.clone()).collect();
    assert_eq!(data, NOT_SERVING, "no status after the deadline ended it");
    let trailers = got.iter().rfind(|f| f.kind == HEADERS).unwrap();
    assert_eq!(header(&decode(&trailers.payload), "grpc-status"), Some("4"));
}

#[test]
fn a_health_request_larger_than_any_real_one_is_refused() {
    let (mut r, _) = relay(&[1]);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/grpc.health.v1.Health/Check"));
    let mut message = vec![0, 0, 0, 0, 100];
    message.extend_from_slice(&[0x0a; 100]);
    put(&mut buf, DATA, END_STREAM, 1, &message);
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!(header(&decode(&got[0].payload), "grpc-status"), Some("8"), "RESOURCE_EXHAUSTED");
}

#[test]
fn a_client_left_unread_for_a_replicas_backlog_is_not_counted_silent() {
    let mut r = pinged_client();
    r.tick(Duration::from_secs(25));
    r.client_unread();
    r.tick(Duration::from_secs(30));
    assert!(!r.client_silent(), "its bytes were not read: its silence proves nothing");
    assert_eq!(r.next_timer(), Some(Duration::from_secs(35)), "pinged again ten seconds on");
}

#[test]
fn a_health_check_answer_waits_for_the_clients_window() {
    let mut r = {
        let (mut r, _) = relay(&[1]);
        let mut buf = BytesMut::from(frame::PREFACE);
        frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)]);
        put(&mut buf, HEADERS, END_HEADERS, 1, &request("/grpc.health.v1.Health/Check"));
        put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
        r.client_read(&mut buf);
        r
    };
    assert_eq!(kinds(&calls(r.client_out())), [(HEADERS, END_HEADERS)], "headers only");
    let mut buf = BytesMut::new();
    put(&mut buf, WINDOW_UPDATE, 0, 1, &[0, 0, 0, 7]);
    r.client_read(&mut buf);
    let got = calls(r.client_out());
    assert_eq!(kinds(&got), [(DATA, 0), (HEADERS, END_HEADERS | END_STREAM)]);
    assert_eq!(got[0].payload, SERVING);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_lost_connection_carrying_a_call_and_its_hedge_ends_the_call() {
    let (mut r, log) = hedging(&[1], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.back_connected(0);
    r.tick(Duration::from_millis(50));
    let sent = back_frames(&mut r, 0);
    assert_eq!(sent.iter().filter(|f| f.kind == HEADERS).count(), 2, "the hedge on the same connection");
    r.back_lost(0);
    let got = calls(r.client_out());
    let status = decode(&got.iter().find(|f| f.kind == HEADERS).expect("an answer, not a hang").payload);
    assert_eq!(header(&status, "grpc-status"), Some("14"));
    assert_eq!(log.borrow().len(), 2, "both attempts ended: {:?}", log.borrow());
    assert_eq!(r.open_calls(), 0);
    assert!(r.is_done() || r.next_timer().is_none_or(|t| t > Duration::from_millis(50)));
}

#[test]
fn a_hedge_finding_no_ready_replica_tries_again_later_even_with_no_delay() {
    let (mut r, _) = hedging(&[1], 3);
    r.picker.hedging.as_mut().unwrap().delay = Duration::ZERO;
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/a/b"));
    r.client_read(&mut buf);
    r.picker.replicas.clear();
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\0");
    r.client_read(&mut buf);
    r.tick(Duration::ZERO); // returns
    assert!(r.next_timer().is_some_and(|t| t > Duration::ZERO), "{:?}", r.next_timer());
}

#[test]
fn a_refused_first_attempt_hands_the_call_to_a_running_hedge() {
    let (mut r, log) = hedging(&[1, 2], 2);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    r.picker.replicas.clear();
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::RefusedStream);
    r.back_read(0, &mut buf);
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    r.tick(Duration::from_millis(1100));
    let got = calls(r.client_out());
    let statuses: Vec<_> = got.iter().filter(|f| f.kind == HEADERS && f.flags & END_STREAM != 0).collect();
    assert_eq!(statuses.len(), 1, "{got:?}");
    assert_eq!(header(&decode(&statuses[0].payload), "grpc-status"), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Refused), (addr(2), Outcome::Status(0))]);
}

#[test]
fn a_pushback_on_the_only_attempt_delays_the_next_instead_of_ending_the_call() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(10));
    refuse(&mut r, 0, 1, "14", &[("grpc-retry-pushback-ms", "100")]);
    assert!(calls(r.client_out()).is_empty(), "the call waits out the pushback");
    r.tick(Duration::from_millis(109));
    assert!(r.backs().all(|b| b.id != 1));
    r.tick(Duration::from_millis(110));
    let next = back_frames(&mut r, 1);
    assert_eq!(header(&decode(&next[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(14)), (addr(2), Outcome::Status(0))]);
}

#[test]
fn hedging_delays_count_from_the_first_attempt_not_the_calls_arrival() {
    let (mut r, _) = hedging(&[], 2);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(200));
    r.picker.replicas = vec![addr(1), addr(2)];
    r.ready_changed();
    assert_eq!(r.backs().count(), 1, "the first attempt alone");
    r.tick(Duration::from_millis(249));
    assert_eq!(r.backs().count(), 1);
    r.tick(Duration::from_millis(250));
    assert_eq!(r.backs().count(), 2, "the hedge, a delay after it");
}

/// The replica at `slot` resets its stream `up` with HTTP/2 error `reason`.
fn reset_by_replica(r: &mut Relay<Turns>, slot: u64, up: u32, reason: Reason) {
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, up, reason);
    r.back_read(slot, &mut buf);
}

#[test]
fn a_replica_reset_before_any_response_is_retried_as_the_status_grpc_reads_in_it() {
    let (mut r, log) = retrying(&[1, 2]);
    r.picker.retry.as_mut().unwrap().retryable.insert(Code::Internal);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    calls(r.client_out());
    reset_by_replica(&mut r, 0, 1, Reason::Internal);
    assert!(calls(r.client_out()).is_empty(), "INTERNAL_ERROR reads as INTERNAL, which the policy retries");
    r.tick(r.next_timer().expect("a backoff"));
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Retried(13)), (addr(2), Outcome::Status(0))]);
}

#[test]
fn a_replica_reset_the_policy_does_not_retry_reaches_the_client_and_counts_as_its_status() {
    let (mut r, log) = retrying(&[1, 2]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    calls(r.client_out());
    reset_by_replica(&mut r, 0, 1, Reason::Cancel);
    let got = calls(r.client_out());
    assert_eq!(kinds(&got), [(RST_STREAM, 0)]);
    assert_eq!(got[0].payload, [0, 0, 0, 8], "the replica's own reason");
    assert_eq!(r.next_timer(), None);
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Status(Code::Cancelled as u8))]);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_hedge_reset_with_a_fatal_status_ends_the_call_with_it() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 0);
    back_frames(&mut r, 1);
    reset_by_replica(&mut r, 1, 1, Reason::Internal);
    let got = calls(r.client_out());
    assert_eq!(kinds(&got), [(RST_STREAM, 0)], "INTERNAL is fatal: the call is the hedge's");
    assert_eq!(got[0].payload, [0, 0, 0, 2]);
    let cancelled = back_frames(&mut r, 0);
    assert_eq!((cancelled[0].kind, &cancelled[0].payload[..]), (RST_STREAM, &[0, 0, 0, 8][..]));
    assert!(r.backs().all(|b| b.id != 2), "no third attempt");
    assert_eq!(*log.borrow(), vec![(addr(1), Outcome::Cancelled), (addr(2), Outcome::Status(13))]);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_hedge_reset_with_a_non_fatal_status_sends_the_next_at_once() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    r.picker.hedging.as_mut().unwrap().non_fatal.insert(Code::Cancelled);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    reset_by_replica(&mut r, 1, 1, Reason::Cancel);
    assert!(calls(r.client_out()).is_empty());
    assert_eq!(kinds(&back_frames(&mut r, 2)), [(HEADERS, END_HEADERS), (DATA, END_STREAM)], "at once");
    answer(&mut r, 2, 1, b"\0\0\0\0\0", "0");
    let outcomes = log.borrow().clone();
    assert_eq!(outcomes[0], (addr(2), Outcome::Retried(Code::Cancelled as u8)));
    assert_eq!(outcomes.last(), Some(&(addr(3), Outcome::Status(0))));
}

#[test]
fn a_first_attempt_reset_with_a_fatal_status_ends_the_call_though_a_hedge_runs() {
    let (mut r, log) = hedging(&[1, 2], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    reset_by_replica(&mut r, 0, 1, Reason::Internal);
    let got = calls(r.client_out());
    assert_eq!(kinds(&got), [(RST_STREAM, 0)]);
    let cancelled = back_frames(&mut r, 1);
    assert_eq!((cancelled[0].kind, &cancelled[0].payload[..]), (RST_STREAM, &[0, 0, 0, 8][..]));
    assert_eq!(*log.borrow(), vec![(addr(2), Outcome::Cancelled), (addr(1), Outcome::Status(13))]);
}

#[test]
fn a_response_reset_midway_gives_its_unsent_bytes_back_to_the_replica_connection() {
    // Connection credit goes out in steps of 10,000 bytes.
    let limits = Limits { conn_window: 20_000, ..Limits::default() };
    let mut r = Relay::new(relay(&[1]).0.picker, limits, 7);
    narrow_client_calls(&mut r, 0);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, DATA, 0, 1, &[1; 15_000]);
    r.back_read(0, &mut buf);
    frames(r.back_out(0).unwrap());
    reset_by_replica(&mut r, 0, 1, Reason::Internal);
    assert_eq!(kinds(&calls(r.client_out())).last(), Some(&(RST_STREAM, 0)));
    assert_eq!(connection_credit(&frames(r.back_out(0).unwrap())), 15_000, "what it took and what it never will");
}

#[test]
fn a_refused_hedge_goes_to_another_replica_as_the_same_attempt() {
    let (mut r, log) = hedging(&[1, 2, 3], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\x01x");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    reset_by_replica(&mut r, 1, 1, Reason::RefusedStream);
    let again = back_frames(&mut r, 2);
    assert_eq!(kinds(&again), [(HEADERS, END_HEADERS), (DATA, END_STREAM)], "at once, though maxAttempts is 2");
    assert_eq!(header(&decode(&again[0].payload), "grpc-previous-rpc-attempts"), Some("1"), "the same attempt");
    assert_eq!(again[1].payload, b"\0\0\0\0\x01x");
    answer(&mut r, 2, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    assert_eq!(
        *log.borrow(),
        vec![(addr(2), Outcome::Refused), (addr(1), Outcome::Cancelled), (addr(3), Outcome::Status(0))]
    );
}

/// Refuses, with REFUSED_STREAM, every stream any back was sent since the last call.
fn refuse_all_sent(r: &mut Relay<Turns>) -> usize {
    let slots: Vec<u64> = r.backs().map(|b| b.id).collect();
    let mut refused = 0;
    for slot in slots {
        let ups: Vec<u32> = back_frames(r, slot).iter().filter(|f| f.kind == HEADERS).map(|f| f.stream).collect();
        for up in ups {
            reset_by_replica(r, slot, up, Reason::RefusedStream);
            refused += 1;
        }
    }
    refused
}

#[test]
fn a_hedge_refused_past_the_calls_transparent_retries_is_a_failed_attempt() {
    let (r, log) = hedging(&[1, 2, 3, 4, 5], 2);
    let limits = Limits { max_transparent_retries: 1, ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    back_frames(&mut r, 0);
    r.tick(Duration::from_millis(50));
    assert_eq!(refuse_all_sent(&mut r), 1, "the hedge");
    assert_eq!(refuse_all_sent(&mut r), 1, "sent again once, as the same attempt");
    assert_eq!(refuse_all_sent(&mut r), 0, "not a third time: maxAttempts 2 leaves no next hedge");
    let refused = log.borrow().iter().filter(|(_, o)| *o == Outcome::Refused).count();
    assert_eq!(refused, 2);
    assert!(calls(r.client_out()).is_empty(), "UNAVAILABLE is non-fatal: the first attempt goes on");
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
}

#[test]
fn a_hedge_refused_past_its_retries_ends_the_call_when_unavailable_is_fatal() {
    let (r, log) = hedging(&[1, 2, 3], 2);
    let limits = Limits { max_transparent_retries: 0, ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    r.picker.hedging.as_mut().unwrap().non_fatal = CodeSet::default();
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    back_frames(&mut r, 0);
    r.tick(Duration::from_millis(50));
    assert_eq!(refuse_all_sent(&mut r), 1, "the hedge");
    let got = calls(r.client_out());
    let status = got.iter().find(|f| f.kind == HEADERS).expect("the call ends, not left running");
    assert_eq!(header(&decode(&status.payload), "grpc-status"), Some("14"));
    let cancelled = back_frames(&mut r, 0);
    assert_eq!((cancelled[0].kind, &cancelled[0].payload[..]), (RST_STREAM, &[0, 0, 0, 8][..]));
    assert_eq!(*log.borrow(), vec![(addr(2), Outcome::Refused), (addr(1), Outcome::Cancelled)]);
    assert_eq!(r.open_calls(), 0);
}

#[test]
fn a_hedge_relaunch_finding_no_replica_uses_none_of_the_calls_transparent_retries() {
    let (r, log) = hedging(&[1, 2], 3);
    let limits = Limits { max_transparent_retries: 1, ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    r.picker.wait = Some(Duration::from_secs(1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    let replicas = std::mem::take(&mut r.picker.replicas);
    reset_by_replica(&mut r, 1, 1, Reason::RefusedStream);
    r.picker.replicas = replicas;
    // The call's own attempt is refused next: its one transparent retry is still there.
    reset_by_replica(&mut r, 0, 1, Reason::RefusedStream);
    assert!(calls(r.client_out()).is_empty(), "sent again, not failed: {:?}", log.borrow());
}

#[test]
fn a_goaway_refusing_calls_and_their_hedges_on_one_connection_strands_none() {
    let (mut r, _) = hedging(&[1], 2);
    client_calls(&mut r, &[1, 3], b"\0\0\0\0\0");
    r.back_connected(0);
    r.tick(Duration::from_millis(50));
    let ups: Vec<u32> = back_frames(&mut r, 0).iter().filter(|f| f.kind == HEADERS).map(|f| f.stream).collect();
    assert_eq!(ups, [1, 3, 5, 7], "two calls and their hedges on the one replica");
    let mut buf = BytesMut::new();
    frame::put_goaway(&mut buf, 1, Reason::NoError);
    r.back_read(0, &mut buf);
    for slot in r.backs().map(|b| b.id).filter(|&id| id != 0).collect::<Vec<_>>() {
        let ups: Vec<u32> = back_frames(&mut r, slot).iter().filter(|f| f.kind == HEADERS).map(|f| f.stream).collect();
        for up in ups {
            answer(&mut r, slot, up, b"\0\0\0\0\0", "0");
        }
    }
    answer(&mut r, 0, 1, b"\0\0\0\0\0", "0");
    let ended: Vec<u32> = calls(r.client_out())
        .iter()
        .filter(|f| f.kind == HEADERS && f.flags & END_STREAM != 0)
        .map(|f| f.stream)
        .collect();
    assert_eq!(ended.len(), 2, "both calls answered: {ended:?}");
    assert_eq!(r.open_calls(), 0, "none waits on a stream the replica refused");
}

#[test]
fn a_hedged_call_sent_again_after_a_failure_credits_the_client_once() {
    let (r, _) = hedging(&[1, 2], 3);
    // Connection credit goes out in steps of 10,000 bytes.
    let limits = Limits { conn_window: 20_000, ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/echo.Echo/Collect"));
    r.client_read(&mut buf);
    let mut buf = BytesMut::new();
    frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10)]);
    r.back_read(0, &mut buf);
    let mut credit = connection_credit(&frames(r.client_out()));
    let mut message = vec![7; 15_000];
    message[..5].copy_from_slice(&[0, 0, 0, 0x3a, 0x93]);
    let mut buf = BytesMut::new();
    put(&mut buf, DATA, 0, 1, &message);
    r.client_read(&mut buf);
    refuse(&mut r, 0, 1, "14", &[]);
    r.tick(Duration::from_millis(1));
    r.tick(Duration::from_millis(2));
    credit += connection_credit(&frames(r.client_out()));
    assert!(credit <= 15_000, "{credit} bytes credited for 15,000 received");
}

/// The HEADERS and DATA every back was sent since the last call, and the last back
/// that was sent any.
fn sent_since(r: &mut Relay<Turns>) -> (u64, Vec<F>) {
    let mut sent = Vec::new();
    let mut last = u64::MAX;
    for slot in r.backs().map(|b| b.id).collect::<Vec<_>>() {
        let got: Vec<F> = back_frames(r, slot).into_iter().filter(|f| f.kind == HEADERS || f.kind == DATA).collect();
        if !got.is_empty() {
            last = slot;
        }
        sent.extend(got);
    }
    (last, sent)
}

#[test]
fn a_non_fatal_failure_before_the_request_is_whole_sends_it_again_as_it_grows() {
    let (mut r, log) = hedging(&[1, 2, 3], 3);
    let mut buf = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut buf, &[]);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/echo.Echo/Collect"));
    put(&mut buf, DATA, 0, 1, b"\0\0\0\0\x01a");
    r.client_read(&mut buf);
    back_frames(&mut r, 0);
    refuse(&mut r, 0, 1, "14", &[]);
    assert!(calls(r.client_out()).iter().all(|f| f.kind != HEADERS), "not passed on: {:?}", log.borrow());
    r.tick(Duration::from_millis(1));
    let (slot, sent) = sent_since(&mut r);
    assert_eq!(kinds(&sent), [(HEADERS, END_HEADERS), (DATA, 0)], "one attempt again, no hedge beside it");
    assert_eq!(sent[1].payload, b"\0\0\0\0\x01a");
    put(&mut buf, DATA, END_STREAM, 1, b"\0\0\0\0\x01b");
    r.client_read(&mut buf);
    let (same, rest) = sent_since(&mut r);
    assert_eq!((same, kinds(&rest)), (slot, vec![(DATA, END_STREAM)]), "the rest follows it");
    assert_eq!(rest[0].payload, b"\0\0\0\0\x01b");
    r.tick(Duration::from_millis(51));
    let (hedged, hedge) = sent_since(&mut r);
    assert_ne!(hedged, slot, "a hedge, a delay after the attempt, on another replica");
    assert_eq!(kinds(&hedge), [(HEADERS, END_HEADERS), (DATA, END_STREAM)]);
    assert_eq!(hedge[1].payload, b"\0\0\0\0\x01a\0\0\0\0\x01b", "the whole request");
}

#[test]
fn a_call_refused_past_its_transparent_retries_is_retried_as_unavailable_by_its_policy() {
    let (r, log) = retrying(&[1, 2]);
    let limits = Limits { max_transparent_retries: 1, ..Limits::default() };
    let mut r = Relay::new(r.picker, limits, 7);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    reset_by_replica(&mut r, 0, 1, Reason::RefusedStream);
    assert_eq!(r.next_timer(), None, "the transparent retry goes at once");
    reset_by_replica(&mut r, 1, 1, Reason::RefusedStream);
    assert!(calls(r.client_out()).is_empty(), "a refusal past them is UNAVAILABLE, which the policy retries");
    for slot in [0, 1] {
        back_frames(&mut r, slot);
    }
    r.tick(r.next_timer().expect("a backoff"));
    let (slot, again) = sent_since(&mut r);
    assert_eq!(header(&decode(&again[0].payload), "grpc-previous-rpc-attempts"), Some("1"));
    answer(&mut r, slot, again[0].stream, b"\0\0\0\0\0", "0");
    assert_eq!(status_heard(&mut r).as_deref(), Some("0"));
    let outcomes: Vec<Outcome> = log.borrow().iter().map(|(_, o)| *o).collect();
    assert_eq!(outcomes, [Outcome::Refused, Outcome::Refused, Outcome::Status(0)], "no refusal held against a replica");
}

fn counts(attempts: u32, retries: u32, hedges: u32, transparent_retries: u32) -> Stats {
    Stats { attempts, retries, hedges, transparent_retries, ..Stats::default() }
}

#[test]
fn a_hedged_call_is_told_over_once_with_its_hedge_and_the_status_the_client_heard() {
    let (mut r, _) = hedging(&[1, 2], 2);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    r.tick(Duration::from_millis(50));
    back_frames(&mut r, 1);
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    assert_eq!(*r.picker.calls.borrow(), [(0, counts(2, 0, 1, 0))], "the losing attempt is no call");
}

#[test]
fn calls_are_told_over_once_however_they_end() {
    let (mut r, _) = retrying(&[1, 2]);
    r.picker.wait = None;
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    refuse(&mut r, 0, 1, "14", &[]);
    r.tick(r.next_timer().unwrap());
    answer(&mut r, 1, 1, b"\0\0\0\0\0", "0");
    client_calls_more(&mut r, &[3]);
    reset_by_replica(&mut r, 0, 3, Reason::Cancel);
    client_calls_more(&mut r, &[5]);
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 5, Reason::Cancel);
    r.client_read(&mut buf);
    r.picker.replicas.clear();
    client_calls_more(&mut r, &[7]);
    client_calls_more(&mut r, &[9]);
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 11, &request("/grpc.health.v1.Health/Check"));
    r.client_read(&mut buf);
    r.client_closed();
    assert_eq!(
        *r.picker.calls.borrow(),
        [
            (0, counts(2, 1, 0, 0)),  // retried once, then OK
            (1, counts(1, 0, 0, 0)),  // the replica's CANCEL, as the client hears it
            (1, counts(1, 0, 0, 0)),  // the client's reset
            (14, counts(0, 0, 0, 0)), // no replica: never placed
            (14, counts(0, 0, 0, 0)),
        ],
        "the health check, answered by the relay, is no call"
    );
}

#[test]
fn a_retry_due_but_never_sent_is_no_attempt() {
    let (mut r, _) = retrying(&[1, 2]);
    r.picker.timeout = Some(Duration::from_millis(5));
    client_calls(&mut r, &[1, 3], b"\0\0\0\0\0");
    refuse(&mut r, 0, 1, "14", &[]);
    refuse(&mut r, 0, 3, "14", &[]);
    calls(r.client_out());
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 1, Reason::Cancel);
    r.client_read(&mut buf); // call 1 is reset in its backoff
    r.tick(Duration::from_millis(5)); // call 3's deadline passes in its backoff
    let got = calls(r.client_out());
    let answer = decode(&got.iter().find(|f| f.kind == HEADERS).expect("DEADLINE_EXCEEDED").payload);
    assert_eq!(header(&answer, "grpc-status"), Some("4"));
    assert_eq!(header(&answer, "grpc-previous-rpc-attempts"), None, "one attempt went out");
    assert_eq!(*r.picker.calls.borrow(), [(1, counts(1, 0, 0, 0)), (4, counts(1, 0, 0, 0))]);
}

#[test]
fn calls_are_told_over_with_the_status_the_client_hears() {
    let (mut r, _) = relay(&[1]);
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    let mut buf = BytesMut::new();
    put(&mut buf, HEADERS, END_HEADERS, 1, &response_headers());
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &[]);
    r.back_read(0, &mut buf);
    let limits = Limits { max_header_list: 250, ..Limits::default() };
    let mut r2 = Relay::new(relay(&[1]).0.picker, limits, 7);
    let mut buf = BytesMut::from(frame::PREFACE);
    put(&mut buf, HEADERS, END_HEADERS, 1, &request("/a/b"));
    let mut big = Vec::new();
    hpack::encode(b"x-big", &[b'a'; 300], &mut big);
    put(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &big);
    r2.client_read(&mut buf);
    let told = |r: &Relay<Turns>| r.picker.calls.borrow().iter().map(|(code, _)| *code).collect::<Vec<_>>();
    assert_eq!(told(&r), [13], "trailers without grpc-status: INTERNAL, as the h2 path counts it");
    assert_eq!(told(&r2), [8], "trailers too large: reset ENHANCE_YOUR_CALM, RESOURCE_EXHAUSTED");
}

#[test]
fn a_call_is_told_over_as_throttled_or_committed_by_its_buffer() {
    let (mut r, _) = retrying(&[1, 2]);
    // Two tokens: the first failure leaves one, half the bucket, and retries stop.
    r.picker.throttle = Some(Throttle::new(2.0, 0.1));
    client_calls(&mut r, &[1], b"\0\0\0\0\0");
    refuse(&mut r, 0, 1, "14", &[]);
    assert_eq!(status_heard(&mut r).as_deref(), Some("14"), "not retried");
    let (mut r2, _) = relay(&[1]);
    send_96_kib(&mut r2, "/a/b");
    answer(&mut r2, 0, 1, b"\0\0\0\0\0", "0");
    let one = |r: &Relay<Turns>| r.picker.calls.borrow()[0].1;
    assert_eq!((one(&r).throttled, one(&r).committed_by_buffer), (true, false));
    assert_eq!((one(&r2).throttled, one(&r2).committed_by_buffer), (false, true), "96 KiB outgrew 64 KiB");
}
