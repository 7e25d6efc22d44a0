use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use super::*;

const SAY_HELLO: &str = "/hello.HelloService/SayHello";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

/// A fixed moment; tests move time by adding to it.
fn t0() -> Instant {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods, reason = "a fixed reference point, not a timer")]
    let t0 = *T0.get_or_init(Instant::now);
    t0
}

fn late() -> Instant {
    t0() + LOCAL_GRACE * 2
}

fn a(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 50051))
}

fn octet(addr: SocketAddr) -> u8 {
    match addr {
        SocketAddr::V4(v4) => v4.ip().octets()[3],
        SocketAddr::V6(_) => unreachable!(),
    }
}

/// 1 and 2 local, 3 remote, all ready.
fn cluster() -> EndpointSet {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(3), a(1), a(2)], local: vec![a(1), a(2)], ..Resolved::default() }, t0());
    for n in 1..=3 {
        set.set_ready(a(n), true);
    }
    set
}

/// What calls see, each endpoint's handle being its last octet.
fn snap(set: &EndpointSet) -> Snapshot<u8> {
    set.snapshot(|addr| Some(octet(addr)))
}

/// One pick of `method` as (last octet, tier); `None` when it would wait.
fn pick_of(snap: &Snapshot<u8>, cursors: &Cursors, method: &str, avoid: &[SocketAddr]) -> Option<(u8, Tier)> {
    match snap.pick(cursors, method, avoid, late()) {
        Pick::Endpoint { addr, tier, handle } => {
            assert_eq!(*handle, octet(addr), "the handle comes with its endpoint");
            Some((*handle, tier))
        }
        Pick::WaitUntil(_) | Pick::NoneReady => None,
    }
}

fn pick(snap: &Snapshot<u8>, cursors: &Cursors, avoid: &[SocketAddr]) -> Option<(u8, Tier)> {
    pick_of(snap, cursors, SAY_HELLO, avoid)
}

/// `n` picks of SayHello with nothing tried, as last octets.
fn picks(snap: &Snapshot<u8>, cursors: &Cursors, n: usize) -> Vec<u8> {
    (0..n).map(|_| pick(snap, cursors, &[]).unwrap().0).collect()
}

#[test]
fn round_robins_over_locals_only() {
    assert_eq!(picks(&snap(&cluster()), &Cursors::new(), 6), [1, 2, 1, 2, 1, 2]);
}

#[test]
fn prefers_local_until_none_ready_then_fails_back() {
    let (mut set, cursors) = (cluster(), Cursors::new());
    set.set_ready(a(1), false);
    assert_eq!(picks(&snap(&set), &cursors, 3), [2, 2, 2]);
    set.set_ready(a(2), false);
    let remote_only = snap(&set);
    assert_eq!(pick(&remote_only, &cursors, &[]), Some((3, Tier::Remote)));
    assert_eq!(picks(&remote_only, &cursors, 2), [3, 3]);
    set.set_ready(a(1), true);
    assert_eq!(picks(&snap(&set), &cursors, 2), [1, 1]);
    set.set_ready(a(2), true);
    assert_eq!(picks(&snap(&set), &cursors, 4), [2, 1, 2, 1]);
}

#[test]
fn without_locality_round_robins_over_all() {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![], ..Resolved::default() }, t0());
    for n in 1..=3 {
        set.set_ready(a(n), true);
    }
    assert_eq!(picks(&snap(&set), &Cursors::new(), 6), [1, 2, 3, 1, 2, 3]);
}

#[test]
fn retries_go_to_another_local_then_remote_then_anything() {
    let (snap, cursors) = (snap(&cluster()), Cursors::new());
    assert_eq!(pick(&snap, &cursors, &[a(1)]), Some((2, Tier::Local)));
    assert_eq!(pick(&snap, &cursors, &[a(1), a(2)]), Some((3, Tier::Remote)));
    assert_eq!(pick(&snap, &cursors, &[a(1), a(2), a(3)]), Some((1, Tier::Local)));
}

#[test]
fn a_retry_moves_the_rotation_past_its_pick() {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![], ..Resolved::default() }, t0());
    for n in 1..=3 {
        set.set_ready(a(n), true);
    }
    let (snap, cursors) = (snap(&set), Cursors::new());
    assert_eq!(picks(&snap, &cursors, 1), [1]);
    assert_eq!(pick(&snap, &cursors, &[a(2)]), Some((3, Tier::Remote)), "2 was tried: skipped");
    assert_eq!(picks(&snap, &cursors, 3), [1, 2, 3]);
}

#[test]
fn new_endpoints_wait_for_their_connection() {
    let (mut set, cursors) = (cluster(), Cursors::new());
    let ch = set.apply(
        &Resolved { all: vec![a(1), a(2), a(3), a(4)], local: vec![a(1), a(2), a(4)], ..Resolved::default() },
        t0(),
    );
    assert_eq!(ch, Changes { added: vec![a(4)], removed: vec![] });
    assert_eq!(picks(&snap(&set), &cursors, 4), [1, 2, 1, 2]);
    set.set_ready(a(4), true);
    assert_eq!(picks(&snap(&set), &cursors, 6), [4, 1, 2, 4, 1, 2]);
}

#[test]
fn removed_endpoints_get_no_picks_and_stale_events_are_ignored() {
    let mut set = cluster();
    let ch = set.apply(&Resolved { all: vec![a(2), a(3)], local: vec![a(2)], ..Resolved::default() }, t0());
    assert_eq!(ch, Changes { added: vec![], removed: vec![a(1)] });
    set.set_ready(a(1), true);
    assert!(!set.contains(a(1)));
    assert_eq!(picks(&snap(&set), &Cursors::new(), 3), [2, 2, 2]);
    assert_eq!((set.len(), set.ready_count()), (2, 2));
    assert_eq!(set.addrs().collect::<Vec<_>>(), [(a(2), Tier::Local), (a(3), Tier::Remote)]);
}

#[test]
fn nothing_ready_picks_nothing() {
    let cursors = Cursors::new();
    assert_eq!(Snapshot::<u8>::default().pick(&cursors, SAY_HELLO, &[], late()), Pick::NoneReady);
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1)], local: vec![], ..Resolved::default() }, t0());
    assert_eq!(snap(&set).pick(&cursors, SAY_HELLO, &[], late()), Pick::NoneReady);
}

#[test]
fn endpoints_without_a_handle_are_left_out() {
    let mut set = cluster();
    set.set_ready(a(3), false);
    let mut asked = Vec::new();
    let snap = set.snapshot(|addr| {
        asked.push(addr);
        (addr != a(1)).then(|| octet(addr))
    });
    assert_eq!(asked, [a(1), a(2)], "asked once per ready endpoint, in order");
    assert_eq!(picks(&snap, &Cursors::new(), 3), [2, 2, 2]);
}

#[test]
fn a_new_local_endpoint_is_waited_for_before_going_remote() {
    let cursors = Cursors::new();
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(3)], local: vec![a(1)], ..Resolved::default() }, t0());
    set.set_ready(a(3), true); // the remote handshake finished first
    let waiting = snap(&set);
    let grace = t0() + LOCAL_GRACE;
    assert_eq!(waiting.pick(&cursors, SAY_HELLO, &[], t0()), Pick::WaitUntil(grace), "wait for the local one");
    assert_eq!(set.grace_until(t0()), Some(grace));
    let over = waiting.pick(&cursors, SAY_HELLO, &[], grace);
    assert_eq!(over, Pick::Endpoint { addr: a(3), tier: Tier::Remote, handle: &3 }, "grace over: go remote");
    set.set_ready(a(1), false); // the local one failed to connect
    assert_eq!(set.grace_until(t0()), None);
    assert_eq!(snap(&set).pick(&cursors, SAY_HELLO, &[], t0()), over);
    set.set_ready(a(1), true);
    let local = Pick::Endpoint { addr: a(1), tier: Tier::Local, handle: &1 };
    assert_eq!(snap(&set).pick(&cursors, SAY_HELLO, &[], t0()), local);
}

#[test]
fn locality_follows_the_local_name() {
    let mut set = cluster();
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(3)], ..Resolved::default() }, t0());
    assert_eq!(picks(&snap(&set), &Cursors::new(), 3), [3, 3, 3]);
}

#[test]
fn each_method_round_robins_on_its_own() {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(1), a(2), a(3)], ..Resolved::default() }, t0());
    for n in 1..=3 {
        set.set_ready(a(n), true);
    }
    let (snap, cursors) = (snap(&set), Cursors::new());
    let (mut hello, mut health) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        hello.push(pick_of(&snap, &cursors, SAY_HELLO, &[]).unwrap().0);
        health.push(pick_of(&snap, &cursors, HEALTH, &[]).unwrap().0);
        hello.push(pick_of(&snap, &cursors, SAY_HELLO, &[]).unwrap().0);
    }
    assert_eq!(hello, [1, 2, 3, 1, 2, 3]);
    assert_eq!(health, [1, 2, 3]);
}

#[test]
fn the_grpcurl_loop_spreads_say_hello_evenly() {
    let (snap, cursors) = (snap(&cluster()), Cursors::new());
    let (mut reflection, mut hello) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        reflection.push(pick_of(&snap, &cursors, REFLECTION, &[]).unwrap().0);
        hello.push(pick_of(&snap, &cursors, SAY_HELLO, &[]).unwrap().0);
    }
    assert_eq!(hello, [1, 2].repeat(10), "10 calls each, not 20 on one replica");
    assert_eq!(reflection, [1, 2].repeat(10));
}

#[test]
fn the_rotation_survives_a_snapshot_swap() {
    let (mut set, cursors) = (cluster(), Cursors::new());
    assert_eq!(picks(&snap(&set), &cursors, 3), [1, 2, 1]);
    assert_eq!(picks(&snap(&set), &cursors, 3), [2, 1, 2], "same endpoints: goes on");
    set.apply(
        &Resolved { all: vec![a(1), a(2), a(3), a(4)], local: vec![a(1), a(2), a(4)], ..Resolved::default() },
        t0(),
    );
    set.set_ready(a(4), true);
    assert_eq!(picks(&snap(&set), &cursors, 6), [4, 1, 2, 4, 1, 2], "one added: joins in turn");
}

#[test]
fn concurrent_picks_spread_exactly_evenly() {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(1), a(2), a(3)], ..Resolved::default() }, t0());
    for n in 1..=3 {
        set.set_ready(a(n), true);
    }
    // The handle is what the IO side would use: shared and cheap to clone.
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let snap = set.snapshot(|addr| Some(counts[usize::from(octet(addr)) - 1].clone()));
    let cursors = Cursors::new();
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..300 {
                    let method = if i % 2 == 0 { SAY_HELLO } else { HEALTH };
                    let Pick::Endpoint { handle, .. } = snap.pick(&cursors, method, &[], late()) else {
                        panic!("three endpoints are ready");
                    };
                    handle.clone().fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let counts: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(counts, [400, 400, 400], "600 picks of each method over 3 endpoints");
}

#[test]
fn excluded_endpoints_are_never_picked_and_do_not_hide_free_ones() {
    let set = cluster();
    let cursors = Cursors::new();
    let s = snap(&set);
    let c = Constraints { avoid: &[a(1), a(2)], exclude: &[a(1)], may_wait: true };
    // 1 is excluded and 2 was tried: the untried remote 3, every time.
    for _ in 0..3 {
        match s.pick_with(&cursors, SAY_HELLO, &c, late()) {
            Pick::Endpoint { addr, .. } => assert_eq!(addr, a(3), "untried remote before tried local"),
            other => panic!("{other:?}"),
        }
    }
    let c = Constraints { avoid: &[a(1), a(2), a(3)], exclude: &[a(1), a(3)], may_wait: true };
    assert!(matches!(s.pick_with(&cursors, SAY_HELLO, &c, late()), Pick::Endpoint { addr, .. } if addr == a(2)));
    let c = Constraints { avoid: &[], exclude: &[a(1), a(2), a(3)], may_wait: true };
    assert_eq!(s.pick_with(&cursors, SAY_HELLO, &c, late()), Pick::NoneReady);
}

#[test]
fn a_caller_that_cannot_wait_skips_the_local_grace() {
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(1), a(3)], local: vec![a(1)], ..Resolved::default() }, t0());
    set.set_ready(a(3), true);
    let cursors = Cursors::new();
    let s = snap(&set);
    let waiting = Constraints { may_wait: true, ..Constraints::default() };
    assert!(matches!(s.pick_with(&cursors, SAY_HELLO, &waiting, t0()), Pick::WaitUntil(_)));
    let hurried = Constraints { may_wait: false, ..Constraints::default() };
    assert!(matches!(s.pick_with(&cursors, SAY_HELLO, &hurried, t0()), Pick::Endpoint { addr, .. } if addr == a(3)));
}

// Failover showed calls waiting up to 500 ms for restarted local replicas while the
// remote one served: the grace is for a balancer's start, not for failback.
#[test]
fn a_local_endpoint_found_after_the_start_gets_no_grace() {
    let cursors = Cursors::new();
    let mut set = EndpointSet::default();
    set.apply(&Resolved { all: vec![a(3)], local: vec![], ..Resolved::default() }, t0());
    set.set_ready(a(3), true); // serving from the remote node
    set.apply(&Resolved { all: vec![a(1), a(3)], local: vec![a(1)], ..Resolved::default() }, t0());
    assert_eq!(set.grace_until(t0()), None);
    let remote = Pick::Endpoint { addr: a(3), tier: Tier::Remote, handle: &3 };
    assert_eq!(snap(&set).pick(&cursors, SAY_HELLO, &[], t0()), remote, "no wait: go remote now");
    set.set_ready(a(1), true);
    let local = Pick::Endpoint { addr: a(1), tier: Tier::Local, handle: &1 };
    assert_eq!(snap(&set).pick(&cursors, SAY_HELLO, &[], t0()), local, "and back as soon as it connects");
}

#[test]
fn ejected_endpoints_take_no_calls_per_tier_unless_every_ready_one_is_ejected() {
    let (mut set, cursors) = (cluster(), Cursors::new());
    set.set_ejected(a(1), true);
    assert_eq!(picks(&snap(&set), &cursors, 3), [2, 2, 2], "1 ejected: 2 takes the local share");
    set.set_ejected(a(2), true);
    assert_eq!(picks(&snap(&set), &cursors, 2), [3, 3], "every local ejected: fail over to remote");
    set.set_ejected(a(3), true);
    assert_eq!(picks(&snap(&set), &cursors, 4), [2, 1, 2, 1], "all ejected: panic mode, the locals again");
    set.set_ejected(a(1), false);
    assert_eq!(picks(&snap(&set), &cursors, 2), [1, 1], "one back: it takes the calls");
    set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(1), a(2)], ..Resolved::default() }, t0());
    assert_eq!(picks(&snap(&set), &cursors, 2), [1, 1], "ejection survives a discovery update");
}

/// 1 on this node, 2 and 3 in this zone on other nodes, 4 and 5 elsewhere.
fn zoned(terminating: Vec<SocketAddr>) -> EndpointSet {
    let mut set = EndpointSet::default();
    let resolved = Resolved { all: (1..=5).map(a).collect(), local: vec![a(1)], zone: vec![a(2), a(3)], terminating };
    set.apply(&resolved, t0());
    for n in 1..=5 {
        set.set_ready(a(n), true);
    }
    set
}

fn fresh_picks(set: &EndpointSet, n: usize) -> Vec<(u8, Tier)> {
    let (s, cursors) = (snap(set), Cursors::new());
    (0..n).map(|_| pick_of(&s, &cursors, SAY_HELLO, &[]).unwrap()).collect()
}

#[test]
fn the_node_first_then_the_zone_then_the_rest() {
    let mut set = zoned(vec![]);
    assert_eq!(fresh_picks(&set, 3), [(1, Tier::Local); 3]);
    set.set_ready(a(1), false);
    assert_eq!(fresh_picks(&set, 4), [(2, Tier::Zone), (3, Tier::Zone), (2, Tier::Zone), (3, Tier::Zone)]);
    set.set_ready(a(2), false);
    set.set_ready(a(3), false);
    assert_eq!(fresh_picks(&set, 3), [(4, Tier::Remote), (5, Tier::Remote), (4, Tier::Remote)]);
    set.set_ready(a(1), true);
    assert_eq!(fresh_picks(&set, 2), [(1, Tier::Local); 2], "failback to the node");
}

#[test]
fn a_retry_avoids_what_it_tried_in_tier_order() {
    let set = zoned(vec![]);
    let (s, cursors) = (snap(&set), Cursors::new());
    assert_eq!(pick_of(&s, &cursors, SAY_HELLO, &[a(1)]), Some((2, Tier::Zone)));
    assert_eq!(pick_of(&s, &cursors, SAY_HELLO, &[a(1), a(2), a(3)]), Some((4, Tier::Remote)));
    let everything: Vec<_> = (1..=5).map(a).collect();
    assert_eq!(pick_of(&s, &cursors, SAY_HELLO, &everything), Some((1, Tier::Local)), "all tried: local again");
}

#[test]
fn terminating_endpoints_take_calls_only_when_their_tier_has_nothing_else() {
    // 1 (the only local) drains: it keeps the traffic local while nothing else is here.
    let set = zoned(vec![a(1)]);
    assert_eq!(fresh_picks(&set, 2), [(1, Tier::Local); 2]);
    // 2 drains beside a ready 3 in the zone: 3 takes every call.
    let mut set = zoned(vec![a(1), a(2)]);
    set.set_ready(a(1), false);
    assert_eq!(fresh_picks(&set, 3), [(3, Tier::Zone); 3]);
    assert!(set.is_terminating(a(2)) && !set.is_terminating(a(3)));
    // A replacement for 1 becomes ready: it takes the node's calls, 1 none.
    let mut set = EndpointSet::default();
    let resolved = Resolved { all: vec![a(1), a(6)], local: vec![a(1), a(6)], zone: vec![], terminating: vec![a(1)] };
    set.apply(&resolved, t0());
    set.set_ready(a(1), true);
    assert_eq!(fresh_picks(&set, 2), [(1, Tier::Local); 2]);
    set.set_ready(a(6), true);
    assert_eq!(fresh_picks(&set, 3), [(6, Tier::Local); 3]);
}
