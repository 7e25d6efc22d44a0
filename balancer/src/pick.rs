//! The endpoint set and the local-first round-robin picker. Pure: fed by discovery
//! updates ([`EndpointSet::apply`]) and connection events ([`EndpointSet::set_ready`]),
//! no IO, no clock.
//!
//! Picking walks a cursor over the endpoints (kept sorted by address) and takes the
//! next ready one in the best tier: local endpoints first, remote ones only when no
//! local endpoint is ready. Endpoints a call already tried are skipped while any other
//! is ready.

use std::net::SocketAddr;

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
    pub fn apply(&mut self, resolved: &Resolved) -> Changes {
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
                let ready = match old.binary_search_by_key(&addr, |e| e.addr) {
                    Ok(i) => old[i].ready,
                    Err(_) => {
                        changes.added.push(addr);
                        false
                    }
                };
                Endpoint { addr, local: resolved.local.contains(&addr), ready }
            })
            .collect();
        changes
    }

    /// Records a connection coming up or going away. Unknown addresses are ignored
    /// (an endpoint removed while its connection was still closing).
    pub fn set_ready(&mut self, addr: SocketAddr, ready: bool) {
        if let Ok(i) = self.endpoints.binary_search_by_key(&addr, |e| e.addr) {
            self.endpoints[i].ready = ready;
        }
    }

    /// Picks the next ready endpoint: local before remote, untried before tried.
    pub fn pick(&mut self, tried: &[SocketAddr]) -> Option<(SocketAddr, Tier)> {
        let fresh = |e: &Endpoint| !tried.contains(&e.addr);
        self.pick_in(Tier::Local, fresh)
            .or_else(|| self.pick_in(Tier::Remote, fresh))
            .or_else(|| self.pick_in(Tier::Local, |_| true))
            .or_else(|| self.pick_in(Tier::Remote, |_| true))
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

    fn a(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 50051))
    }

    /// 1 and 2 local, 3 remote, all ready.
    fn cluster() -> EndpointSet {
        let mut set = EndpointSet::default();
        set.apply(&Resolved { all: vec![a(3), a(1), a(2)], local: vec![a(1), a(2)] });
        for n in 1..=3 {
            set.set_ready(a(n), true);
        }
        set
    }

    fn picks(set: &mut EndpointSet, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match set.pick(&[]).unwrap().0 {
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
        assert_eq!(set.pick(&[]), Some((a(3), Tier::Remote)));
        assert_eq!(picks(&mut set, 2), [3, 3]);
        set.set_ready(a(1), true);
        assert_eq!(picks(&mut set, 2), [1, 1]);
        set.set_ready(a(2), true);
        assert_eq!(picks(&mut set, 4), [2, 1, 2, 1]);
    }

    #[test]
    fn without_locality_round_robins_over_all() {
        let mut set = EndpointSet::default();
        set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![] });
        for n in 1..=3 {
            set.set_ready(a(n), true);
        }
        assert_eq!(picks(&mut set, 6), [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn retries_go_to_another_local_then_remote_then_anything() {
        let mut set = cluster();
        assert_eq!(set.pick(&[a(1)]), Some((a(2), Tier::Local)));
        assert_eq!(set.pick(&[a(1), a(2)]), Some((a(3), Tier::Remote)));
        let again = set.pick(&[a(1), a(2), a(3)]);
        assert_eq!(again.map(|p| p.1), Some(Tier::Local));
    }

    #[test]
    fn new_endpoints_wait_for_their_connection() {
        let mut set = cluster();
        let ch = set.apply(&Resolved { all: vec![a(1), a(2), a(3), a(4)], local: vec![a(1), a(2), a(4)] });
        assert_eq!(ch, Changes { added: vec![a(4)], removed: vec![] });
        assert_eq!(picks(&mut set, 4), [1, 2, 1, 2]);
        set.set_ready(a(4), true);
        assert_eq!(picks(&mut set, 6), [4, 1, 2, 4, 1, 2]);
    }

    #[test]
    fn removed_endpoints_get_no_picks_and_stale_events_are_ignored() {
        let mut set = cluster();
        let ch = set.apply(&Resolved { all: vec![a(2), a(3)], local: vec![a(2)] });
        assert_eq!(ch, Changes { added: vec![], removed: vec![a(1)] });
        set.set_ready(a(1), true);
        assert!(!set.contains(a(1)));
        assert_eq!(picks(&mut set, 3), [2, 2, 2]);
        assert_eq!(set.ready_count(), 2);
    }

    #[test]
    fn nothing_ready_picks_nothing() {
        let mut set = EndpointSet::default();
        assert_eq!(set.pick(&[]), None);
        set.apply(&Resolved { all: vec![a(1)], local: vec![] });
        assert_eq!(set.pick(&[]), None);
    }

    #[test]
    fn locality_follows_the_local_name() {
        let mut set = cluster();
        set.apply(&Resolved { all: vec![a(1), a(2), a(3)], local: vec![a(3)] });
        assert_eq!(picks(&mut set, 3), [3, 3, 3]);
    }
}
