//! The relay driven by seeded random events: frames from both sides (well-formed calls
//! and answers mixed with any kind, flags, stream id and payload), timers, lost and
//! refused connections, drains. Whatever comes, nothing panics or loops; once replicas
//! answer and the client reads, every call whose request is whole ends; and once the
//! client and every replica are gone no call, hedge or wait is left behind.

use super::*;

/// xorshift64*: the same sequence for the same seed, on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = if self.chance(5) { self.below(20_000) } else { self.below(max + 1) };
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn message(rng: &mut Rng) -> Vec<u8> {
    let body = rng.bytes(40);
    let mut m = vec![0, 0, 0, 0, body.len() as u8];
    m.extend_from_slice(&body);
    if rng.chance(3) {
        m[1] = rng.next() as u8; // a length that lies
    }
    m
}

/// What a gRPC client sends, mostly: a new call on the next stream id, more of a
/// call's request, its end, a reset, credit. `open` are the client's streams so far.
fn client_frame(rng: &mut Rng, out: &mut BytesMut, open: &mut Vec<u32>) {
    let stream = match open.last() {
        Some(_) if rng.chance(60) => open[rng.below(open.len() as u64) as usize],
        last => {
            let id = last.map_or(1, |l| l + 2);
            let path = ["/hello.HelloService/SayHello", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
                [rng.below(3) as usize];
            let mut block = request(path);
            if rng.chance(20) {
                hpack::encode(b"grpc-timeout", ["1m", "50m", "2S", "x"][rng.below(4) as usize].as_bytes(), &mut block);
            }
            let end = if rng.chance(20) { END_STREAM } else { 0 };
            open.push(id);
            return put(out, HEADERS, END_HEADERS | end, id, &block);
        }
    };
    match rng.below(10) {
        0..=5 => put(out, DATA, if rng.chance(60) { END_STREAM } else { 0 }, stream, &message(rng)),
        6 => put(out, RST_STREAM, 0, stream, &(rng.below(14) as u32).to_be_bytes()),
        7 => put(
            out,
            WINDOW_UPDATE,
            0,
            if rng.chance(50) { 0 } else { stream },
            &(1 + rng.below(1 << 16) as u32).to_be_bytes(),
        ),
        8 => frame::put_settings(out, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, [0, 10, 65_535][rng.below(3) as usize])]),
        _ => put(out, frame::PING, 0, 0, &rng.next().to_be_bytes()),
    }
}

/// What a gRPC server sends, mostly, on one of its streams `ups`: response headers, a
/// message, trailers (some trailers-only, some with pushback), a reset, a GOAWAY.
fn back_frame(rng: &mut Rng, out: &mut BytesMut, ups: &[u32]) {
    let Some(&stream) = (!ups.is_empty()).then(|| &ups[rng.below(ups.len() as u64) as usize]) else {
        return frame::put_settings(out, &[]);
    };
    match rng.below(12) {
        0..=2 => put(out, HEADERS, END_HEADERS, stream, &response_headers()),
        3..=4 => put(out, DATA, 0, stream, &message(rng)),
        5..=6 => put(
            out,
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &trailers(["0", "14", "13", "8"][rng.below(4) as usize]),
        ),
        7 => {
            let mut b = response_headers();
            hpack::encode(b"grpc-status", b"14", &mut b);
            hpack::encode(b"grpc-retry-pushback-ms", ["0", "10", "-1"][rng.below(3) as usize].as_bytes(), &mut b);
            put(out, HEADERS, END_HEADERS | END_STREAM, stream, &b);
        }
        8 => put(out, RST_STREAM, 0, stream, &[0u32, 2, 7, 8, 11][rng.below(5) as usize].to_be_bytes()),
        9 => frame::put_goaway(out, [0, stream, stream.saturating_sub(2)][rng.below(3) as usize], Reason::NoError),
        10 => {
            frame::put_settings(out, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, [0, 10, 65_535][rng.below(3) as usize])])
        }
        _ => put(
            out,
            WINDOW_UPDATE,
            0,
            if rng.chance(50) { 0 } else { stream },
            &(1 + rng.below(1 << 16) as u32).to_be_bytes(),
        ),
    }
}

/// Anything at all: any kind, flags, stream and payload.
fn junk_frame(rng: &mut Rng, out: &mut BytesMut) {
    let kind = rng.below(12) as u8;
    let flags = rng.next() as u8;
    let stream = [0, 1, 2, 3, 5, 7, (1 << 31) - 1][rng.below(7) as usize];
    put(out, kind, flags, stream, &rng.bytes(30));
}

/// A relay whose method has a retry policy, a hedging policy, or neither.
fn any_relay(rng: &mut Rng) -> (Relay<Turns>, Log) {
    // One replica, so that calls and their hedges share a connection, or more.
    let replicas = &[1, 2, 3][..1 + rng.below(3) as usize];
    let (mut r, log) = match rng.below(3) {
        0 => relay(replicas),
        1 => retrying(replicas),
        _ => hedging(replicas, 3),
    };
    if rng.chance(50) {
        r.picker.wait = Some(Duration::from_millis(300));
    }
    r.picker.timeout = rng.chance(30).then_some(Duration::from_millis(400));
    let limits = Limits {
        max_transparent_retries: rng.below(4) as usize,
        replay: [64, 64 << 10][rng.below(2) as usize],
        max_streams: 1 + rng.below(8) as u32,
        client_keepalive: rng.chance(30).then_some(Duration::from_millis(200)),
        client_ping_timeout: Duration::from_millis(400),
        keepalive: rng.chance(30).then_some(Duration::from_millis(200)),
        ..Limits::default()
    };
    (Relay::new(r.picker, limits, rng.next()), log)
}

/// Plays `events` random events on a fresh relay, then lets the client and every
/// replica go and checks that nothing is left behind.
fn play(seed: u64, events: usize) {
    let mut rng = Rng(seed | 1);
    let (mut r, log) = any_relay(&mut rng);
    let mut now = Duration::ZERO;
    // Most connections carry well-formed traffic with a little junk; some, mostly junk.
    let junk = if rng.chance(20) { 50 } else { 2 };
    let mut open = Vec::new();
    let mut buf = BytesMut::from(if rng.chance(97) { frame::PREFACE } else { b"GET / HTTP/1.1\r\n\r\n".as_slice() });
    frame::put_settings(&mut buf, &[]);
    r.client_read(&mut buf);
    for _ in 0..events {
        match rng.below(20) {
            0..=6 => {
                let mut buf = BytesMut::new();
                for _ in 0..1 + rng.below(3) {
                    match rng.chance(junk) {
                        true => junk_frame(&mut rng, &mut buf),
                        false => client_frame(&mut rng, &mut buf, &mut open),
                    }
                }
                if rng.chance(junk) {
                    buf.truncate(rng.below(buf.len() as u64 + 1) as usize); // a frame cut short
                }
                r.client_read(&mut buf);
            }
            7..=11 => {
                let backs: Vec<(u64, Vec<u32>)> =
                    r.backs.iter().map(|b| (b.id, b.streams.keys().copied().collect())).collect();
                if backs.is_empty() {
                    continue;
                }
                let (back, ups) = &backs[rng.below(backs.len() as u64) as usize];
                let mut buf = BytesMut::new();
                match rng.chance(junk) {
                    true => junk_frame(&mut rng, &mut buf),
                    false => back_frame(&mut rng, &mut buf, ups),
                }
                r.back_read(*back, &mut buf);
            }
            12 | 13 => {
                now += Duration::from_millis(rng.below(150));
                r.tick(now);
            }
            14 => {
                let nth = rng.below(4) as usize;
                let back = r.back_ids().nth(nth);
                if let Some(back) = back {
                    match rng.chance(50) {
                        true => r.back_connected(back),
                        false => r.back_lost(back),
                    }
                }
            }
            15 => {
                let n = rng.below(4) as u8;
                r.picker.replicas = (1..=n).map(addr).collect();
                r.ready_changed();
            }
            16 => {
                r.client_out().clear();
                for b in r.backs() {
                    b.out.clear();
                }
            }
            17 if rng.chance(20) => r.drain(),
            18 => r.client_unread(),
            _ => {}
        }
        assert!(r.client_out().len() < 64 << 20, "seed {seed}: the client's output grew without bound");
        let hedges = r.streams.values().filter(|s| s.hedge_of.is_some()).count();
        assert_eq!(r.hedge_count, hedges, "seed {seed}: hedges miscounted");
    }
    // Replicas that answer every stream, and time enough for any wait: a call whose
    // request is whole ends; none is stranded on a stream no replica will answer.
    r.picker.replicas = vec![addr(1), addr(2), addr(3)];
    r.ready_changed();
    for _ in 0..6 {
        // And a client that reads: every window open.
        let mut buf = BytesMut::new();
        frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]);
        frame::put_window_update(&mut buf, 0, 1 << 30);
        for &id in r.streams.keys().filter(|&&id| id % 2 == 1) {
            frame::put_window_update(&mut buf, id, 1 << 20);
        }
        r.client_read(&mut buf);
        for back in r.back_ids().collect::<Vec<_>>() {
            r.back_connected(back);
            let ups: Vec<u32> =
                r.backs.iter().filter(|b| b.id == back).flat_map(|b| b.streams.keys().copied()).collect();
            for up in ups {
                answer(&mut r, back, up, b"\0\0\0\0\0", "0");
            }
        }
        r.client_out().clear();
        now += Duration::from_secs(10);
        r.tick(now);
    }
    let stranded: Vec<u32> = r.streams.iter().filter(|(_, s)| s.client_ended && !s.local).map(|(&id, _)| id).collect();
    assert!(stranded.is_empty(), "seed {seed}: calls stranded with their request whole: {stranded:?}");
    r.client_closed();
    let backs: Vec<u64> = r.back_ids().collect();
    for back in backs {
        r.back_lost(back);
    }
    r.tick(now + Duration::from_secs(60));
    assert_eq!(r.open_calls(), 0, "seed {seed}: calls left open");
    assert!(r.streams.is_empty(), "seed {seed}: streams left: {:?}", r.streams.keys().collect::<Vec<_>>());
    assert_eq!(r.hedge_count, 0, "seed {seed}: hedges miscounted");
    assert_eq!(log.borrow().len(), r.picker.next, "seed {seed}: every attempt placed ends once: {:?}", log.borrow());
}

#[test]
fn random_frames_and_events_never_panic_loop_or_leave_a_call_behind() {
    for seed in 0..5_000u64 {
        play(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 150);
    }
}
