//! A greeter replica: `hello.HelloService`, `grpc.health.v1.Health`, server reflection
//! (v1 and v1alpha), fault injection, and a bounded graceful drain.
//!
//! # Layout
//! - [`config`]: flags and env vars.
//! - [`greeter`]: the service itself.
//! - [`run`]: serves on a bound listener until `shutdown` resolves, then drains.

pub mod config;
pub mod greeter;

use std::{future::Future, sync::Arc};

use anyhow::Context;
use proto::hello_service_server::HelloServiceServer;
use tokio::{net::TcpListener, sync::watch};
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use config::{Args, Config};
use greeter::Greeter;

/// How long a draining replica says NOT_SERVING before it sends GOAWAY.
pub const HEALTH_NOTICE: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves until `shutdown` resolves, then drains: health turns NOT_SERVING, and
/// [`HEALTH_NOTICE`] later HTTP/2 GOAWAY goes out, unbounded streams end with
/// UNAVAILABLE, and other calls get `drain_timeout` to finish before the connections
/// are closed.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_routes(cfg, listener, shutdown, Routes::default()).await
}

/// [`run`], also serving `extra` services (tests add streaming kinds HelloService lacks).
pub async fn run_with_routes(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    extra: Routes,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    info!(
        %addr,
        name = %cfg.name,
        node = %cfg.node,
        fail_rate = cfg.fail_rate,
        fail_code = ?cfg.fail_code,
        fail_pushback_ms = ?cfg.fail_pushback_ms,
        delay_ms = cfg.delay.as_millis() as u64,
        drain_timeout_ms = cfg.drain_timeout.as_millis() as u64,
        "Serving hello.HelloService"
    );
    let drain_timeout = cfg.drain_timeout;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<HelloServiceServer<Greeter>>().await;
    let sick_reporter = reporter.clone();
    let mut sick = cfg.sick.clone();
    let sickness = tokio::spawn(async move {
        while sick.changed().await.is_ok() {
            let status = if *sick.borrow_and_update() { ServingStatus::NotServing } else { ServingStatus::Serving };
            warn!(?status, "Health changed by SIGUSR1");
            sick_reporter.set_service_status("", status).await;
            sick_reporter.set_service_status("hello.HelloService", status).await;
        }
    });
    let (draining_tx, draining_rx) = watch::channel(false);
    let mut cfg = cfg;
    let cfg_h3 = cfg.h3.take();
    let greeter = Greeter::new(Arc::new(cfg), draining_rx.clone());

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let routes = extra
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(HelloServiceServer::new(greeter));
    let h3 = match cfg_h3 {
        Some(quic) => {
            let endpoint =
                quinn::Endpoint::server(quic, addr).with_context(|| format!("binding HTTP/3 on udp {addr}"))?;
            info!(%addr, "Serving HTTP/3");
            let mut draining = draining_rx.clone();
            let stop = async move {
                let _ = draining.wait_for(|d| *d).await;
            };
            Some(tokio::spawn(grpc_h3::server::serve(endpoint, routes.clone(), stop, drain_timeout)))
        }
        None => None,
    };
    let serve = Server::builder().add_routes(routes).serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serve);

    tokio::select! {
        res = &mut serve => return res.context("serving"),
        () = shutdown => {}
    }
    info!(drain_timeout_ms = drain_timeout.as_millis() as u64, "Draining");
    sickness.abort();
    reporter.set_not_serving::<HelloServiceServer<Greeter>>().await;
    reporter.set_service_status("", ServingStatus::NotServing).await;
    // Balancers watching health stop picking this replica now; give them that long
    // before the GOAWAY, so new calls go elsewhere instead of being refused.
    tokio::time::sleep(HEALTH_NOTICE).await;
    let _ = draining_tx.send(true);
    let _ = stop_tx.send(());
    match tokio::time::timeout(drain_timeout, serve).await {
        Ok(res) => res.context("serving")?,
        Err(_) => warn!("Drain deadline passed; closing with calls in flight"),
    }
    if let Some(h3) = h3 {
        let _ = h3.await;
    }
    info!("Stopped");
    Ok(())
}
