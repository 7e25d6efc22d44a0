//! Round-robin positions per method, shared by every snapshot of one endpoint set.
//! Lock-free (one atomic per method and tier) and of fixed size, whatever paths clients
//! send.

use std::sync::atomic::AtomicUsize;

/// log2 of [`Cursors::SLOTS`].
const SLOT_BITS: u32 = 8;

/// Where the next pick of each method starts, per tier. Keep one for the endpoint set's
/// lifetime and pass it to every [`Snapshot::pick`](super::Snapshot::pick), so a new
/// snapshot continues the rotation.
///
/// A method path is hashed to one of [`Cursors::SLOTS`] slots, each holding a cursor
/// per tier, so memory stays 6 KiB (on 64-bit) however many distinct paths arrive. The
/// hash is fixed (FNV-1a, not seeded), so rotations repeat from run to run. The
/// trade-off: two methods that share a slot share its cursors and interleave as every
/// method did with one cursor; each still reaches every endpoint, but a strict
/// alternation of the two can pin each to one endpoint. With 256 slots a service of 10
/// methods has no shared slot about 5 times in 6; the paths a grpcurl run makes
/// (reflection v1 and v1alpha, health, SayHello) all have their own.
pub struct Cursors {
    /// Indexed by [`slot_index`], then by [`Tier`](super::Tier). Each value is the
    /// position, in a snapshot's list of that tier, just after the endpoint last picked.
    slots: [[AtomicUsize; 3]; Cursors::SLOTS],
}

impl Cursors {
    /// How many slots method paths are hashed to.
    pub const SLOTS: usize = 1 << SLOT_BITS;

    /// Every rotation starting at the first endpoint.
    pub const fn new() -> Cursors {
        Cursors { slots: [const { [const { AtomicUsize::new(0) }; 3] }; Cursors::SLOTS] }
    }

    /// The cursors of `method`, indexed by [`Tier`](super::Tier).
    pub(super) fn slot(&self, method: &str) -> &[AtomicUsize; 3] {
        &self.slots[slot_index(method)]
    }
}

impl std::fmt::Debug for Cursors {
    /// Not the 512 positions: nothing to read in them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursors").field("slots", &Cursors::SLOTS).finish_non_exhaustive()
    }
}

impl Default for Cursors {
    fn default() -> Cursors {
        Cursors::new()
    }
}

/// FNV-1a (64-bit) of the path, keeping its top bits: a multiply mixes upwards, so they
/// depend on every byte more evenly than the bottom ones.
fn slot_index(method: &str) -> usize {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = method.bytes().fold(OFFSET_BASIS, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash >> (u64::BITS - SLOT_BITS)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paths_of_a_grpcurl_run_get_distinct_slots() {
        let slots: Vec<usize> = [
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/hello.HelloService/SayHello",
            "/grpc.health.v1.Health/Check",
        ]
        .into_iter()
        .map(slot_index)
        .collect();
        assert_eq!(slots, [18, 57, 251, 89]);
    }

    #[test]
    fn any_path_maps_into_the_fixed_slots() {
        let long = "/x".repeat(10_000);
        for path in ["", "/", "/a.B/C", long.as_str(), "/ünïcode.Svc/Mëthod"] {
            assert!(slot_index(path) < Cursors::SLOTS, "{path:.20}");
        }
        assert_eq!(size_of::<Cursors>(), Cursors::SLOTS * 3 * size_of::<usize>());
    }
}
