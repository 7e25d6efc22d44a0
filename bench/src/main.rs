//! Benchmark: unary SayHello direct to a replica and through the proxy, on loopback,
//! interleaved over several rounds. The proxy runs on CPU 1 with one worker thread;
//! the replica and this load generator share CPU 0. Prints, per target, calls/s at
//! concurrency C, p50/p99 at concurrency 1, CPU time per call of the server and of the
//! proxy (user and system time from /proc), the proxy's system calls per call (perf's
//! syscall tracepoint, where perf runs) and its resident memory; then the medians of the
//! per-round ratios. More targets give what a flag costs or buys: the proxy with
//! `--metrics off` (what recording metrics costs per call), with `--busy-poll`
//! (latency at concurrency 1, and the CPU it burns there) and the relay with
//! `--coalesce` (CPU per call under load, and the latency it adds there). A second replica on the
//! proxy's CPU gives the direct call across CPUs (`x-cpu`): the wake-ups every proxied
//! call pays on its hops, the floor of a proxy's p50 here. Last, the proxy runs inside
//! this process under a counting allocator for its heap allocations per call.

mod allocs;
mod picks;
mod procs;
mod streams;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use proto::{HelloRequest, hello_service_client::HelloServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use procs::{Child, Cpu, Syscalls};

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
    /// Only the picker: a pick from the lock-free snapshot against one behind a mutex.
    #[arg(long)]
    picks: bool,
    /// Only memory: the proxy's resident memory holding this many open streams.
    #[arg(long, value_name = "N")]
    streams: Option<usize>,
    /// Also measure the peers in the same run: HAProxy (`haproxy` on PATH) with
    /// bench/haproxy.cfg, one thread on the proxy's CPU.
    #[arg(long)]
    peers: bool,
    /// `--busy-poll` of the busy-polling proxy target, in microseconds.
    #[arg(long, value_name = "MICROS", default_value_t = 200)]
    busy_poll: u64,
    /// `--coalesce` of the coalescing relay target, in microseconds.
    #[arg(long, value_name = "MICROS", default_value_t = 100)]
    coalesce: u64,
}

/// Every target listens on this address, not 127.0.0.1: its ports are in the ephemeral
/// range, and an outgoing connection from 127.0.0.1 (any process's) could hold one.
const HOST: &str = "127.0.0.150";
/// The replica.
pub(crate) const SERVER: &str = "127.0.0.150:50151";
/// The proxy over HTTP/2 to the replica.
const PROXY_H2: &str = "127.0.0.150:50150";
/// The proxy over HTTP/3 to the replica.
const PROXY_H3: &str = "127.0.0.150:50152";
/// The proxy with `--metrics off`, for what recording metrics costs.
const QUIET: &str = "127.0.0.150:50153";
/// The proxy with `--busy-poll`.
const BUSY: &str = "127.0.0.150:50155";
/// The proxy with `--relay`: h2c calls forwarded by the frame relay.
const RELAY: &str = "127.0.0.150:50157";
/// The proxy with `--relay` and `--busy-poll`.
const RELAY_BUSY: &str = "127.0.0.150:50158";
/// The proxy with `--relay` and `--coalesce`.
const RELAY_COALESCE: &str = "127.0.0.150:50160";
/// A second replica, on the proxy's CPU: a direct call across CPUs, as every proxied
/// call's hops are.
const FAR: &str = "127.0.0.150:50159";

/// HAProxy's configuration for `--peers`: the same shape as the proxy under test.
const HAPROXY_CFG: &str = include_str!("../haproxy.cfg");
/// Where `HAPROXY_CFG` listens.
const HAPROXY: &str = "127.0.0.150:50154";

/// One measurement of one target.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    calls_per_s: f64,
    server_us_per_call: f64,
    proxy_us_per_call: f64,
    proxy_user_us_per_call: f64,
    proxy_sys_us_per_call: f64,
    /// NaN where perf cannot count.
    proxy_syscalls_per_call: f64,
    /// The proxy's CPU during the concurrency-1 run, as a share of one core.
    proxy_c1_core: f64,
    p50_us: f64,
    p99_us: f64,
    /// Latency at concurrency C, where `--coalesce` costs what it costs.
    p50_cn_us: f64,
    p99_cn_us: f64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.picks {
        picks::run();
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?.block_on(bench(a))
}

async fn bench(a: Args) -> anyhow::Result<()> {
    procs::pin_self(0);
    let certs = std::env::temp_dir().join(format!("lb-bench-certs-{}", std::process::id()));
    grpc_h3::certs::generate(&certs, &[HOST.to_owned()]).map_err(anyhow::Error::msg)?;
    let (cert, key, ca) = (certs.join("cert.pem"), certs.join("key.pem"), certs.join("ca.pem"));
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let server_args = ["--listen", SERVER, "--name", "bench", "--tls-cert", &path(&cert), "--tls-key", &path(&key)];
    let server = Child::spawn(&a.bin_dir.join("server"), 0, &server_args).await?;
    let proxy_args = |listen: &'static str, protocol: &'static str| {
        let mut v: Vec<String> = ["--listen", listen, "--target", SERVER, "--threads", "1"].map(String::from).to_vec();
        v.extend(["--admin-listen".into(), "off".into()]);
        if listen == QUIET {
            v.extend(["--metrics".into(), "off".into()]);
        }
        if listen == BUSY || listen == RELAY_BUSY {
            v.extend(["--busy-poll".into(), a.busy_poll.to_string()]);
        }
        if listen == RELAY_COALESCE {
            v.extend(["--coalesce".into(), a.coalesce.to_string()]);
        }
        let relay = listen == RELAY || listen == RELAY_BUSY || listen == RELAY_COALESCE;
        v.extend(["--relay".into(), if relay { "on" } else { "off" }.into()]);
        v.extend(["--upstream-protocol".into(), protocol.into(), "--ca-cert".into(), path(&ca)]);
        v
    };
    let h2_args = proxy_args(PROXY_H2, "h2");
    let h3_args = proxy_args(PROXY_H3, "h3");
    let quiet_args = proxy_args(QUIET, "h2");
    let busy_args = proxy_args(BUSY, "h2");
    let relay_args = proxy_args(RELAY, "h2");
    let relay_busy_args = proxy_args(RELAY_BUSY, "h2");
    let relay_coalesce_args = proxy_args(RELAY_COALESCE, "h2");
    let proxy_h2 = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&h2_args)).await?;
    if let Some(n) = a.streams {
        let relay = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&proxy_args(RELAY, "h2"))).await?;
        connect(PROXY_H2).await?;
        connect(RELAY).await?;
        let proxies = [("proxy (h2 path)", &proxy_h2, PROXY_H2), ("proxy --relay", &relay, RELAY)];
        return streams::run(&proxies, &server, n).await;
    }
    let far = Child::spawn(&a.bin_dir.join("server"), 1, &["--listen", FAR, "--name", "far"]).await?;
    let proxy_h3 = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&h3_args)).await?;
    let proxy_quiet = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&quiet_args)).await?;
    let proxy_busy = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&busy_args)).await?;
    let relay = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&relay_args)).await?;
    let relay_busy = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&relay_busy_args)).await?;
    let relay_coalesce = Child::spawn(&a.bin_dir.join("proxy"), 1, &as_str(&relay_coalesce_args)).await?;
    let haproxy = match a.peers {
        true => {
            let cfg = certs.join("haproxy.cfg");
            std::fs::write(&cfg, HAPROXY_CFG)?;
            let bin = which("haproxy").context("--peers needs haproxy on PATH (apt-get install haproxy)")?;
            Some(Child::spawn(&bin, 1, &["-db", "-f", &path(&cfg)]).await?)
        }
        false => None,
    };
    let mut targets = vec![
        ("direct", connect(SERVER).await?, None, &server),
        ("proxy h2", connect(PROXY_H2).await?, Some(&proxy_h2), &server),
        ("proxy h3", connect(PROXY_H3).await?, Some(&proxy_h3), &server),
        ("h2 no-metrics", connect(QUIET).await?, Some(&proxy_quiet), &server),
        ("h2 busy-poll", connect(BUSY).await?, Some(&proxy_busy), &server),
        ("relay", connect(RELAY).await?, Some(&relay), &server),
        ("relay busy", connect(RELAY_BUSY).await?, Some(&relay_busy), &server),
        ("direct x-cpu", connect(FAR).await?, None, &far),
        ("relay coalesce", connect(RELAY_COALESCE).await?, Some(&relay_coalesce), &server),
    ];
    if let Some(h) = &haproxy {
        targets.push(("haproxy", connect(HAPROXY).await?, Some(h), &server));
    }
    for (_, c, _, _) in &targets {
        warm(c).await?;
    }
    let idle_rss = proxy_h2.rss_kib()?;
    println!(
        "direct = tonic client -> server; proxy = client -> proxy (CPU 1, 1 thread) -> server over h2 or h3; \
         c{} for {}s, {} rounds\n",
        a.concurrency, a.seconds, a.rounds
    );
    let mut rounds: Vec<Vec<Sample>> = Vec::new();
    for round in 1..=a.rounds {
        let mut row = Vec::new();
        for (name, c, proxy, server) in &targets {
            let s = measure(&a, c, server, *proxy).await?;
            let middle = match proxy {
                Some(_) => format!(
                    "  proxy {:>5.2}µs/call ({:.2} user + {:.2} sys, {:.1} syscalls)",
                    s.proxy_us_per_call, s.proxy_user_us_per_call, s.proxy_sys_us_per_call, s.proxy_syscalls_per_call
                ),
                None => String::new(),
            };
            println!(
                "round {round} {name:<13} {:>7.0}/s  p50 {:>4.0}µs  server {:>5.2}µs/call{middle}",
                s.calls_per_s, s.p50_us, s.server_us_per_call
            );
            row.push(s);
        }
        rounds.push(row);
    }
    let busy_rss = proxy_h2.rss_kib()?;
    let peer_rss = haproxy.as_ref().map(|h| h.rss_kib()).transpose()?;
    let allocs = [allocs::measure(&a, false).await?, allocs::measure(&a, true).await?];
    report(&a, &rounds, idle_rss, busy_rss, peer_rss, &allocs);
    let _ = std::fs::remove_dir_all(&certs);
    Ok(())
}

/// `name` found on PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
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

async fn measure(
    a: &Args,
    c: &HelloServiceClient<Channel>,
    server: &Child,
    proxy: Option<&Child>,
) -> anyhow::Result<Sample> {
    let secs = Duration::from_secs_f64(a.seconds);
    let proxy_cpu = || proxy.map_or(Ok(Cpu::default()), Child::cpu_us);
    let syscalls = match proxy {
        Some(p) => Syscalls::start(p.pid()).await,
        None => None,
    };
    let (s0, p0) = (server.cpu_us()?, proxy_cpu()?);
    let (calls, mut lat_cn) = run_load(c, a.concurrency, secs).await;
    let (s1, p1) = (server.cpu_us()?, proxy_cpu()?);
    let syscalls = syscalls.and_then(Syscalls::stop);
    let c1 = Instant::now();
    let (_, mut lat) = run_load(c, 1, secs / 2).await;
    let (c1_wall, p2) = (c1.elapsed(), proxy_cpu()?);
    lat.sort_unstable();
    lat_cn.sort_unstable();
    let q = |lat: &[u64], q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0) as f64
    };
    let per_call = |us: u64| us as f64 / calls.max(1) as f64;
    let proxy = p1.since(p0);
    Ok(Sample {
        calls_per_s: calls as f64 / a.seconds,
        server_us_per_call: per_call(s1.since(s0).total()),
        proxy_us_per_call: per_call(proxy.total()),
        proxy_user_us_per_call: per_call(proxy.user),
        proxy_sys_us_per_call: per_call(proxy.system),
        proxy_syscalls_per_call: syscalls.map_or(f64::NAN, per_call),
        proxy_c1_core: p2.since(p1).total() as f64 / c1_wall.as_micros() as f64,
        p50_us: q(&lat, 0.5),
        p99_us: q(&lat, 0.99),
        p50_cn_us: q(&lat_cn, 0.5),
        p99_cn_us: q(&lat_cn, 0.99),
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

fn report(
    a: &Args,
    rounds: &[Vec<Sample>],
    idle_rss: u64,
    busy_rss: u64,
    peer_rss: Option<u64>,
    allocs: &[allocs::PerCall; 2],
) {
    let med = |i: usize, f: fn(&Sample) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
    let ratio = |i: usize, j: usize, fi: fn(&Sample) -> f64, fj: fn(&Sample) -> f64| {
        median(rounds.iter().map(|r| fi(&r[i]) / fj(&r[j])).collect())
    };
    // Columns in the order of `targets`; HAProxy last when measured.
    let (d, h2, h3, quiet, busy, relay, relay_busy, far, coal, hap) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9);
    let peers = rounds[0].len() > hap;
    let cols: &[usize] = if peers {
        &[d, far, h2, h3, busy, relay, relay_busy, coal, hap]
    } else {
        &[d, far, h2, h3, busy, relay, relay_busy, coal]
    };
    let header = if peers { "   haproxy" } else { "" };
    println!(
        "\nmedians                          direct      x-cpu   proxy h2   proxy h3  busy-poll      relay relay+busy relay+coal{header}"
    );
    let line = |name: &str, f: fn(&Sample) -> f64, digits: usize| {
        let cells: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let w = if k == 0 { 8 } else { 10 };
                // A direct target has no proxy: its proxy figures are zero, or NaN.
                match med(i, f) {
                    v if v.is_nan() || (v == 0.0 && (i == d || i == far)) => format!("{:>w$}", "-"),
                    v => format!("{v:>w$.digits$}"),
                }
            })
            .collect();
        println!("{name:<30} {}", cells.join(" "));
    };
    line(&format!("calls/s at c{}", a.concurrency), |s| s.calls_per_s, 0);
    line(&format!("p50 at c{} (µs)", a.concurrency), |s| s.p50_cn_us, 0);
    line(&format!("p99 at c{} (µs)", a.concurrency), |s| s.p99_cn_us, 0);
    line("p50 at c1 (µs)", |s| s.p50_us, 0);
    line("p99 at c1 (µs)", |s| s.p99_us, 0);
    line("server CPU per call (µs)", |s| s.server_us_per_call, 2);
    line("proxy CPU per call (µs)", |s| s.proxy_us_per_call, 2);
    line("  user (µs)", |s| s.proxy_user_us_per_call, 2);
    line("  system (µs)", |s| s.proxy_sys_us_per_call, 2);
    line("proxy syscalls per call", |s| s.proxy_syscalls_per_call, 1);
    line("proxy CPU at c1 (cores)", |s| s.proxy_c1_core, 2);
    println!("\nratios (median of per-round ratios)");
    let server_cpu: fn(&Sample) -> f64 = |s| s.server_us_per_call;
    let proxy_cpu: fn(&Sample) -> f64 = |s| s.proxy_us_per_call;
    let p50: fn(&Sample) -> f64 = |s| s.p50_us;
    let c1_core: fn(&Sample) -> f64 = |s| s.proxy_c1_core;
    println!("proxy h2 CPU per call / server CPU per direct call  {:.2}x", ratio(h2, d, proxy_cpu, server_cpu));
    println!("proxy h2 p50 / direct p50                          {:.2}x", ratio(h2, d, p50, p50));
    println!("proxy h3 CPU per call / proxy h2 CPU per call      {:.2}x", ratio(h3, h2, proxy_cpu, proxy_cpu));
    println!("proxy h3 p50 / proxy h2 p50                        {:.2}x", ratio(h3, h2, p50, p50));
    println!("proxy h2 CPU per call, metrics on / off            {:.3}x", ratio(h2, quiet, proxy_cpu, proxy_cpu));
    println!("relay CPU per call / server CPU per direct call    {:.2}x", ratio(relay, d, proxy_cpu, server_cpu));
    println!("relay CPU per call / proxy h2's                    {:.2}x", ratio(relay, h2, proxy_cpu, proxy_cpu));
    println!("relay p50 / direct p50                             {:.2}x", ratio(relay, d, p50, p50));
    println!("relay p50 / proxy h2 p50                           {:.2}x", ratio(relay, h2, p50, p50));
    let bp = a.busy_poll;
    println!("proxy h2 --busy-poll {bp} p50 / direct p50         {:.2}x", ratio(busy, d, p50, p50));
    println!("proxy h2 --busy-poll {bp} p50 / without            {:.2}x", ratio(busy, h2, p50, p50));
    println!("proxy h2 --busy-poll {bp} CPU at c1 / without      {:.2}x", ratio(busy, h2, c1_core, c1_core));
    println!("relay --busy-poll {bp} p50 / direct p50            {:.2}x", ratio(relay_busy, d, p50, p50));
    println!("relay --busy-poll {bp} CPU at c1 / without         {:.2}x", ratio(relay_busy, relay, c1_core, c1_core));
    println!("direct across CPUs p50 / direct p50                {:.2}x", ratio(far, d, p50, p50));
    println!("proxy h2 --busy-poll {bp} p50 / direct x-cpu p50   {:.2}x", ratio(busy, far, p50, p50));
    println!("relay --busy-poll {bp} p50 / direct x-cpu p50      {:.2}x", ratio(relay_busy, far, p50, p50));
    let co = a.coalesce;
    let p50_cn: fn(&Sample) -> f64 = |s| s.p50_cn_us;
    let rate: fn(&Sample) -> f64 = |s| s.calls_per_s;
    let cn = a.concurrency;
    println!(
        "relay --coalesce {co} CPU per call / server CPU per direct call {:.2}x",
        ratio(coal, d, proxy_cpu, server_cpu)
    );
    println!("relay --coalesce {co} CPU per call / without       {:.2}x", ratio(coal, relay, proxy_cpu, proxy_cpu));
    println!("relay --coalesce {co} calls/s at c{cn} / without      {:.2}x", ratio(coal, relay, rate, rate));
    println!("relay --coalesce {co} p50 at c{cn} / without          {:.2}x", ratio(coal, relay, p50_cn, p50_cn));
    println!("relay --coalesce {co} p50 at c1 / without           {:.2}x", ratio(coal, relay, p50, p50));
    if peers {
        println!("haproxy CPU per call / server CPU per direct call   {:.2}x", ratio(hap, d, proxy_cpu, server_cpu));
        println!("haproxy p50 / direct p50                           {:.2}x", ratio(hap, d, p50, p50));
        println!("proxy h2 CPU per call / haproxy CPU per call       {:.2}x", ratio(h2, hap, proxy_cpu, proxy_cpu));
        println!("proxy h2 p50 / haproxy p50                         {:.2}x", ratio(h2, hap, p50, p50));
        println!("proxy h2 --busy-poll {bp} p50 / haproxy p50        {:.2}x", ratio(busy, hap, p50, p50));
        println!("relay CPU per call / haproxy CPU per call          {:.2}x", ratio(relay, hap, proxy_cpu, proxy_cpu));
        println!("relay p50 / haproxy p50                            {:.2}x", ratio(relay, hap, p50, p50));
        println!("relay --coalesce {co} CPU per call / haproxy's     {:.2}x", ratio(coal, hap, proxy_cpu, proxy_cpu));
    }
    for (name, allocs) in ["proxy h2", "relay"].iter().zip(allocs) {
        println!(
            "{name:<8} heap allocations per call (in-process) c1 {:.1} ({:.0} B), c{} {:.1} ({:.0} B)",
            allocs.c1.0, allocs.c1.1, a.concurrency, allocs.cn.0, allocs.cn.1
        );
    }
    let mb = |kib: u64| kib as f64 / 1024.0;
    println!(
        "proxy resident memory (h2)                         idle {:.1} MB, after load {:.1} MB",
        mb(idle_rss),
        mb(busy_rss)
    );
    if let Some(rss) = peer_rss {
        println!("haproxy resident memory                            after load {:.1} MB", mb(rss));
    }
}
