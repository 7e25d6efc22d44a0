//! `verify-lb`: sequential calls, then each replica's calls against the share a
//! local-first round-robin should give it.

use std::{collections::BTreeMap, process::ExitCode};

use clap::Args;

use crate::{
    conn::Conn,
    report::{Replica, percent, table},
};

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Number of calls.
    #[arg(long, default_value_t = 300)]
    pub calls: u64,
    /// The node the caller (the proxy) runs on: its replicas are local.
    #[arg(long, default_value = "node-a")]
    pub local_node: String,
    /// Every replica that should exist, as NAME@NODE, comma-separated; replicas that
    /// never answer then show up with 0 calls.
    #[arg(long, value_delimiter = ',', value_parser = parse_replica)]
    pub expect: Vec<Replica>,
    /// Exit non-zero unless every call went to a local replica and each got its even
    /// share within ±10%.
    #[arg(long)]
    pub check: bool,
    /// Print every reply in full.
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value = "World")]
    pub name: String,
}

fn parse_replica(s: &str) -> Result<Replica, String> {
    match s.split_once('@') {
        Some((server, node)) if !server.is_empty() && !node.is_empty() => {
            Ok(Replica { server: server.to_owned(), node: node.to_owned() })
        }
        _ => Err(format!("expected NAME@NODE, got {s:?}")),
    }
}

pub async fn run(conn: Conn, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut counts: BTreeMap<Replica, u64> = a.expect.iter().map(|r| (r.clone(), 0)).collect();
    for i in 1..=a.calls {
        let r = conn.hello(&a.name).await.map_err(|s| {
            anyhow::anyhow!("call {i} of {} via {}: {}", a.calls, conn.describe(), crate::conn::explain(&s))
        })?;
        if a.full {
            println!("{i:>4}  {}  [server={} node={} address={}]", r.message, r.server, r.node, r.address);
        }
        *counts.entry(Replica { server: r.server, node: r.node }).or_default() += 1;
    }
    let locals = counts.keys().filter(|r| r.node == a.local_node).count() as u64;
    let expected = |r: &Replica| -> f64 {
        match (locals, r.node == a.local_node) {
            (0, _) => 1.0 / counts.len() as f64,
            (_, true) => 1.0 / locals as f64,
            (_, false) => 0.0,
        }
    };
    let mut failures = Vec::new();
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|(r, n)| {
            let want = expected(r);
            let share = *n as f64 / a.calls as f64;
            if (share - want).abs() > want * 0.10 + f64::EPSILON {
                failures.push(format!("{} got {} instead of {:.1}%", r.server, percent(*n, a.calls), want * 100.0));
            }
            let place = if r.node == a.local_node { "local" } else { "remote" };
            vec![
                r.server.clone(),
                r.node.clone(),
                place.into(),
                n.to_string(),
                percent(*n, a.calls),
                format!("{:.1}%", want * 100.0),
            ]
        })
        .collect();
    println!("{} calls via {} (caller on {})\n", a.calls, conn.describe(), a.local_node);
    print!("{}", table(&["replica", "node", "placement", "calls", "share", "expected"], &rows));
    if failures.is_empty() {
        println!("\nOK: every replica got its expected share within ±10%");
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nOFF BALANCE: {}", failures.join("; "));
    Ok(if a.check { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
