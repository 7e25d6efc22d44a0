//! The picker alone: nanoseconds per pick from the published snapshot (what calls do
//! now, no lock) against the same pick behind one global mutex (what every call did
//! before), on one thread and on two threads picking at once.

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{Barrier, Mutex},
    time::Duration,
};

use balancer::pick::{Cursors, EndpointSet, Resolved, Snapshot};

const PICKS: usize = 2_000_000;
const METHOD: &str = "/hello.HelloService/SayHello";

/// Two local endpoints and one remote, all ready: the sandbox's node-a.
fn snapshot() -> Snapshot<u32> {
    let addr = |n: u8| SocketAddr::from(([10, 0, 0, n], 50051));
    let mut set = EndpointSet::default();
    #[allow(clippy::disallowed_methods, reason = "a fixed reference point for the set, not a timer")]
    let now = std::time::Instant::now();
    set.apply(
        &Resolved { all: vec![addr(1), addr(2), addr(3)], local: vec![addr(1), addr(2)], ..Resolved::default() },
        now,
    );
    for n in 1..=3 {
        set.set_ready(addr(n), true);
    }
    set.snapshot(|a| Some(u32::from(a.port())))
}

/// Nanoseconds per pick with `threads` threads picking `PICKS` each.
fn per_pick(threads: usize, locked: bool) -> f64 {
    let snap = snapshot();
    let cursors = Cursors::new();
    let lock = Mutex::new(());
    let start = Barrier::new(threads);
    #[allow(clippy::disallowed_methods, reason = "a benchmark measures wall time")]
    let began = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                start.wait();
                #[allow(clippy::disallowed_methods, reason = "a benchmark measures wall time")]
                let now = std::time::Instant::now();
                for _ in 0..PICKS {
                    let _guard = locked.then(|| lock.lock().unwrap_or_else(|e| e.into_inner()));
                    black_box(snap.pick(&cursors, black_box(METHOD), &[], now));
                }
            });
        }
    });
    let elapsed: Duration = began.elapsed();
    elapsed.as_nanos() as f64 / PICKS as f64
}

pub fn run() {
    println!("picks: {PICKS} per thread over 2 local + 1 remote ready endpoints\n");
    println!("{:<28} {:>10} {:>10}", "ns per pick (wall)", "1 thread", "2 threads");
    for (name, locked) in [("snapshot, no lock", false), ("snapshot behind one mutex", true)] {
        println!("{name:<28} {:>10.1} {:>10.1}", per_pick(1, locked), per_pick(2, locked));
    }
}
