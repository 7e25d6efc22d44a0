//! Local-first round-robin balancing for gRPC over every address of a DNS name, the
//! way a Kubernetes headless Service returns every pod IP.
//!
//! # Layout
//! - [`pick`] (pure): the endpoint set and the local-first round-robin picker.
//! - [`backoff`] (pure): the reconnect delay; [`rng`] is the randomness it takes.
//! - [`discover`]: DNS lookups of the target and local-target names (the only DNS IO).
//! - `pool`: the endpoints' connections and the discovery loop; [`connect`] keeps each
//!   connection up over HTTP/2 or HTTP/3.
//! - [`replay`]: a request body that can be sent again while uncommitted; [`frame`]
//!   (pure) spots oversized messages in it.
//! - [`response`]: the response body; a lost endpoint becomes UNAVAILABLE trailers.
//! - [`retry`] (pure): service config, retry and hedging policies, the throttle.
//! - `call`: one call's path: wait, send, replay, retry or hedge; [`counters`] counts it;
//!   `wire` (pure) reads and writes gRPC's headers.
//! - [`channel`]: [`Balancer`], the `tower::Service` used by the proxy and by clients.
//! - [`code`], [`duration`], [`probe`], [`signal`], [`telemetry`]: small shared helpers
//!   for the binaries.
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
mod pool;
pub mod probe;
pub mod replay;
pub mod response;
pub mod signal;
pub mod telemetry;
mod transport;
mod wire;

pub use lb_core::{backoff, duration, frame, pick, retry, rng};

pub use channel::{Balancer, Settings};
pub use connect::Protocol;
pub use discover::HostPort;
pub use error::Error;
pub use wire::grpc_timeout;
