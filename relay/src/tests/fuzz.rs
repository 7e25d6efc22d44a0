//! The relay driven by seeded random events: frames from both sides (well-formed calls
//! and answers mixed with any kind, flags, stream id and payload), timers, lost and
//! refused connections, drains. Whatever comes, nothing panics or loops; between any
//! two events the relay's maps agree and no call is stranded; nothing reaches the
//! client on a stream after its end; once the client finishes and reads and replicas
//! answer what they were sent, every relayed call ends without a connection torn down;
//! and once the client and every replica are gone no call, hedge or wait is left.

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
            // Each relayed call has a path of its own, which names its stream.
            let path = match rng.below(3) {
                0 => "/grpc.health.v1.Health/Check".to_owned(),
                1 => "/grpc.health.v1.Health/Watch".to_owned(),
                _ => format!("/hello.HelloService/Call{id}"),
            };
            let mut block = request(&path);
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

/// What must hold between any two events: the maps agree both ways, a request is kept
/// only while no response began, every hedge is on its call's list, and every call
/// with no response is on a replica or waiting for a timer (none stranded).
fn check(r: &Relay<Turns>, seed: u64, calls: &mut std::collections::HashSet<u32>) {
    calls.extend(r.streams.iter().filter(|(_, s)| !s.local && s.hedge_of.is_none()).map(|(&id, _)| id));
    for b in &r.backs {
        for (&up, &id) in &b.streams {
            let s = r.streams.get(&id).unwrap_or_else(|| panic!("seed {seed}: back {} maps {up} to no call", b.id));
            assert_eq!((s.back, s.up_id), (b.id, up), "seed {seed}: call {id} and back {} disagree", b.id);
        }
    }
    let hedges = r.streams.values().filter(|s| s.hedge_of.is_some()).count();
    assert_eq!(r.hedge_count, hedges, "seed {seed}: hedges miscounted");
    for (&id, s) in &r.streams {
        if s.back != DETACHED && s.response == Response::None {
            let mapped = r.backs.iter().any(|b| b.id == s.back && b.streams.get(&s.up_id) == Some(&id));
            assert!(mapped, "seed {seed}: call {id} on back {} that does not know it", s.back);
            assert!(s.attempt.is_some(), "seed {seed}: call {id} on a replica with no attempt");
        }
        if s.replay.is_some() {
            assert_eq!(s.response, Response::None, "seed {seed}: call {id} keeps its request past a response");
        }
        let max = r.limits.max_transparent_retries as u32;
        assert!(s.transparent <= max, "seed {seed}: call {id} refused too often");
        if let Some(call) = s.hedge_of {
            let listed = r.streams.get(&call).and_then(|c| c.hedging.as_ref()).is_some_and(|h| h.hedges.contains(&id));
            assert!(listed, "seed {seed}: hedge {id} not on its call {call}'s list");
        } else if !s.local && s.response == Response::None && !s.client_ended {
            // Its request still coming: it may be on no replica only while it waits.
        } else if !s.local && s.response == Response::None {
            let placed = s.back != DETACHED || s.waiting.is_some() || s.backoff_until.is_some();
            assert!(placed, "seed {seed}: call {id} stranded: on no replica and waiting for nothing");
        }
    }
}

/// Every frame the client was sent since the last call, checked against the streams it
/// saw end: nothing follows a stream's end but resets.
fn client_saw(r: &mut Relay<Turns>, ended: &mut std::collections::HashSet<u32>, seed: u64) {
    let mut out = std::mem::take(r.client_out());
    for f in frames(&mut out) {
        if f.stream == 0 || f.kind == RST_STREAM {
            ended.insert(f.stream);
            continue;
        }
        if f.kind == HEADERS || f.kind == DATA {
            assert!(!ended.contains(&f.stream), "seed {seed}: the client was sent {f:?} after its stream ended");
            if f.flags & END_STREAM != 0 {
                ended.insert(f.stream);
            }
        }
    }
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
    let mut ended = std::collections::HashSet::new();
    let mut dead = std::collections::HashSet::new();
    let mut junked = std::collections::HashSet::new();
    let mut calls = std::collections::HashSet::new();
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
                    true => {
                        junked.insert(*back);
                        junk_frame(&mut rng, &mut buf)
                    }
                    false => back_frame(&mut rng, &mut buf, ups),
                }
                // What this replica reset or refused it never answers.
                for f in frames(&mut buf.clone()) {
                    match f.kind {
                        RST_STREAM => _ = dead.insert((*back, f.stream)),
                        GOAWAY => {
                            let last = frame::u31(&f.payload, 0).unwrap_or(0);
                            dead.extend(ups.iter().filter(|&&up| up > last).map(|&up| (*back, up)));
                        }
                        _ => {}
                    }
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
                // Now and then a local replica connects, which calls may wait for.
                r.picker.local_soon = rng.chance(20).then(|| Duration::from_millis(rng.below(500)));
                r.ready_changed();
            }
            16 => {
                client_saw(&mut r, &mut ended, seed);
                for b in r.backs() {
                    b.out.clear();
                }
            }
            17 if rng.chance(20) => r.drain(),
            18 => r.client_unread(),
            _ => {}
        }
        assert!(r.client_out().len() < 64 << 20, "seed {seed}: the client's output grew without bound");
        check(&r, seed, &mut calls);
        if rng.chance(70) {
            client_saw(&mut r, &mut ended, seed);
        }
    }
    // Then a client that finishes its requests and reads, and replicas that read and
    // answer what they were sent, as it stands: every relayed call ends, and no
    // connection is torn down for it.
    r.picker.replicas = vec![addr(1), addr(2), addr(3)];
    r.picker.local_soon = None;
    r.ready_changed();
    let mut buf = BytesMut::new();
    frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]);
    frame::put_window_update(&mut buf, 0, 1 << 30);
    for (&id, st) in r.streams.iter().filter(|(id, _)| *id % 2 == 1) {
        frame::put_window_update(&mut buf, id, 1 << 20);
        if !st.client_ended {
            put(&mut buf, DATA, END_STREAM, id, b"");
        }
    }
    r.client_read(&mut buf);
    let mut opened = std::collections::HashSet::new();
    for _ in 0..400 {
        client_saw(&mut r, &mut ended, seed);
        for back in r.back_ids().collect::<Vec<_>>() {
            let Some(b) = r.backs.iter().find(|b| b.id == back) else { continue }; // let go meanwhile
            let closing = b.closing;
            r.back_connected(back);
            let mut buf = BytesMut::new();
            if opened.insert(back) {
                frame::put_settings(&mut buf, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]);
                frame::put_window_update(&mut buf, 0, 1 << 30);
            }
            let b = r.backs.iter().find(|b| b.id == back).expect("listed");
            for (&up, id) in b.streams.iter().filter(|(up, _)| !dead.contains(&(back, **up))) {
                let st = &r.streams[id];
                match st.response {
                    Response::None if st.up.sent_end => {
                        put(&mut buf, HEADERS, END_HEADERS, up, &response_headers());
                        put(&mut buf, DATA, 0, up, b"\0\0\0\0\0");
                        put(&mut buf, HEADERS, END_HEADERS | END_STREAM, up, &trailers("0"));
                    }
                    Response::Headers => put(&mut buf, HEADERS, END_HEADERS | END_STREAM, up, &trailers("0")),
                    _ => {}
                }
            }
            frames(r.back_out(back).expect("listed")); // read
            r.back_read(back, &mut buf);
            let kept = closing || junked.contains(&back) || r.back_ids().any(|b| b == back);
            assert!(kept, "seed {seed}: back {back} torn down for a well-formed answer");
        }
        if r.streams.values().all(|s| s.local) {
            break;
        }
        now +=
            r.next_timer().map_or(Duration::from_millis(20), |t| t.saturating_sub(now)).min(Duration::from_millis(20));
        r.tick(now);
    }
    let open: Vec<u32> = r.streams.keys().filter(|id| !r.streams[id].local).copied().collect();
    assert!(open.is_empty(), "seed {seed}: calls that never ended: {open:?}");
    r.client_closed();
    let backs: Vec<u64> = r.back_ids().collect();
    for back in backs {
        r.back_lost(back);
    }
    r.tick(now + Duration::from_secs(60));
    assert_eq!(r.open_calls(), 0, "seed {seed}: calls left open");
    assert!(r.streams.is_empty(), "seed {seed}: streams left: {:?}", r.streams.keys().collect::<Vec<_>>());
    assert_eq!(r.hedge_count, 0, "seed {seed}: hedges miscounted");
    // Every call seen told over exactly once (and none twice that came and went
    // between two looks).
    let mut told = std::collections::HashSet::new();
    for path in r.picker.told.borrow().iter() {
        if let Some(id) = path.strip_prefix("/hello.HelloService/Call").and_then(|id| id.parse::<u32>().ok()) {
            assert!(told.insert(id), "seed {seed}: call {id} told over twice");
        }
    }
    let untold: Vec<_> = calls.difference(&told).collect();
    assert!(untold.is_empty(), "seed {seed}: calls never told over: {untold:?}");
    assert_eq!(log.borrow().len(), r.picker.next, "seed {seed}: every attempt placed ends once: {:?}", log.borrow());
}

#[test]
fn random_frames_and_events_never_panic_loop_or_leave_a_call_behind() {
    for seed in 0..5_000u64 {
        play(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 150);
    }
}
