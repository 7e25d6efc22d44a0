//! gRPC over HTTP/3 with quinn, h3 and h3-quinn: a server loop that feeds h3 requests
//! to any tower service (tonic routes, the proxy), a client over one h3 connection,
//! TLS 1.3 configs with ALPN `h3` on rustls's ring provider, and sandbox certificates.
//!
//! # Layout
//! - [`tls`]: server and client QUIC configs from PEM files; clear one-line errors.
//! - [`certs`]: a sandbox CA and a leaf certificate, made with rcgen.
//! - [`body`]: [`body::H3Body`], the receive half of a request stream as an `http_body::Body`.
//! - [`server`]: [`server::serve`], with GOAWAY and a bounded drain on shutdown.
//! - [`client`]: [`client::H3Client`], requests over one connection.

pub mod body;
pub mod certs;
pub mod client;
pub mod server;
pub mod tls;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The ALPN protocol id of HTTP/3.
pub const ALPN: &[u8] = b"h3";
