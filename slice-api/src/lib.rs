//! slice-api: the sandbox's stand-in for the Kubernetes API server, serving the one
//! resource the proxy's `--discovery kubernetes` watches (`discovery.k8s.io/v1`
//! EndpointSlices) and building it from Docker containers the way the EndpointSlice
//! controller builds it from pods. It is not an API server: GET only, one namespace,
//! one Service, no auth.
//!
//! # Layout
//! - [`selector`]: label selectors (pure).
//! - [`store`]: the slices, one resourceVersion counter, the bounded history (pure).
//! - [`replica`]: a container's `docker inspect` to an endpoint, replicas to a slice (pure).
//! - [`hub`]: the store shared by the writer and the watches; bounded fan-out (no IO).
//! - [`api`]: paths, query strings and the API server's JSON (pure).
//! - [`http`]: the hyper server: lists, streamed watches, `/healthz`, `/version`.
//! - [`docker`]: the Docker Engine client and the event follower (the only Docker IO).
//! - [`config`]: the flags, each with an env var.

pub mod api;
pub mod config;
pub mod docker;
pub mod http;
pub mod hub;
pub mod replica;
pub mod selector;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;

pub use crate::config::{Args, ServeArgs};
use crate::hub::Hub;
use crate::store::Store;

/// Events a watch may have queued before it is ended for falling behind.
pub const WATCH_BUFFER: usize = 256;

/// Serves the hub on `listener`, with bookmarks every `bookmark_interval`, until
/// `shutdown` resolves. Tests call this with a hub they feed themselves.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    bookmark_interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let bookmarks = tokio::spawn({
        let hub = hub.clone();
        async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + bookmark_interval, bookmark_interval);
            loop {
                tick.tick().await;
                hub.bookmark();
            }
        }
    });
    http::serve(listener, hub, shutdown).await;
    bookmarks.abort();
}

/// Follows Docker into a new store and serves it until `shutdown` resolves.
pub async fn run(args: ServeArgs, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let store = Store::new(&args.namespace, starting_version(SystemTime::now()), args.history as usize);
    let hub = Arc::new(Hub::new(store, WATCH_BUFFER));
    let source = docker::Source {
        project: args.project.clone().unwrap_or_default(),
        selection: replica::Selection { image: args.image.clone(), network: args.network() },
        service: args.service.clone(),
        namespace: args.namespace.clone(),
        port: replica::ServicePort { name: args.port_name.clone(), port: args.port.into() },
    };
    tracing::info!(
        listen = %args.listen, project = %source.project, network = %source.selection.network,
        image = %source.selection.image, service = %source.service, namespace = %source.namespace,
        "Serving EndpointSlices"
    );
    let follower = tokio::spawn(docker::follow(docker::Client::new(&args.docker_socket), source, hub.clone()));
    serve(listener, hub, args.bookmark_interval, shutdown).await;
    follower.abort();
}

/// The version before the first change: the wall clock in milliseconds, so a restarted
/// slice-api issues versions above any it issued before, and a client resuming from an
/// old one gets 410 Gone and relists instead of waiting for the count to catch up.
pub fn starting_version(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
