//! The proxy: accepts gRPC over h2c (and HTTP/3 with `--listen-h3`) and forwards every
//! call, of any method and streaming kind, to a replica picked by
//! [`balancer::Balancer`], without decoding protobuf. It answers
//! `grpc.health.v1.Health` itself: SERVING while at least one replica is ready.
//!
//! # Layout
//! - [`config`]: flags and env vars.
//! - [`admin`]: the read-only admin API (`--admin-listen`): endpoints and metrics.
//! - [`run`]: the accept loops, per-request routing, and graceful shutdown.
//! - `front`: the h2c front over the `h2` crate; `relay`: the `--relay` front, the IO
//!   around the `relay` crate's frame relay.

pub mod admin;
mod busy;
mod coalesce;
pub mod config;
mod front;
mod relay;

use std::{convert::Infallible, future::Future, sync::Arc};

use anyhow::Context;
use balancer::{Balancer, response::UpstreamBody};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Either;
use tokio::net::TcpListener;
use tonic::body::Body as TonicBody;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tower::Service;
use tracing::{info, warn};

use config::ServeArgs;

/// Requests arrive over HTTP/2 (h2c) or HTTP/3.
type FrontBody = Either<balancer::h2::RecvBody, grpc_h3::server::ServerBody>;
type ProxyBody = Either<UpstreamBody, TonicBody>;
type Health = HealthServer<HealthService>;

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// What every request needs, shared by both fronts.
struct App {
    /// Places calls on replicas.
    balancer: Balancer<FrontBody>,
    /// Answers health checks here, from the balancer's ready count.
    health: Health,
    /// `--busy-poll`: told when h2c calls start and finish.
    busy: Option<Arc<busy::BusyPoll>>,
    /// `--coalesce`: counts the open h2c calls.
    coalesce: Option<Arc<coalesce::Coalesce>>,
    /// `--relay`: h2c clients are served by the frame relay.
    relay: bool,
    /// Bounds the relay's connects to replicas.
    connect_timeout: std::time::Duration,
    /// `--keepalive-interval`: the relay pings a replica connection carrying calls
    /// after this long with nothing heard.
    keepalive: std::time::Duration,
    /// `--client-keepalive`: each client is pinged after this long, and let go when it
    /// answers nothing for twice as long.
    client_keepalive: std::time::Duration,
    /// `--max-message-size`, for the relay (the balancer applies it on the h2 path).
    max_message: u32,
    /// `--replay-buffer`, for the relay: request bytes it keeps per call, from the
    /// balancer's shared budget (`--replay-buffer-total`).
    replay: usize,
}

impl App {
    /// The call's future: a forwarded call, or the proxy's own health answer (boxed,
    /// as tonic's future is as large as a forwarded call's and every call's state
    /// would otherwise reserve room for both).
    fn handle(&self, req: Request<FrontBody>) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        if req.uri().path().starts_with(HEALTH_PREFIX) {
            let mut health = self.health.clone();
            return futures_util::future::Either::Left(async move {
                match Box::pin(health.call(req)).await {
                    Ok(resp) => resp.map(Either::Right),
                    Err(never) => match never {},
                }
            });
        }
        // `map`, not an async block: one holding the future across its await would
        // keep two copies of it.
        let call = self.balancer.send(req).map(|result| match result {
            Ok(resp) => resp.map(Either::Left),
            Err(status) => status.into_http().map(Either::Right),
        });
        futures_util::future::Either::Right(call)
    }
}

/// Serves until `shutdown` resolves, then sends GOAWAY to clients and gives open calls
/// `--drain-timeout` to finish.
pub async fn run(args: ServeArgs, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let admin_listener = match args.admin_listen.0 {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding --admin-listen {addr}"))?),
        None => None,
    };
    let settings = args.settings()?;
    let (relay, relay_unfit) = args.uses_relay();
    let balancer = Balancer::new(settings).context("starting the balancer")?;
    if args.coalesce > 0 && args.threads != Some(1) {
        warn!("--coalesce saves little without --threads 1: the other workers still wake for every arrival");
    }
    let coalesce =
        (args.coalesce > 0).then(|| coalesce::Coalesce::start(std::time::Duration::from_micros(args.coalesce)));
    let admin = admin_listener.map(|l| {
        info!(admin_listen = %l.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string()), "Admin API: a live page on /, /admin/endpoints, /admin/events, /metrics");
        let balancer = balancer.clone();
        let subscribe = {
            let balancer = balancer.clone();
            move || balancer.events()
        };
        let node = args.node.clone();
        let coalesce = coalesce.clone();
        let read = move || admin::Snapshot {
            node: node.clone(),
            endpoints: balancer.endpoints(),
            counters: balancer.counters().clone(),
            throttle: balancer.throttle(),
            coalesce_sleeps: coalesce.as_ref().map(|c| c.sleeps()),
        };
        tokio::spawn(admin::serve(l, read, subscribe))
    });
    let reporter = HealthReporter::new();
    let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    reporter.set_service_status("", ServingStatus::NotServing).await;
    tokio::spawn(report_health(reporter, balancer.ready_endpoints()));
    if args.discovery == "kubernetes" {
        info!(listen = %listener.local_addr()?, "Proxying gRPC");
    } else {
        info!(
            listen = %listener.local_addr()?,
            target = %args.target,
            local_target = ?args.local_target.as_ref().map(ToString::to_string),
            "Proxying gRPC"
        );
    }
    if args.busy_poll > 0 && args.threads != Some(1) {
        warn!("--busy-poll spins to no purpose without --threads 1: a parked worker holds the I/O it would poll");
    }
    let busy = (args.busy_poll > 0).then(|| busy::BusyPoll::start(std::time::Duration::from_micros(args.busy_poll)));
    match (relay, relay_unfit) {
        (true, _) => info!("Forwarding h2c calls with the frame relay"),
        (false, Some(why)) => info!("Forwarding h2c calls with the HTTP/2 stack: the frame relay {why}"),
        (false, None) => info!("Forwarding h2c calls with the HTTP/2 stack (--relay off)"),
    }
    let app = Arc::new(App {
        balancer,
        health,
        busy,
        coalesce,
        relay,
        connect_timeout: args.connect_timeout,
        keepalive: args.keepalive_interval,
        client_keepalive: args.client_keepalive,
        max_message: args.max_message_size,
        replay: args.replay_buffer,
    });
    let (h3_stop, h3) = match h3_front(&args, app.clone())? {
        Some((stop, task)) => (Some(stop), Some(task)),
        None => (None, None),
    };
    // Connections hold a clone of `alive` until they end; `drain` tells them to stop.
    let (drain, draining) = tokio::sync::watch::channel(false);
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "Accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let (app, draining, alive) = (app.clone(), draining.clone(), alive.clone());
        tokio::spawn(async move {
            match app.relay {
                true => relay::serve(tcp, peer, app, draining).await,
                false => front::serve(tcp, peer, app, draining).await,
            }
            drop(alive);
        });
    }
    info!(drain_timeout_ms = args.drain_timeout.as_millis() as u64, "Draining");
    if let Some(stop) = h3_stop {
        let _ = stop.send(());
    }
    let _ = drain.send(true);
    drop(alive);
    if tokio::time::timeout(args.drain_timeout, all_done.recv()).await.is_err() {
        warn!("Drain deadline passed; closing with calls in flight");
    }
    if let Some(h3) = h3 {
        let _ = h3.await;
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    Ok(())
}

/// The HTTP/3 listener beside the h2c one, when `--listen-h3` is given.
fn h3_front(
    args: &ServeArgs,
    app: Arc<App>,
) -> anyhow::Result<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>> {
    let (Some(addr), Some(cert), Some(key)) = (args.listen_h3, &args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let quic = grpc_h3::tls::server_config(cert, key).context("--listen-h3 certificate")?;
    let endpoint = quinn::Endpoint::server(quic, addr).with_context(|| format!("binding --listen-h3 {addr}"))?;
    info!(listen_h3 = %endpoint.local_addr()?, "Accepting gRPC over HTTP/3");
    let svc = tower::service_fn(move |req: Request<grpc_h3::server::ServerBody>| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req.map(Either::Right)).await) }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    Ok(Some((stop, tokio::spawn(grpc_h3::server::serve(endpoint, svc, shutdown, args.drain_timeout)))))
}

async fn report_health(reporter: HealthReporter, mut ready: tokio::sync::watch::Receiver<usize>) {
    loop {
        let n = *ready.borrow_and_update();
        let status = if n > 0 { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        if ready.changed().await.is_err() {
            return;
        }
    }
}
