//! Command-line flags of slice-api; every flag also reads an env var.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// The sandbox's stand-in for the Kubernetes API server: serves the EndpointSlices of one
/// Service (list and watch, with resourceVersions and bookmarks), built from the Docker
/// containers of a compose project the way the EndpointSlice controller follows pods.
#[derive(Debug, Parser)]
#[command(name = "slice-api", version, about, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a slice-api whether it is ready, serving with the replicas listed from Docker
    /// (`GET /readyz`: exit 0), or not (exit 1). Container healthchecks use this: the
    /// images have no shell.
    HealthCheck {
        /// Address to probe.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
}

#[derive(Debug, Clone, ClapArgs)]
pub struct ServeArgs {
    /// Address to serve the API on (plain HTTP/1.1).
    #[arg(long, env = "SLICE_API_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The Docker Engine's unix socket.
    #[arg(long, env = "SLICE_API_DOCKER_SOCKET", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// Compose project whose containers are the pods (label com.docker.compose.project).
    #[arg(long, env = "COMPOSE_PROJECT_NAME", required = true)]
    pub project: Option<String>,
    /// Docker network whose address each endpoint gets [default: <project>_cluster].
    #[arg(long, env = "SLICE_API_NETWORK")]
    pub network: Option<String>,
    /// Replica image repository: running containers with a `sandbox.node` label and this
    /// image (any tag) are the endpoints; proxies and clients, with other images, are not.
    #[arg(long, env = "SLICE_API_IMAGE", default_value = "lb-sandbox/server")]
    pub image: String,
    /// The Service every replica belongs to (label kubernetes.io/service-name).
    #[arg(long, env = "SLICE_API_SERVICE", default_value = "server")]
    pub service: String,
    /// Namespace of the slices; other namespaces are empty.
    #[arg(long, env = "SLICE_API_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Name of the Service port in the slice.
    #[arg(long, env = "SLICE_API_PORT_NAME", default_value = "grpc")]
    pub port_name: String,
    /// Number of the Service port in the slice.
    #[arg(long, env = "SLICE_API_PORT", default_value_t = 50051, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// How often watches that allow bookmarks get one, e.g. "5s".
    #[arg(long, env = "SLICE_API_BOOKMARK_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub bookmark_interval: Duration,
    /// Changes kept for watches to resume from; an older resourceVersion gets 410 Gone.
    #[arg(long, env = "SLICE_API_HISTORY", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub history: u32,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match lb_core::duration::parse(s)? {
        d if d.is_zero() => Err("must be above zero".into()),
        d => Ok(d),
    }
}

impl ServeArgs {
    pub fn network(&self) -> String {
        self.network.clone().unwrap_or_else(|| format!("{}_cluster", self.project.as_deref().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_project() {
        let args = Args::try_parse_from(["slice-api", "--project", "lbsandbox"]).unwrap();
        assert_eq!(args.serve.network(), "lbsandbox_cluster");
        assert_eq!(args.serve.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(args.serve.image, "lb-sandbox/server");
        assert_eq!((args.serve.service.as_str(), args.serve.namespace.as_str()), ("server", "default"));
        assert_eq!(args.serve.bookmark_interval, Duration::from_secs(5));
    }

    #[test]
    fn health_check_needs_no_project() {
        let args = Args::try_parse_from(["slice-api", "health-check", "--addr", "127.0.0.1:18080"]).unwrap();
        assert!(matches!(args.command, Some(Command::HealthCheck { addr }) if addr.port() == 18080));
    }

    #[test]
    fn refuses_bad_flags() {
        for bad in [
            &["slice-api", "--project", "p", "--frobnicate"][..],
            &["slice-api", "--project", "p", "--port", "0"],
            &["slice-api", "--project", "p", "--bookmark-interval", "0s"],
            &["slice-api", "--project", "p", "--history", "0"],
            &["slice-api", "--project", "p", "--listen", "localhost"],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
