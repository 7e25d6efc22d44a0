//! The endpoint set and the local-first round-robin picker. Pure: fed by discovery
//! updates ([`EndpointSet::apply`]) and connection events ([`EndpointSet::set_ready`]),
//! no IO, no clock.
//!
//! Picking walks a cursor over the endpoints (kept sorted by address) and takes the
//! next ready one in the best tier: local endpoints first, remote ones only when no
//! local endpoint is ready. Endpoints a call already tried are skipped while any other
//! is ready. A local endpoint that was just discovered gets [`LOCAL_GRACE`] to connect
//! before calls go remote, so a fresh balancer does not send its first calls to another
//! node only because a remote handshake finished first. Time is passed in.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

/// How long a new local endpoint's first connection is waited for.
pub const LOCAL_GRACE: Duration = Duration::from_millis(500);

/// What discovery saw: every address of the target, and which of them are local.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub all: Vec<SocketAddr>,
    pub local: Vec<SocketAddr>,
}

/// How an update changed membership, so the IO layer can open and close connections.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    addr: SocketAddr,
    local: bool,
    /// A connection is up and accepting new streams.
    ready: bool,
    /// Until when calls wait for this new endpoint's first connection (local only).
    grace_until: Option<Instant>,
}

/// Every known endpoint, with a round-robin cursor per tier.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Sorted by address, so picks are stable across identical updates.
    endpoints: Vec<Endpoint>,
    /// Index where the next search starts, per tier (local, remote).
    cursors: [usize; 2],
}

/// Where a picked endpoint sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Local,
    Remote,
}

impl EndpointSet {
    /// Replaces membership with `resolved`. Endpoints that stay keep their readiness;
    /// new ones start not ready until their connection is up.
    pub fn apply(&mut self, resolved: &Resolved, now: Instant) -> Changes {
        let mut all = resolved.all.clone();
        all.sort_unstable();
        all.dedup();
        let mut changes = Changes::default();
        for e in &self.endpoints {
            if all.binary_search(&e.addr).is_err() {
                changes.removed.push(e.addr);
            }
        }
        let old = std::mem::take(&mut self.endpoints);
        self.endpoints = all
            .into_iter()
            .map(|addr| {
                let local = resolved.local.contains(&addr);
                let (ready, grace_until) = match old.binary_search_by_key(&addr, |e| e.addr) {
                    Ok(i) => (old[i].ready, old[i].grace_until),
                    Err(_) => {
                        changes.added.push(addr);
                        (false, local.then(|| now + LOCAL_GRACE))
                    }
                };
                Endpoint { addr, local, ready, grace_until }
            })
            .collect();
        changes
    }

    /// Records a connection coming up or going away. Unknown addresses are ignored
    /// (an endpoint removed while its connection was still closing).
    pub fn set_ready(&mut self, addr: SocketAddr, ready: bool) {
        if let Ok(i) = self.endpoints.binary_search_by_key(&addr, |e| e.addr) {
            self.endpoints[i].ready = ready;
            self.endpoints[i].grace_until = None; // connected or failed: no more waiting
        }
    }

    /// Picks the next ready endpoint: local before remote, untried before tried. While
    /// no local endpoint is ready but a new one is still within its grace, picks
    /// nothing: see [`EndpointSet::grace_until`].
    pub fn pick(&mut self, tried: &[SocketAddr], now: Instant) -> Option<(SocketAddr, Tier)> {
        let fresh = |e: &Endpoint| !tried.contains(&e.addr);
        if let Some(p) = self.pick_in(Tier::Local, fresh) {
            return Some(p);
        }
        if self.grace_until(now).is_some() && !self.endpoints.iter().any(|e| e.local && e.ready) {
            return None;
        }
        self.pick_in(Tier::Remote, fresh)
            .or_else(|| self.pick_in(Tier::Local, |_| true))
            .or_else(|| self.pick_in(Tier::Remote, |_| true))
    }

    /// The latest moment a new local endpoint is still being waited for, if any.
    pub fn grace_until(&self, now: Instant) -> Option<Instant> {
        self.endpoints.iter().filter(|e| e.local).filter_map(|e| e.grace_until).filter(|t| *t > now).max()
    }

    fn pick_in(&mut self, tier: Tier, ok: impl Fn(&Endpoint) -> bool) -> Option<(SocketAddr, Tier)> {
        let n = self.endpoints.len();
        let cursor = &mut self.cursors[tier as usize];
        let start = *cursor % n.max(1);
        for step in 0..n {
            let i = (start + step) % n;
            let e = &self.endpoints[i];
            if e.ready && e.local == (tier == Tier::Local) && ok(e) {
                *cursor = i + 1;
                return Some((e.addr, tier));
            }
        }
        None
    }

    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.endpoints.binary_search_by_key(&addr, |e| e.addr).is_ok()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn ready_count(&self) -> usize {
        self.endpoints.iter().filter(|e| e.ready).count()
    }

    /// Every known address with its locality, in order.
    pub fn addrs(&self) -> impl Iterator<Item = (SocketAddr, bool)> + '_ {
        self.endpoints.iter().map(|e| (e.addr, e.local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// 1 and 2 local, 3 remote, all ready.
    fn cluster() -> EndpointSet {
        let mut set = EndpointSet::default();
        set.apply(&Resolved { all: vec![a(3), a(1), a(2)], local: vec![a(1), a(2)] }, t0());
        for n in 1..=3 {
            set.set_ready(a(n), true);
        }
        set
    }

    fn picks(set: &mut EndpointSet, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match set.pick(&[], late()).unwrap().0 {
                SocketAddr::V4(v4) => v4.ip().octets()[3],
                SocketAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn round_robins_over_locals_only() {
        let mut set = cluster();
        assert_eq!(picks(&mut set, 6), [1, 2, 1, 2, 1, 2]);
    }

    #[test]
    fn prefers_local_until_none_ready_then_fails_back() {
        let mut set = cluster();
        set.set_ready(a(1), false);
        assert_eq!(picks(&mut set, 3), [2, 2, 2]);
        set.set_ready(a(2), false);
        assert_eq!(set.pick(&[], late()), Some((a(3), Tier::Remote)));
        assert_eq!(picks(&mut set, 2), [3, 3]);
        set.set_ready(a(1), true);
        assert_eq!(picks(&mut set, 2), [1, 1]);
        set.set_ready(a(2), true);
        assert_eq!(picks(&mut set, 4), [2, 1, 2, 1]);
    }

    #[test]
    fn without_locality_round_robins_over_all() {
        let mut set = EndpointSet::default();
        set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![] }, t0());
        for n in 1..=3 {
            set.set_ready(a(n), true);
        }
        assert_eq!(picks(&mut set, 6), [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn retries_go_to_another_local_then_remote_then_anything() {
        let mut set = cluster();
        assert_eq!(set.pick(&[a(1)], late()), Some((a(2), Tier::Local)));
        assert_eq!(set.pick(&[a(1), a(2)], late()), Some((a(3), Tier::Remote)));
        let again = set.pick(&[a(1), a(2), a(3)], late());
        assert_eq!(again.map(|p| p.1), Some(Tier::Local));
    }

    #[test]
    fn new_endpoints_wait_for_their_connection() {
        let mut set = cluster();
        let ch = set.apply(&Resolved { all: vec![a(1), a(2), a(3), a(4)], local: vec![a(1), a(2), a(4)] }, t0());
        assert_eq!(ch, Changes { added: vec![a(4)], removed: vec![] });
        assert_eq!(picks(&mut set, 4), [1, 2, 1, 2]);
        set.set_ready(a(4), true);
        assert_eq!(picks(&mut set, 6), [4, 1, 2, 4, 1, 2]);
    }

    #[test]
    fn removed_endpoints_get_no_picks_and_stale_events_are_ignored() {
        let mut set = cluster();
        let ch = set.apply(&Resolved { all: vec![a(2), a(3)], local: vec![a(2)] }, t0());
        assert_eq!(ch, Changes { added: vec![], removed: vec![a(1)] });
        set.set_ready(a(1), true);
        assert!(!set.contains(a(1)));
        assert_eq!(picks(&mut set, 3), [2, 2, 2]);
        assert_eq!(set.ready_count(), 2);
    }

    #[test]
    fn nothing_ready_picks_nothing() {
        let mut set = EndpointSet::default();
        assert_eq!(set.pick(&[], late()), None);
        set.apply(&Resolved { all: vec![a(1)], local: vec![] }, t0());
        assert_eq!(set.pick(&[], late()), None);
    }

    #[test]
    fn a_new_local_endpoint_is_waited_for_before_going_remote() {
        let mut set = EndpointSet::default();
        set.apply(&Resolved { all: vec![a(1), a(3)], local: vec![a(1)] }, t0());
        set.set_ready(a(3), true); // the remote handshake finished first
        assert_eq!(set.pick(&[], t0()), None, "wait for the local one");
        assert_eq!(set.grace_until(t0()), Some(t0() + LOCAL_GRACE));
        assert_eq!(set.pick(&[], t0() + LOCAL_GRACE), Some((a(3), Tier::Remote)), "grace over: go remote");
        set.set_ready(a(1), false); // the local one failed to connect
        assert_eq!(set.grace_until(t0()), None);
        assert_eq!(set.pick(&[], t0()), Some((a(3), Tier::Remote)));
        set.set_ready(a(1), true);
        assert_eq!(set.pick(&[], t0()), Some((a(1), Tier::Local)));
    }

    #[test]
    fn locality_follows_the_local_name() {
        let mut set = cluster();
        set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(3)] }, t0());
        assert_eq!(picks(&mut set, 3), [3, 3, 3]);
    }
}
