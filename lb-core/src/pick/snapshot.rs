//! The immutable view calls pick from: the ready endpoints of one moment with the IO
//! side's handles. Shared by concurrent callers; replaced whole, never changed.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use super::{Cursors, Tier};

/// The ready endpoints, per tier in address order, each with its handle `T` (the IO
/// side's connection, cheap to clone); built by
/// [`EndpointSet::snapshot`](super::EndpointSet::snapshot).
#[derive(Debug)]
pub struct Snapshot<T> {
    /// Indexed by [`Tier`]: the local list, the zone one, then the remote one.
    tiers: [Vec<(SocketAddr, T)>; 3],
    /// When the last new local endpoint stops being waited for; may be past already,
    /// as nothing publishes a new snapshot when it passes.
    grace_until: Option<Instant>,
}

/// What [`Snapshot::pick`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick<'a, T> {
    /// Send the call here.
    Endpoint {
        /// The endpoint's address, for `avoid` on a later attempt and for errors.
        addr: SocketAddr,
        /// Whether the call stays on this node, in this zone, or goes elsewhere.
        tier: Tier,
        /// The handle given to [`EndpointSet::snapshot`](super::EndpointSet::snapshot).
        handle: &'a T,
    },
    /// No local endpoint is ready but a new one is still connecting: pick again on the
    /// next snapshot or at this moment, when calls go remote.
    WaitUntil(Instant),
    /// No endpoint is ready: pick again on the next snapshot.
    NoneReady,
}

impl<T> Snapshot<T> {
    pub(super) fn new(tiers: [Vec<(SocketAddr, T)>; 3], grace_until: Option<Instant>) -> Snapshot<T> {
        Snapshot { tiers, grace_until }
    }

    /// The next endpoint for a call of `method` (its path, e.g. `/pkg.Service/Method`)
    /// that already went to the endpoints in `avoid`, by the module's rules; `now` ends
    /// the wait for a new local endpoint.
    pub fn pick(&self, cursors: &Cursors, method: &str, avoid: &[SocketAddr], now: Instant) -> Pick<'_, T> {
        self.pick_with(cursors, method, &Constraints { avoid, exclude: &[], may_wait: true }, now)
    }

    /// [`Snapshot::pick`] with endpoints never to pick (`exclude`: a hedge's siblings in
    /// flight), and, for callers that cannot wait (`may_wait: false`), no waiting for a
    /// new local endpoint's grace: they go remote at once.
    pub fn pick_with(&self, cursors: &Cursors, method: &str, c: &Constraints<'_>, now: Instant) -> Pick<'_, T> {
        let allowed = |addr: &SocketAddr| !c.exclude.contains(addr);
        let untried = |addr: &SocketAddr| allowed(addr) && !c.avoid.contains(addr);
        let slot = cursors.slot(method);
        let first = |ok: &dyn Fn(&SocketAddr) -> bool, tiers: &[Tier]| {
            tiers.iter().find_map(|&tier| self.pick_in(tier, slot, ok))
        };
        if let Some(p) = first(&untried, &[Tier::Local]) {
            return p;
        }
        if c.may_wait
            && self.tiers[Tier::Local as usize].is_empty()
            && let Some(grace) = self.grace_until.filter(|t| *t > now)
        {
            return Pick::WaitUntil(grace);
        }
        first(&untried, &[Tier::Zone, Tier::Remote]).or_else(|| first(&allowed, &Tier::ALL)).unwrap_or(Pick::NoneReady)
    }

    /// The first endpoint of `tier` that is `ok`, from the slot's cursor on, leaving the
    /// cursor just past it. A compare-and-swap rather than an add, so the cursor marks the
    /// position picked even when tried endpoints were skipped, and a new snapshot goes on
    /// from that position: an endpoint added after it comes next. Lock-free: a call that
    /// loses the race to another tries again from where that one left the cursor.
    fn pick_in(&self, tier: Tier, slot: &[AtomicUsize; 3], ok: &dyn Fn(&SocketAddr) -> bool) -> Option<Pick<'_, T>> {
        let endpoints = &self.tiers[tier as usize];
        let cursor = &slot[tier as usize];
        let n = endpoints.len();
        // Relaxed: the cursor orders only itself; the endpoints came with the snapshot.
        let mut current = cursor.load(Ordering::Relaxed);
        loop {
            let start = current % n.max(1);
            let i = (0..n).map(|step| (start + step) % n).find(|&i| ok(&endpoints[i].0))?;
            match cursor.compare_exchange_weak(current, i + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(Pick::Endpoint { addr: endpoints[i].0, tier, handle: &endpoints[i].1 }),
                Err(now_there) => current = now_there,
            }
        }
    }
}

/// What a pick must respect besides locality and the rotation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Constraints<'a> {
    /// Endpoints the call already tried: others first, while any is ready.
    pub avoid: &'a [SocketAddr],
    /// Endpoints never to pick.
    pub exclude: &'a [SocketAddr],
    /// Whether the caller may wait for a new local endpoint's grace.
    pub may_wait: bool,
}

impl<T> Default for Snapshot<T> {
    /// Nothing ready and nothing waited for: what calls see before discovery answers.
    fn default() -> Snapshot<T> {
        Snapshot::new([Vec::new(), Vec::new(), Vec::new()], None)
    }
}
