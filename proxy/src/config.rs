//! Command-line flags of the proxy; every flag also reads an env var.

use std::{net::SocketAddr, time::Duration};

use balancer::{HostPort, Settings, duration};
use clap::{Args as ClapArgs, Parser, Subcommand};

/// A gRPC proxy that spreads calls round-robin over the replicas on its node and fails
/// over to replicas on other nodes.
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a proxy's grpc.health.v1.Health whether it is SERVING (exit 0) or not (exit 1).
    HealthCheck {
        /// Address to probe.
        #[arg(long, default_value = "127.0.0.1:50050")]
        addr: SocketAddr,
    },
}

#[derive(Debug, Clone, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on for gRPC (h2c).
    #[arg(long, env = "PROXY_LISTEN", default_value = "0.0.0.0:50050")]
    pub listen: SocketAddr,
    /// HOST:PORT whose DNS name returns every replica (a headless Service).
    #[arg(long, env = "PROXY_TARGET", default_value = "server:50051")]
    pub target: HostPort,
    /// HOST:PORT whose addresses are this node's replicas; without it, no locality.
    #[arg(long, env = "PROXY_LOCAL_TARGET")]
    pub local_target: Option<HostPort>,
    /// DNS server IP:PORT to ask [default: the system resolver configuration].
    #[arg(long, env = "PROXY_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// How often to resolve the names again.
    #[arg(long, env = "PROXY_RESOLVE_INTERVAL", default_value = "1s", value_parser = duration::parse)]
    pub resolve_interval: Duration,
    /// Bounds each TCP connect, and how long a call without a deadline waits for a
    /// ready replica before failing with UNAVAILABLE.
    #[arg(long, env = "PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub connect_timeout: Duration,
    /// Request bytes kept per call so a call a replica never processed can be replayed
    /// on another; larger requests are sent once.
    #[arg(long, env = "PROXY_REPLAY_BUFFER", default_value_t = 1 << 20)]
    pub replay_buffer: usize,
    /// Largest request message, in bytes; larger ones fail with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PROXY_MAX_MESSAGE_SIZE", default_value_t = 4 << 20)]
    pub max_message_size: u32,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, env = "PROXY_THREADS")]
    pub threads: Option<usize>,
    /// How long open calls may finish after SIGTERM/SIGINT.
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    pub drain_timeout: Duration,
}

impl ServeArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            target: self.target.clone(),
            local_target: self.local_target.clone(),
            dns_server: self.dns_server,
            resolve_interval: self.resolve_interval,
            connect_timeout: self.connect_timeout,
            replay_limit: self.replay_buffer,
            max_message: self.max_message_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::try_parse_from(std::iter::once("proxy").chain(args.iter().copied())).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_sandbox() {
        let a = parse(&[]).unwrap().serve;
        assert_eq!(a.listen, "0.0.0.0:50050".parse().unwrap());
        assert_eq!(a.target.to_string(), "server:50051");
        assert_eq!(a.local_target, None);
        assert_eq!(a.resolve_interval, Duration::from_secs(1));
        assert_eq!(a.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--target", "server"][..], "--target"),
            (&["--resolve-interval", "soon"][..], "--resolve-interval"),
            (&["--dns-server", "dns"][..], "--dns-server"),
            (&["--listen", "50050"][..], "--listen"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
    }
}
