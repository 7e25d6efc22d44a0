//! Benchmark: unary SayHello direct to a replica and through the proxy, on loopback,
//! interleaved over several rounds. The proxy runs on CPU 1 with one worker thread;
//! the replica and this load generator share CPU 0. Prints, per target, calls/s at
//! concurrency C, p50/p99 at concurrency 1, CPU time per call of the server and of the
//! proxy (utime+stime from /proc), and the proxy's resident memory; then the medians of
//! the per-round ratios.

mod procs;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use proto::{HelloRequest, hello_service_client::HelloServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use procs::Child;

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Direct vs proxy on loopback")]
struct Args {
    /// Interleaved rounds; medians of the per-round ratios are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Concurrent calls for the throughput and CPU figures.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Directory with the release binaries `server` and `proxy`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
}

/// One measurement of one target.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    calls_per_s: f64,
    server_us_per_call: f64,
    proxy_us_per_call: f64,
    p50_us: f64,
    p99_us: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    procs::pin_self(0);
    let server =
        Child::spawn(&a.bin_dir.join("server"), 0, &["--listen", "127.0.0.1:50151", "--name", "bench"]).await?;
    let proxy = Child::spawn(
        &a.bin_dir.join("proxy"),
        1,
        &["--listen", "127.0.0.1:50150", "--target", "127.0.0.1:50151", "--threads", "1"],
    )
    .await?;
    let direct = connect("127.0.0.1:50151").await?;
    let proxied = connect("127.0.0.1:50150").await?;
    warm(&direct).await?;
    warm(&proxied).await?;
    let idle_rss = proxy.rss_kib()?;
    println!(
        "direct = tonic client -> server; proxy = client -> proxy (CPU 1, 1 thread) -> server; c{} for {}s, {} rounds\n",
        a.concurrency, a.seconds, a.rounds
    );
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        let d = measure(&a, &direct, &server, &proxy).await?;
        let p = measure(&a, &proxied, &server, &proxy).await?;
        println!(
            "round {round}: direct {:.0}/s p50 {:.0}µs server {:.1}µs/call | proxy {:.0}/s p50 {:.0}µs proxy {:.1}µs/call",
            d.calls_per_s, d.p50_us, d.server_us_per_call, p.calls_per_s, p.p50_us, p.proxy_us_per_call
        );
        rounds.push((d, p));
    }
    let busy_rss = proxy.rss_kib()?;
    report(&rounds, idle_rss, busy_rss);
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<HelloServiceClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match ch.connect().await {
            Ok(c) => return Ok(HelloServiceClient::new(c)),
            Err(_) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e).context(format!("connecting to {addr}")),
        }
    }
}

async fn warm(c: &HelloServiceClient<Channel>) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match c.clone().say_hello(HelloRequest { name: "warm".into() }).await {
            Ok(_) => break,
            Err(_) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e).context("warming up"),
        }
    }
    run_load(c, 8, Duration::from_millis(500)).await;
    Ok(())
}

async fn measure(a: &Args, c: &HelloServiceClient<Channel>, server: &Child, proxy: &Child) -> anyhow::Result<Sample> {
    let secs = Duration::from_secs_f64(a.seconds);
    let (s0, p0) = (server.cpu_us()?, proxy.cpu_us()?);
    let (calls, _) = run_load(c, a.concurrency, secs).await;
    let (s1, p1) = (server.cpu_us()?, proxy.cpu_us()?);
    let (_, mut lat) = run_load(c, 1, secs / 2).await;
    lat.sort_unstable();
    let q = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    Ok(Sample {
        calls_per_s: calls as f64 / a.seconds,
        server_us_per_call: (s1 - s0) as f64 / calls.max(1) as f64,
        proxy_us_per_call: (p1 - p0) as f64 / calls.max(1) as f64,
        p50_us: q(0.5) as f64,
        p99_us: q(0.99) as f64,
    })
}

/// Closed loop: `concurrency` callers, each calling again as soon as a reply arrives.
/// Returns successful calls and their latencies in microseconds.
async fn run_load(c: &HelloServiceClient<Channel>, concurrency: usize, dur: Duration) -> (u64, Vec<u64>) {
    let until = Instant::now() + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut c = c.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                if c.say_hello(HelloRequest { name: "bench".into() }).await.is_ok() {
                    lat.push(t.elapsed().as_micros() as u64);
                }
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(Ok(lat)) = tasks.join_next().await {
        all.extend(lat);
    }
    (all.len() as u64, all)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(rounds: &[(Sample, Sample)], idle_rss: u64, busy_rss: u64) {
    let med = |f: &dyn Fn(&Sample) -> f64, which: usize| {
        median(rounds.iter().map(|r| f(if which == 0 { &r.0 } else { &r.1 })).collect())
    };
    let ratio = |num: &dyn Fn(&(Sample, Sample)) -> f64, den: &dyn Fn(&(Sample, Sample)) -> f64| {
        median(rounds.iter().map(|r| num(r) / den(r)).collect())
    };
    println!("\nmedians                         direct      proxy   ratio (median of rounds)");
    println!(
        "calls/s at c64               {:>9.0}  {:>9.0}   {:.2}x",
        med(&|s| s.calls_per_s, 0),
        med(&|s| s.calls_per_s, 1),
        ratio(&|r| r.1.calls_per_s, &|r| r.0.calls_per_s)
    );
    println!(
        "p50 at c1 (µs)               {:>9.0}  {:>9.0}   {:.2}x",
        med(&|s| s.p50_us, 0),
        med(&|s| s.p50_us, 1),
        ratio(&|r| r.1.p50_us, &|r| r.0.p50_us)
    );
    println!(
        "p99 at c1 (µs)               {:>9.0}  {:>9.0}   {:.2}x",
        med(&|s| s.p99_us, 0),
        med(&|s| s.p99_us, 1),
        ratio(&|r| r.1.p99_us, &|r| r.0.p99_us)
    );
    println!(
        "server CPU per call (µs)     {:>9.2}  {:>9.2}",
        med(&|s| s.server_us_per_call, 0),
        med(&|s| s.server_us_per_call, 1)
    );
    println!(
        "proxy CPU per call (µs)              -  {:>9.2}   {:.2}x the server's CPU per direct call",
        med(&|s| s.proxy_us_per_call, 1),
        ratio(&|r| r.1.proxy_us_per_call, &|r| r.0.server_us_per_call)
    );
    println!(
        "proxy resident memory        idle {:.1} MB, after load {:.1} MB",
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
}
