//! `--streams N`: the proxy's resident memory holding N open server streams, each
//! answered with its response headers and waiting for its first message (a minute
//! away), over client connections of 100 streams each: the h2 path, then `--relay`.

use std::time::Duration;

use proto::{HelloStreamRequest, hello_service_client::HelloServiceClient};
use tonic::{Streaming, transport::Channel};

use crate::procs::Child;

/// Streams per client connection, below the proxy's 200.
const PER_CONNECTION: usize = 100;

/// Holds `n` streams through each proxy in turn (named, with its address), then prints
/// each one's resident memory idle and holding them, and the replica's for scale.
pub async fn run(proxies: &[(&str, &Child, &str)], server: &Child, n: usize) -> anyhow::Result<()> {
    let mb = |kib: u64| kib as f64 / 1024.0;
    let mut rows = Vec::new();
    for (name, proxy, addr) in proxies {
        let (proxy_idle, server_idle) = (proxy.rss_kib()?, server.rss_kib()?);
        let held = hold(proxy, addr, n).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rows.push((name.to_string(), proxy_idle, proxy.rss_kib()?));
        rows.push(("  replica, for scale".to_owned(), server_idle, server.rss_kib()?));
        drop(held);
        // The replica lets the streams go before the next proxy's turn.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("\nresident memory             idle   {n} streams   per stream");
    for (name, idle, busy) in rows {
        let per = busy.saturating_sub(idle) as f64 * 1024.0 / n as f64;
        println!("{name:<22} {:>7.1} MB {:>10.1} MB {:>9.0} B", mb(idle), mb(busy), per);
    }
    Ok(())
}

/// Opens `n` streams through `addr`, each answered with its headers.
async fn hold(proxy: &Child, addr: &str, n: usize) -> anyhow::Result<Vec<Streaming<proto::HelloResponse>>> {
    let mb = |kib: u64| kib as f64 / 1024.0;
    let mut held: Vec<Streaming<proto::HelloResponse>> = Vec::with_capacity(n);
    while held.len() < n {
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
        let client = HelloServiceClient::new(channel);
        let batch = PER_CONNECTION.min(n - held.len());
        let opened = futures_util::future::try_join_all((0..batch).map(|_| {
            let mut client = client.clone();
            async move {
                let req = HelloStreamRequest { name: "held".into(), count: 0, interval_ms: 60_000, resume_after: 0 };
                // Its response headers came back through the proxy: open end to end.
                Ok::<_, tonic::Status>(client.say_hello_stream(req).await?.into_inner())
            }
        }))
        .await?;
        held.extend(opened);
        if held.len().is_multiple_of(1000) || held.len() == n {
            eprintln!("  {addr}: {} streams open, proxy {:.1} MB", held.len(), mb(proxy.rss_kib()?));
        }
    }
    Ok(held)
}
