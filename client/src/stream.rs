//! A `SayHelloStream` that survives server restarts: when it breaks, wait for the proxy
//! to be ready, re-open with `resume_after` = the last seq, and go on. At the end,
//! gaps and duplicates are counted (both should be 0).

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use anyhow::bail;
use balancer::{code::code_name, duration};
use clap::Args;
use proto::HelloStreamRequest;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use crate::{
    conn::Conn,
    report::{Replica, table},
};

#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    #[arg(long, default_value = "World")]
    pub name: String,
    /// Messages in all; 0 = until --duration or Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub count: u32,
    /// Pause between messages.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u32,
    /// Stop after this long.
    #[arg(long, value_parser = duration::parse)]
    pub duration: Option<Duration>,
    /// How long to wait for the proxy to be ready after the stream breaks.
    #[arg(long, default_value = "60s", value_parser = duration::parse)]
    pub wait: Duration,
    /// Print only breaks and the report, not every message.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Default)]
struct Tally {
    last: u64,
    received: u64,
    gaps: u64,
    duplicates: u64,
    reopened: u64,
    replicas: BTreeMap<Replica, u64>,
}

impl Tally {
    fn see(&mut self, seq: u64, replica: Replica) {
        self.received += 1;
        if seq > self.last + 1 {
            self.gaps += seq - self.last - 1;
        } else if seq <= self.last {
            self.duplicates += 1;
        }
        self.last = self.last.max(seq);
        *self.replicas.entry(replica).or_default() += 1;
    }
}

pub async fn run(conn: Conn, a: StreamArgs) -> anyhow::Result<ExitCode> {
    let until = a.duration.map(|d| Instant::now() + d);
    let stop = async {
        match until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    let mut t = Tally::default();
    tokio::select! {
        res = follow(&conn, &a, &mut t) => res?,
        () = stop => {}
        () = balancer::signal::terminate() => {}
    }
    report(&t);
    Ok(if t.gaps == 0 && t.duplicates == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn follow(conn: &Conn, a: &StreamArgs, t: &mut Tally) -> anyhow::Result<()> {
    loop {
        let req = HelloStreamRequest {
            name: a.name.clone(),
            count: a.count,
            interval_ms: a.interval_ms,
            resume_after: t.last,
        };
        let broke = match conn.stream(req).await {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Some(Ok(m)) => {
                        if !a.quiet {
                            println!("seq={:<6} {} ({}, {})", m.seq, m.server, m.node, m.address);
                        }
                        t.see(m.seq, Replica { server: m.server, node: m.node });
                    }
                    Some(Err(s)) => break format!("{}: {}", code_name(s.code()), s.message()),
                    None if a.count > 0 && t.last >= u64::from(a.count) => return Ok(()),
                    None => break "ended early without a status".to_owned(),
                }
            },
            Err(s) => format!("opening: {}: {}", code_name(s.code()), s.message()),
        };
        eprintln!("stream broke after seq={} ({broke}); re-opening with resume_after={}", t.last, t.last);
        t.reopened += 1;
        wait_ready(conn, a.wait).await?;
    }
}

async fn wait_ready(conn: &Conn, wait: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + wait;
    while !conn.ready().await {
        if Instant::now() >= until {
            bail!("{} not ready within {wait:?}", conn.describe());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn report(t: &Tally) {
    println!(
        "\nstream: {} messages, last seq {}, re-opened {} times, gaps {}, duplicates {}",
        t.received, t.last, t.reopened, t.gaps, t.duplicates
    );
    let rows: Vec<Vec<String>> =
        t.replicas.iter().map(|(r, n)| vec![r.server.clone(), r.node.clone(), n.to_string()]).collect();
    print!("{}", table(&["replica", "node", "messages"], &rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Replica {
        Replica { server: "s".into(), node: "n".into() }
    }

    #[test]
    fn counts_gaps_and_duplicates() {
        let mut t = Tally::default();
        for seq in [1, 2, 3, 3, 5, 6, 2, 7] {
            t.see(seq, r());
        }
        assert_eq!((t.received, t.last, t.gaps, t.duplicates), (8, 7, 1, 2));
    }
}
