//! `--streams N`: the proxy's resident memory holding N open server streams, each
//! answered with its response headers and waiting for its first message (a minute
//! away), over client connections of 100 streams each.

use std::time::Duration;

use proto::{HelloStreamRequest, hello_service_client::HelloServiceClient};
use tonic::{Streaming, transport::Channel};

use crate::procs::Child;

/// Streams per client connection, below the proxy's 200.
const PER_CONNECTION: usize = 100;

pub async fn run(proxy: &Child, server: &Child, addr: &str, n: usize) -> anyhow::Result<()> {
    let mb = |kib: u64| kib as f64 / 1024.0;
    let (proxy_idle, server_idle) = (proxy.rss_kib()?, server.rss_kib()?);
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
            eprintln!("  {} streams open, proxy {:.1} MB", held.len(), mb(proxy.rss_kib()?));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (proxy_busy, server_busy) = (proxy.rss_kib()?, server.rss_kib()?);
    println!("\nresident memory             idle   {n} streams   per stream");
    for (name, idle, busy) in [("proxy", proxy_idle, proxy_busy), ("replica (for scale)", server_idle, server_busy)] {
        let per = busy.saturating_sub(idle) as f64 * 1024.0 / n as f64;
        println!("{name:<22} {:>7.1} MB {:>10.1} MB {:>9.0} B", mb(idle), mb(busy), per);
    }
    drop(held);
    Ok(())
}
