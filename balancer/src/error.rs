//! Why a call could not be placed on an endpoint, and how that reaches the caller.

use std::time::Duration;

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resolver could not be built (e.g. an unreadable /etc/resolv.conf).
    #[error("DNS resolver: {0}")]
    Resolver(String),
    /// No endpoint became ready within the connect timeout (the call had no deadline),
    /// or none was ready at once for a fail-fast call (`waited` is zero).
    #[error("no ready endpoint for {target}{}: {tried}", after(*waited))]
    NoEndpoint { target: String, waited: Duration, tried: String },
    /// The call's own deadline passed: while it waited for an endpoint, between
    /// attempts, or with attempts in flight (which the proxy then cancelled).
    #[error("deadline exceeded calling {target} after {attempts} attempt(s): {tried}")]
    Deadline { target: String, attempts: u32, tried: String },
    /// A request message was larger than allowed.
    #[error(transparent)]
    TooLarge(#[from] crate::frame::TooLarge),
    /// The endpoint failed the call without a gRPC status: a reset, a lost connection,
    /// a refused stream or an HTTP error, mapped to `code` as gRPC maps them.
    #[error("upstream {addr} failed: {why}")]
    Upstream { code: lb_core::Code, addr: std::net::SocketAddr, why: String },
    /// The caller went away.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The HTTP/3 settings could not be used (CA file, UDP socket).
    #[error("HTTP/3: {0}")]
    H3(String),
}

fn after(waited: Duration) -> String {
    if waited.is_zero() { " (fail-fast: waitForReady is false)".to_owned() } else { format!(" after {waited:?}") }
}

impl Error {
    /// The status code a caller sees for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::Deadline { .. } => tonic::Code::DeadlineExceeded,
            Error::TooLarge(_) => tonic::Code::ResourceExhausted,
            Error::Upstream { code, .. } => crate::code::to_tonic(*code),
            Error::Cancelled => tonic::Code::Cancelled,
            _ => tonic::Code::Unavailable,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
