//! Command-line flags of the greeter replica; every flag also reads an env var.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use balancer::code::parse_code;
use clap::{Args as ClapArgs, Parser, Subcommand};

/// A greeter replica of `hello.HelloService`.
#[derive(Debug, Parser)]
#[command(name = "server", version, about)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a server's grpc.health.v1.Health whether it is SERVING (exit 0) or not (exit 1).
    /// Container healthchecks use this: the images have no shell.
    HealthCheck {
        /// Address to probe.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: SocketAddr,
    },
    /// Make a sandbox CA (ca.pem) and a certificate (cert.pem, key.pem) for HTTP/3,
    /// unless OUT already holds a set made for the same names: that one is kept, as
    /// running replicas were started with it.
    Certs {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// DNS names and IP addresses the certificate is valid for.
        #[arg(long = "name", required = true, num_args = 1..)]
        names: Vec<String>,
    },
}

#[derive(Debug, Clone, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on for gRPC (h2c).
    #[arg(long, env = "SERVER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Replica name shown in replies [default: the hostname].
    #[arg(long, env = "SERVER_NAME")]
    pub name: Option<String>,
    /// Simulated node this replica runs on.
    #[arg(long, env = "SERVER_NODE", default_value = "node-a")]
    pub node: String,
    /// How long in-flight calls may run after SIGTERM/SIGINT, e.g. "10s" or "500ms".
    #[arg(long, env = "SERVER_DRAIN_TIMEOUT", default_value = "10s", value_parser = balancer::duration::parse)]
    pub drain_timeout: Duration,
    /// Share of calls (0.0..=1.0) that fail with --fail-code.
    #[arg(long, env = "SERVER_FAIL_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Status for injected failures, by name (UNAVAILABLE) or number (14).
    #[arg(long, env = "SERVER_FAIL_CODE", default_value = "UNAVAILABLE", value_parser = parse_code)]
    pub fail_code: tonic::Code,
    /// With injected failures, send `grpc-retry-pushback-ms` with this value (negative
    /// asks callers not to retry).
    #[arg(long, env = "SERVER_FAIL_PUSHBACK_MS", allow_negative_numbers = true)]
    pub fail_pushback_ms: Option<i64>,
    /// Extra latency added to every call and every stream message, in milliseconds.
    #[arg(long, env = "SERVER_DELAY_MS", default_value_t = 0)]
    pub delay_ms: u64,
    /// PEM certificate chain; with --tls-key, HTTP/3 is served on UDP at the --listen port.
    #[arg(long, env = "SERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not serve HTTP/3 even with a certificate.
    #[arg(long, env = "SERVER_NO_H3")]
    pub no_h3: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a number from 0.0 to 1.0, got {s:?}")),
    }
}

/// The settings a running replica uses, with defaults filled in.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub node: String,
    pub drain_timeout: Duration,
    pub fail_rate: f64,
    pub fail_code: tonic::Code,
    pub fail_pushback_ms: Option<i64>,
    pub delay: Duration,
    /// Serve HTTP/3 with this QUIC config.
    pub h3: Option<quinn::ServerConfig>,
    /// True while the replica is sick: health says NOT_SERVING and calls fail with
    /// UNAVAILABLE, as a replica whose own dependency is down would do. The binary
    /// toggles it on SIGUSR1.
    pub sick: tokio::sync::watch::Receiver<bool>,
}

impl TryFrom<ServeArgs> for Config {
    type Error = grpc_h3::tls::TlsError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let h3 = match (&a.tls_cert, &a.tls_key, a.no_h3) {
            (Some(cert), Some(key), false) => Some(grpc_h3::tls::server_config(cert, key)?),
            _ => None,
        };
        Ok(Config {
            name: a.name.unwrap_or_else(hostname),
            node: a.node,
            drain_timeout: a.drain_timeout,
            fail_rate: a.fail_rate,
            fail_code: a.fail_code,
            fail_pushback_ms: a.fail_pushback_ms,
            delay: Duration::from_millis(a.delay_ms),
            h3,
            sick: tokio::sync::watch::channel(false).1,
        })
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "server".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_rate_out_of_range_naming_the_flag() {
        let err = Args::try_parse_from(["server", "--fail-rate", "1.5"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--fail-rate"), "{msg}");
        assert!(msg.contains("0.0 to 1.0"), "{msg}");
    }

    #[test]
    fn parses_codes_by_name_and_number() {
        let a = Args::try_parse_from(["server", "--fail-code", "not_found"]).unwrap();
        assert_eq!(a.serve.fail_code, tonic::Code::NotFound);
        let a = Args::try_parse_from(["server", "--fail-code", "14"]).unwrap();
        assert_eq!(a.serve.fail_code, tonic::Code::Unavailable);
        assert!(Args::try_parse_from(["server", "--fail-code", "NOPE"]).is_err());
    }
}
