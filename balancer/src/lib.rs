//! Local-first round-robin balancing for gRPC over every address of a DNS name, the
//! way a Kubernetes headless Service returns every pod IP.
//!
//! # Layout
//! The pure parts live in `lb-core` and are re-exported here: [`pick`] (the endpoint
//! set and the snapshot picker), [`retry`] (service config, policies, throttle),
//! [`backoff`], [`rng`], [`frame`], [`duration`]; the call state machine is
//! `lb_core::call`. This crate is the IO around them:
//! - [`discover`]: where endpoints come from: DNS lookups of the target and
//!   local-target names (the only DNS IO), or [`kubernetes`]: a Service's
//!   EndpointSlices, with node, zone and conditions.
//! - `pool`: the task that owns membership, connections, health and ejections, and
//!   publishes the snapshot calls pick from; [`connect`] keeps each connection up;
//!   `health` watches each connection's `grpc.health.v1` status.
//! - `transport`: HTTP/2 and HTTP/3 behind one interface: connect, send, and what each
//!   failure means (not sent, refused, or a status).
//! - `call`: the driver of one call's state machine; `wire` (pure) reads and writes
//!   gRPC's headers; [`counters`] counts what calls did.
//! - [`replay`]: a request body that can be sent again until the call commits.
//! - [`response`]: the response body; a failure mid-body becomes a status in trailers.
//! - [`channel`]: [`Balancer`], the `tower::Service` used by the proxy and by clients.
//! - [`code`], [`probe`], [`signal`], [`telemetry`]: small shared helpers for the
//!   binaries.
//!
//! # As a tonic channel
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use balancer::{Balancer, Settings};
//! let mut settings = Settings::new("server:50051".parse()?);
//! settings.local_target = Some("node-a.server:50051".parse()?);
//! let channel: Balancer<tonic::body::Body> = Balancer::new(settings)?;
//! // proto::hello_service_client::HelloServiceClient::new(channel)
//! # Ok(()) }
//! ```

mod call;
pub mod channel;
pub mod code;
pub mod connect;
pub mod counters;
pub mod discover;
pub mod error;
mod health;
pub mod kubernetes;
mod pool;
pub mod probe;
pub mod replay;
pub mod response;
pub mod signal;
pub mod telemetry;
mod transport;
mod wire;

pub use lb_core::{backoff, duration, frame, histogram, pick, retry, rng};

pub use channel::{Balancer, Placed, Placement, Settings};
pub use connect::Protocol;
pub use discover::HostPort;
pub use error::Error;
pub use pool::{EndpointState, EndpointView, Endpoints, Links, PoolEvent};
pub use wire::grpc_timeout;

/// HTTP/2 bodies over the `h2` crate, for a front that serves with it too.
pub mod h2 {
    pub use crate::transport::h2::{RecvBody, send_body};
}
