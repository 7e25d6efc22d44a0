//! The pure core of the balancer, in the manner of quinn-proto: no IO, no clock, no
//! async runtime. Time and randomness come in as arguments, so every rule here is
//! tested with exact sequences. The `balancer` crate is the IO shell around it.
//!
//! # Layout
//! - [`pick`]: the endpoint set and the local-first round-robin picker.
//! - [`retry`]: the service config, retry and hedging policies, the throttle.
//! - [`call`]: one call's state machine: attempts, transparent retries, retries,
//!   hedges, commit, deadline.
//! - [`outlier`]: A50 outlier detection plus consecutive-failure ejection.
//! - [`health`]: A17 health checking: the Watch request, its answers, what they mean.
//! - [`budget`]: the replay buffer every call shares.
//! - [`backoff`]: the reconnect delay; [`rng`]: the randomness it takes.
//! - [`window`]: calls per second and latency percentiles over the last ten seconds;
//!   [`histogram`]: lock-free Prometheus histograms, and tables of them by key.
//! - [`code`]: gRPC status codes and their HTTP mappings; [`frame`]: gRPC message
//!   prefixes; [`goaway`]: an HTTP/2 GOAWAY noticed as it arrives; [`duration`]: human
//!   durations for flags.

pub mod backoff;
pub mod budget;
pub mod call;
pub mod code;
pub mod duration;
pub mod frame;
pub mod goaway;
pub mod health;
pub mod histogram;
pub mod outlier;
pub mod pick;
pub mod retry;
pub mod rng;
pub mod window;

pub use code::Code;
