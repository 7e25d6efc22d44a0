//! Heap allocations per forwarded call, counted by this process's allocator: the proxy
//! runs here on a thread of its own, and only that thread's allocations are counted
//! (the load generator's are not).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;

use crate::{Args, connect, run_load, warm};

/// The system allocator, counting the allocations of the threads that ask for it.
struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size as u64, Relaxed);
    }
}

// SAFETY: every call goes straight to `System` with the caller's arguments; counting
// touches only atomics and a const-initialised thread-local without a destructor.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations and bytes asked for per call, at concurrency 1 and at `--concurrency`.
pub struct PerCall {
    pub c1: (f64, f64),
    pub cn: (f64, f64),
}

/// Where the in-process proxy listens.
const LISTEN: &str = "127.0.0.150:50156";

/// Counts the in-process proxy's allocations, with `--relay` when `relay`.
pub async fn measure(a: &Args, relay: bool) -> anyhow::Result<PerCall> {
    let mut argv = vec!["proxy", "--listen", LISTEN, "--target", crate::SERVER, "--admin-listen", "off"];
    argv.extend(["--relay", if relay { "on" } else { "off" }]);
    let args = proxy::config::Args::try_parse_from(argv)?.serve;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("counted-proxy".into()).spawn(move || {
        COUNTED.with(|c| c.set(true));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(args.listen).await.context("binding the counted proxy")?;
            proxy::run(args, listener, async {
                let _ = stopped.await;
            })
            .await
        })
    })?;
    let client = connect(LISTEN).await?;
    warm(&client).await?;
    let secs = Duration::from_secs_f64(a.seconds);
    let per_call = async |concurrency: usize, dur: Duration| {
        let (n0, b0) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
        let (calls, _) = run_load(&client, concurrency, dur).await;
        let (n1, b1) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
        let calls = calls.max(1) as f64;
        ((n1 - n0) as f64 / calls, (b1 - b0) as f64 / calls)
    };
    let c1 = per_call(1, secs / 2).await;
    let cn = per_call(a.concurrency, secs).await;
    let _ = stop.send(());
    match thread.join() {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the counted proxy panicked"),
    }
    Ok(PerCall { c1, cn })
}
