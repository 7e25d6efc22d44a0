//! The endpoint set and the local-first round-robin picker. Pure: no IO, no clock, no
//! lock. One owner feeds the [`EndpointSet`] discovery updates and connection events and
//! publishes an immutable [`Snapshot`] after each change; calls pick from it at once.
//!
//! # Rules
//! - Local endpoints (this node) first; then those in this zone, when discovery knows
//!   zones (Kubernetes); remote ones only when neither has a ready endpoint.
//! - Endpoints discovery says are terminating but still serving (a pod draining) take
//!   calls only when their tier has no other ready endpoint, as kube-proxy does: a
//!   rolling update of the last local replica keeps its traffic local while it drains.
//! - Round-robin per method: each method path has its own cursor per tier in [`Cursors`],
//!   so one method's calls spread evenly whatever other methods interleave. The cursors
//!   outlive snapshots, so publishing a new snapshot does not restart the rotation.
//! - Endpoints a call already tried are skipped while any other is ready: untried local,
//!   untried remote, then tried local, tried remote.
//! - While the balancer starts (no endpoint has been ready yet), a local endpoint gets
//!   [`LOCAL_GRACE`] to connect before calls go remote, so a fresh balancer does not send
//!   its first calls to another node only because a remote handshake finished first:
//!   while no local endpoint is ready and one is within its grace, [`Snapshot::pick`]
//!   answers [`Pick::WaitUntil`]. A local endpoint found later (a replica restarted
//!   after a failover) gets none: calls keep going remote until it connects. The grace
//!   ends at the first [`EndpointSet::set_ready`] for the endpoint, so a caller with
//!   health checking records none until the first health answer.
//! - Endpoints outlier detection ejected ([`EndpointSet::set_ejected`]) take no calls, per
//!   tier, unless every ready endpoint is ejected: then they all do (panic mode).
//! - Endpoints are kept in address order, so identical updates give identical rotations.
//!
//! # Call order
//! [`EndpointSet::apply`] on each discovery answer (open and close connections for the
//! [`Changes`]), [`EndpointSet::set_ready`] when a connection comes up or goes away, then
//! [`EndpointSet::snapshot`] to publish; every call: [`Snapshot::pick`] on the latest
//! snapshot with the one [`Cursors`] kept for the set's lifetime. Time is passed in.

mod cursors;
mod snapshot;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

pub use cursors::Cursors;
pub use snapshot::{Constraints, Pick, Snapshot};

/// How long a new local endpoint's first connection is waited for.
pub const LOCAL_GRACE: Duration = Duration::from_millis(500);

/// What discovery saw: every address of the target, which of them are local or in this
/// zone, and which are terminating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Every address of the target, local ones included.
    pub all: Vec<SocketAddr>,
    /// The addresses on this node; those not also in `all` are ignored.
    pub local: Vec<SocketAddr>,
    /// The addresses in this zone on other nodes (local ones win).
    pub zone: Vec<SocketAddr>,
    /// Addresses terminating but still serving: a fallback within their tier.
    pub terminating: Vec<SocketAddr>,
}

impl Resolved {
    /// Where `addr` sits.
    pub fn tier(&self, addr: &SocketAddr) -> Tier {
        if self.local.contains(addr) {
            Tier::Local
        } else if self.zone.contains(addr) {
            Tier::Zone
        } else {
            Tier::Remote
        }
    }
}

/// How an update changed membership, so the IO layer can open and close connections.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New endpoints, in address order: open a connection to each.
    pub added: Vec<SocketAddr>,
    /// Endpoints gone, in address order: close their connections.
    pub removed: Vec<SocketAddr>,
}

/// Where an endpoint sits: on this node, in this zone, or elsewhere; in that order of
/// preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// On this node (an address of the local name).
    Local,
    /// On another node in this zone: picked only when no local endpoint is ready.
    Zone,
    /// Elsewhere: picked only when no local or zone endpoint is ready.
    Remote,
}

impl Tier {
    /// Every tier, in order of preference.
    pub const ALL: [Tier; 3] = [Tier::Local, Tier::Zone, Tier::Remote];

    /// `local`, `zone` or `remote`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Zone => "zone",
            Tier::Remote => "remote",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    addr: SocketAddr,
    tier: Tier,
    /// Discovery says it is terminating (still serving): a fallback in its tier.
    terminating: bool,
    /// A connection is up and accepting new streams.
    ready: bool,
    /// Until when calls wait for this new endpoint's first connection (local only).
    grace_until: Option<Instant>,
    /// Outlier detection took it out of rotation; it keeps its connection.
    ejected: bool,
}

/// Every known endpoint with its locality and readiness. Owned by one task; calls pick
/// from the [`Snapshot`]s it publishes.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Sorted by address, so picks are stable across identical updates.
    endpoints: Vec<Endpoint>,
    /// Some endpoint has been ready: the balancer is past its start, and a local
    /// endpoint found later gets no grace (calls already have somewhere to go).
    started: bool,
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
                let tier = resolved.tier(&addr);
                let terminating = resolved.terminating.contains(&addr);
                let (ready, grace_until) = match old.binary_search_by_key(&addr, |e| e.addr) {
                    Ok(i) => (old[i].ready, old[i].grace_until),
                    Err(_) => {
                        changes.added.push(addr);
                        (false, (tier == Tier::Local && !self.started).then(|| now + LOCAL_GRACE))
                    }
                };
                let ejected = old.binary_search_by_key(&addr, |e| e.addr).is_ok_and(|i| old[i].ejected);
                Endpoint { addr, tier, terminating, ready, grace_until, ejected }
            })
            .collect();
        changes
    }

    /// Outlier detection ejected `addr`, or let it back. Unknown addresses are ignored.
    pub fn set_ejected(&mut self, addr: SocketAddr, ejected: bool) {
        if let Ok(i) = self.endpoints.binary_search_by_key(&addr, |e| e.addr) {
            self.endpoints[i].ejected = ejected;
        }
    }

    /// Records a connection coming up or going away. Unknown addresses are ignored
    /// (an endpoint removed while its connection was still closing).
    pub fn set_ready(&mut self, addr: SocketAddr, ready: bool) {
        if let Ok(i) = self.endpoints.binary_search_by_key(&addr, |e| e.addr) {
            self.endpoints[i].ready = ready;
            self.endpoints[i].grace_until = None; // connected or failed: no more waiting
            self.started |= ready;
        }
    }

    /// What calls can pick from now: each ready endpoint for which `handle` (the IO
    /// side's connection) returns `Some`, with that handle. `handle` is called once per
    /// ready endpoint, in address order.
    pub fn snapshot<T>(&self, mut handle: impl FnMut(SocketAddr) -> Option<T>) -> Snapshot<T> {
        let mut tiers = [Vec::new(), Vec::new(), Vec::new()];
        // Ejected endpoints take no calls, per tier (ejecting every local one fails over
        // to remote ones), unless every ready endpoint is ejected: then all take calls
        // rather than none (Envoy's panic mode).
        let panic = !self.endpoints.iter().any(|e| e.ready && !e.ejected);
        let usable = |e: &&Endpoint| e.ready && (panic || !e.ejected);
        for tier in Tier::ALL {
            let in_tier = || self.endpoints.iter().filter(move |e| e.tier == tier).filter(usable);
            // Terminating endpoints only when the tier has nothing else.
            let fallback = !in_tier().any(|e| !e.terminating);
            for e in in_tier().filter(|e| fallback || !e.terminating) {
                if let Some(h) = handle(e.addr) {
                    tiers[tier as usize].push((e.addr, h));
                }
            }
        }
        Snapshot::new(tiers, self.last_grace())
    }

    /// The latest moment a new local endpoint is still being waited for, if any.
    pub fn grace_until(&self, now: Instant) -> Option<Instant> {
        self.last_grace().filter(|t| *t > now)
    }

    fn last_grace(&self) -> Option<Instant> {
        self.endpoints.iter().filter(|e| e.tier == Tier::Local).filter_map(|e| e.grace_until).max()
    }

    /// Whether `addr` is a current member.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.endpoints.binary_search_by_key(&addr, |e| e.addr).is_ok()
    }

    /// How many endpoints are known, ready or not.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// No endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// How many endpoints have a connection up, for health reporting.
    pub fn ready_count(&self) -> usize {
        self.endpoints.iter().filter(|e| e.ready).count()
    }

    /// Every known address with its tier, in order.
    pub fn addrs(&self) -> impl Iterator<Item = (SocketAddr, Tier)> + '_ {
        self.endpoints.iter().map(|e| (e.addr, e.tier))
    }

    /// Whether discovery says `addr` is terminating.
    pub fn is_terminating(&self, addr: SocketAddr) -> bool {
        self.endpoints.binary_search_by_key(&addr, |e| e.addr).is_ok_and(|i| self.endpoints[i].terminating)
    }
}

#[cfg(test)]
mod tests;
