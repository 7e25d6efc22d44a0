//! Open-loop load: calls start on a fixed schedule whatever the replies do, and each
//! latency counts from its scheduled start, so a stall shows up instead of hiding.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use balancer::{code::code_name, duration};
use clap::Args;
use serde_json::json;
use tokio::{sync::Semaphore, time::Instant};

use crate::{
    conn::Conn,
    report::{Latencies, Replica, per_node, percent, table},
};

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Calls started per second.
    #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
    pub rate: f64,
    /// How long to keep starting calls.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub duration: Duration,
    /// Most calls in flight at once; when reached, starts wait (and their latency grows).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    #[arg(long, default_value = "World")]
    pub name: String,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 even when calls failed.
    #[arg(long)]
    pub allow_failures: bool,
    /// A file holding the name of the current phase; calls are counted per phase.
    #[arg(long)]
    pub phases: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1_000_000.0 => Ok(r),
        _ => Err(format!("expected calls per second above 0, got {s:?}")),
    }
}

#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    failures: BTreeMap<&'static str, u64>,
    /// The first message seen for each failure code, to show what went wrong.
    examples: BTreeMap<&'static str, String>,
    latencies: Latencies,
    replicas: BTreeMap<Replica, u64>,
    /// Phases in the order they began.
    phases: Vec<Phase>,
}

/// What happened to the calls scheduled while a phase was on.
#[derive(Debug, Default)]
struct Phase {
    name: String,
    /// Successful calls per server.
    calls: BTreeMap<String, u64>,
    failed: u64,
    /// The slowest successful call.
    max: Duration,
}

impl Stats {
    fn phase(&mut self, name: &str) -> &mut Phase {
        if self.phases.last().is_none_or(|p| p.name != name) {
            self.phases.push(Phase { name: name.to_owned(), ..Phase::default() });
        }
        self.phases.last_mut().unwrap()
    }

    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

pub async fn run(conn: Conn, a: LoadArgs) -> anyhow::Result<ExitCode> {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let phase = Arc::new(Mutex::new(String::from("-")));
    if let Some(path) = a.phases.clone() {
        tokio::spawn(watch_phase(path, phase.clone()));
    }
    let total = (a.rate * a.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let permits = Arc::new(Semaphore::new(a.concurrency as usize));
    let started = Instant::now();
    let progress = (!a.quiet).then(|| tokio::spawn(progress(stats.clone(), started, a.duration)));
    // SIGINT/SIGTERM end the run early with a full summary, for scripts that stop it.
    let interrupted = balancer::signal::terminate();
    tokio::pin!(interrupted);
    for i in 0..total {
        let scheduled = started + period.mul_f64(i as f64);
        tokio::select! {
            () = tokio::time::sleep_until(scheduled) => {}
            () = &mut interrupted => break,
        }
        let permit = permits.clone().acquire_owned().await?;
        let (conn, stats, phase, name) = (conn.clone(), stats.clone(), phase.clone(), a.name.clone());
        tokio::spawn(async move {
            let current = phase.lock().unwrap().clone();
            let result = conn.hello(&name).await;
            let took = scheduled.elapsed();
            let mut s = stats.lock().unwrap();
            match result {
                Ok(r) => {
                    s.ok += 1;
                    s.latencies.record(took);
                    let phase = s.phase(&current);
                    *phase.calls.entry(r.server.clone()).or_default() += 1;
                    phase.max = phase.max.max(took);
                    *s.replicas.entry(Replica { server: r.server, node: r.node }).or_default() += 1;
                }
                Err(status) => {
                    let code = code_name(status.code());
                    *s.failures.entry(code).or_default() += 1;
                    s.examples.entry(code).or_insert_with(|| status.message().to_owned());
                    s.phase(&current).failed += 1;
                }
            }
            drop(permit);
        });
    }
    let _ = permits.acquire_many(a.concurrency).await?;
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let mut s = std::mem::take(&mut *stats.lock().unwrap());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&mut s, elapsed, &conn))?);
    } else {
        print!("{}", summary(&mut s, elapsed, &conn, a.phases.is_some()));
    }
    Ok(if s.failed() > 0 && !a.allow_failures { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Rereads the phase file every 50 ms.
async fn watch_phase(path: PathBuf, phase: Arc<Mutex<String>>) {
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let text = text.trim();
            if !text.is_empty() {
                *phase.lock().unwrap() = text.to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn progress(stats: Arc<Mutex<Stats>>, started: Instant, duration: Duration) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_millis(250) } else { Duration::from_secs(5) };
    loop {
        tokio::time::sleep(every).await;
        let (ok, failed) = {
            let s = stats.lock().unwrap();
            (s.ok, s.failed())
        };
        let t = started.elapsed().as_secs_f64().min(duration.as_secs_f64());
        let line = format!("  {t:5.1}s / {:.0}s  {ok} ok  {failed} failed", duration.as_secs_f64());
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

fn summary(s: &mut Stats, elapsed: Duration, conn: &Conn, phases: bool) -> String {
    let calls = s.ok + s.failed();
    let secs = elapsed.as_secs_f64();
    let mut out = format!(
        "{calls} calls in {secs:.1} s ({:.1}/s) via {}\n  ok {}, failed {}\n",
        calls as f64 / secs,
        conn.describe(),
        s.ok,
        s.failed()
    );
    for (code, n) in &s.failures {
        out += &format!("    {code}: {n} (e.g. {})\n", s.examples[code]);
    }
    out += &format!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n\n",
        s.latencies.quantile_ms(0.5),
        s.latencies.quantile_ms(0.9),
        s.latencies.quantile_ms(0.99),
        s.latencies.quantile_ms(1.0)
    );
    let rows: Vec<Vec<String>> = s
        .replicas
        .iter()
        .map(|(r, n)| vec![r.server.clone(), r.node.clone(), n.to_string(), percent(*n, s.ok)])
        .collect();
    out += &table(&["replica", "node", "calls", "share"], &rows);
    out.push('\n');
    let rows: Vec<Vec<String>> =
        per_node(&s.replicas).iter().map(|(node, n)| vec![node.clone(), n.to_string(), percent(*n, s.ok)]).collect();
    out += &table(&["node", "calls", "share"], &rows);
    if phases {
        out.push('\n');
        out += &phase_table(s);
    }
    out
}

fn phase_table(s: &Stats) -> String {
    let servers: Vec<&String> = s.replicas.keys().map(|r| &r.server).collect();
    let mut header: Vec<&str> = vec!["phase"];
    header.extend(servers.iter().map(|s| s.as_str()));
    header.extend(["failed", "max ms"]);
    let rows: Vec<Vec<String>> = s
        .phases
        .iter()
        .map(|p| {
            let mut row = vec![p.name.clone()];
            row.extend(servers.iter().map(|srv| p.calls.get(*srv).copied().unwrap_or(0).to_string()));
            row.push(p.failed.to_string());
            row.push(format!("{:.1}", p.max.as_secs_f64() * 1e3));
            row
        })
        .collect();
    table(&header, &rows)
}

fn to_json(s: &mut Stats, elapsed: Duration, conn: &Conn) -> serde_json::Value {
    let replicas: Vec<_> =
        s.replicas.iter().map(|(r, n)| json!({"server": r.server, "node": r.node, "calls": n})).collect();
    let phases: Vec<_> = s
        .phases
        .iter()
        .map(|p| json!({"phase": p.name, "calls": p.calls, "failed": p.failed, "max_ms": p.max.as_secs_f64() * 1e3}))
        .collect();
    json!({
        "via": conn.describe(),
        "seconds": elapsed.as_secs_f64(),
        "calls": s.ok + s.failed(),
        "ok": s.ok,
        "failed": s.failed(),
        "failures": s.failures,
        "latency_ms": {
            "p50": s.latencies.quantile_ms(0.5),
            "p90": s.latencies.quantile_ms(0.9),
            "p99": s.latencies.quantile_ms(0.99),
            "max": s.latencies.quantile_ms(1.0),
        },
        // Successful calls slower than a second: hurt, if not failed.
        "slow_over_1s": s.latencies.over(Duration::from_secs(1)),
        "replicas": replicas,
        "nodes": per_node(&s.replicas),
        "phases": phases,
    })
}
