//! Retries, hedging and retry throttling as gRFC A6 defines them, configured by the
//! standard gRPC service config. Pure: decisions take the attempt count, the status,
//! the throttle and an RNG; the call state machine ([`crate::call`]) applies them.
//!
//! - [`config`]: parses and validates the service config JSON.
//! - [`policy`]: when to retry and after how long; hedging's non-fatal codes.
//! - [`throttle`]: the per-target token bucket.
//! - [`hedge`]: when hedged attempts start.

pub mod config;
pub mod hedge;
pub mod policy;
pub mod throttle;

pub use config::{MethodConfig, ServiceConfig};
pub use hedge::HedgeSchedule;
pub use policy::{HedgingPolicy, Pushback, RetryPolicy, Verdict};
pub use throttle::Throttle;
