//! Command-line flags of the proxy; every flag also reads an env var.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use balancer::{
    HostPort, Protocol, Settings, duration,
    kubernetes::{KubernetesSettings, PortRef},
    retry::ServiceConfig,
};
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
    /// HTTP/2 keepalive: a ping to each replica after this long with nothing heard from
    /// it, so a dead or hung one is noticed 1 to 1.25 intervals plus 750 ms after its
    /// last word. gRPC servers refuse pings more often than every 5 min during
    /// calls, and any between calls, by default (GOAWAY too_many_pings); the proxy then
    /// pings that replica half as often, up to 5 min, and only during calls.
    #[arg(long, env = "PROXY_KEEPALIVE_INTERVAL", default_value = "1s", value_parser = duration::parse)]
    pub keepalive_interval: Duration,
    /// A ping to each client after this long (the h2 path: every this long), so one
    /// that vanished without a FIN is let go, its calls cancelled, when it answers
    /// nothing for twice this long after the ping.
    #[arg(long, env = "PROXY_CLIENT_KEEPALIVE", default_value = "10s", value_parser = duration::parse)]
    pub client_keepalive: Duration,
    /// Request bytes kept per call so a call a replica never processed can be replayed
    /// on another; larger requests are sent once.
    #[arg(long, env = "PROXY_REPLAY_BUFFER", default_value_t = 1 << 20)]
    pub replay_buffer: usize,
    /// Request bytes kept for replays and retries by all calls together.
    #[arg(long, env = "PROXY_REPLAY_BUFFER_TOTAL", default_value_t = 16 << 20)]
    pub replay_buffer_total: usize,
    /// A gRPC service config (JSON): per-method timeout, waitForReady, retryPolicy or
    /// hedgingPolicy, and retryThrottling, as in gRFC A6.
    #[arg(long, env = "PROXY_SERVICE_CONFIG")]
    pub service_config: Option<PathBuf>,
    /// Upper bound on any policy's maxAttempts.
    #[arg(long, env = "PROXY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_attempts: u32,
    /// Largest request message, in bytes; larger ones fail with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PROXY_MAX_MESSAGE_SIZE", default_value_t = 4 << 20)]
    pub max_message_size: u32,
    /// Protocol to the replicas: h2, h3, or auto (HTTP/3 first, HTTP/2 per endpoint when
    /// QUIC cannot connect, HTTP/3 again every 30 s).
    #[arg(long, env = "PROXY_UPSTREAM_PROTOCOL", default_value = "h2")]
    pub upstream_protocol: Protocol,
    /// CA certificate (PEM) that signs the replicas' certificates; needed for h3 and auto.
    #[arg(long, env = "PROXY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Also accept gRPC over HTTP/3 on this UDP address (needs --tls-cert and --tls-key).
    #[arg(long, env = "PROXY_LISTEN_H3", requires_all = ["tls_cert", "tls_key"])]
    pub listen_h3: Option<SocketAddr>,
    /// PEM certificate chain for --listen-h3.
    #[arg(long, env = "PROXY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --listen-h3.
    #[arg(long, env = "PROXY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// After a call starts or finishes, poll for I/O without sleeping for up to this
    /// many microseconds before parking (0: off). Cuts the latency of lone calls on
    /// virtual machines, where a wake-up is dear, at the price of a busy CPU while calls
    /// come and go. Only with --threads 1: with more, the spinning worker cannot poll
    /// the I/O a parked worker is waiting on.
    #[arg(long, value_name = "MICROS", env = "PROXY_BUSY_POLL", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub busy_poll: u64,
    /// Under load, sleep this many microseconds between polls for I/O instead of waking
    /// for each arrival (0: off), as a network card coalesces interrupts: each wake-up
    /// then reads and writes many calls' frames, for less CPU per call. It sleeps only
    /// while 8 or more h2c calls are open on average, at least one ends per MICROS, and
    /// they took 4 times MICROS or more on average, the sleeps' own wait aside; a call then waits
    /// about MICROS more. Only with --threads 1: with more, the other workers still
    /// wake for every arrival. Not with --busy-poll.
    #[arg(long, value_name = "MICROS", env = "PROXY_COALESCE", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub coalesce: u64,
    /// How h2c calls are forwarded: `auto` (the frame relay wherever it applies, the
    /// HTTP/2 stack otherwise), `on` (the frame relay, or a start-up error naming what
    /// it cannot do), or `off` (the HTTP/2 stack). The relay passes frames between the
    /// client's connection and connections to replicas with their stream ids
    /// rewritten, at a fraction of the CPU, with the same balancing, retries, hedges,
    /// timeouts, waits, keepalives, health answers and metrics; it forwards over
    /// HTTP/2 only, so `auto` keeps the HTTP/2 stack when --upstream-protocol is not
    /// h2. HTTP/3 clients always use the HTTP/2 stack's call path.
    #[arg(long, env = "PROXY_RELAY", default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub relay: RelayMode,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, env = "PROXY_THREADS")]
    pub threads: Option<usize>,
    /// The admin API (HTTP/1.1, read-only): a live page on /, /admin/endpoints,
    /// /admin/events and /metrics; `off` for none.
    #[arg(long, env = "PROXY_ADMIN_LISTEN", default_value = "0.0.0.0:9901")]
    pub admin_listen: AdminListen,
    /// Per-method counters and the gRPC call and attempt histograms on /metrics: on or
    /// off (off: endpoint states, counts and rates only, for measuring their cost).
    #[arg(long, env = "PROXY_METRICS", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// Where replicas come from: `dns` (--target, --local-target) or `kubernetes` (the
    /// EndpointSlices of --service, with node and zone locality).
    #[arg(long, env = "PROXY_DISCOVERY", default_value = "dns", value_parser = ["dns", "kubernetes"])]
    pub discovery: String,
    /// With --discovery kubernetes: the Service whose EndpointSlices to watch.
    #[arg(long, env = "PROXY_SERVICE")]
    pub service: Option<String>,
    /// With --discovery kubernetes: the Service's namespace [default: the pod's own,
    /// or the kubeconfig context's].
    #[arg(long, env = "PROXY_NAMESPACE")]
    pub namespace: Option<String>,
    /// With --discovery kubernetes: the Service's port, by name or number.
    #[arg(long = "port", env = "PROXY_SERVICE_PORT")]
    pub service_port: Option<PortRef>,
    /// The node this proxy runs on (the downward API's spec.nodeName): with Kubernetes
    /// discovery its replicas come first; shown by the admin API and its page.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// The zone this proxy runs in: with Kubernetes discovery its replicas come next.
    #[arg(long, env = "ZONE")]
    pub zone: Option<String>,
    /// How long open calls may finish after SIGTERM/SIGINT.
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    pub drain_timeout: Duration,
}

/// `--relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    On,
    Off,
    Auto,
}

impl std::str::FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(RelayMode::On),
            "off" => Ok(RelayMode::Off),
            "auto" => Ok(RelayMode::Auto),
            _ => Err(format!("expected on, off or auto, got {s:?}")),
        }
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// Where the admin API listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(AdminListen(None));
        }
        s.parse().map(|a| AdminListen(Some(a))).map_err(|_| format!("expected IP:PORT or off, got {s:?}"))
    }
}

impl ServeArgs {
    /// Whether h2c calls go through the frame relay with these settings; with `auto`
    /// and not, why not.
    pub fn uses_relay(&self) -> (bool, Option<String>) {
        match self.relay {
            RelayMode::On => (true, None),
            RelayMode::Off => (false, None),
            RelayMode::Auto => match self.relay_unfit() {
                Some(why) => (false, Some(why)),
                None => (true, None),
            },
        }
    }

    /// What the frame relay cannot do that these flags ask for, if anything.
    fn relay_unfit(&self) -> Option<String> {
        (self.upstream_protocol != Protocol::H2)
            .then(|| format!("forwards over HTTP/2 only, not --upstream-protocol {}", self.upstream_protocol))
    }

    /// The balancer's settings; reads and validates `--service-config`.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let service_config = match &self.service_config {
            Some(path) => {
                let json = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--service-config {}: {e}", path.display()))?;
                ServiceConfig::parse(&json, self.max_attempts)
                    .map_err(|e| anyhow::anyhow!("--service-config {}: {e}", path.display()))?
            }
            None => ServiceConfig::default(),
        };
        if self.keepalive_interval < Duration::from_millis(10) {
            anyhow::bail!("--keepalive-interval must be at least 10ms, got {:?}", self.keepalive_interval);
        }
        if self.client_keepalive < Duration::from_millis(10) {
            anyhow::bail!("--client-keepalive must be at least 10ms, got {:?}", self.client_keepalive);
        }
        let kubernetes = match self.discovery.as_str() {
            "kubernetes" => {
                let (Some(service), Some(port)) = (&self.service, &self.service_port) else {
                    anyhow::bail!("--discovery kubernetes needs --service NAME and --port NAME|NUMBER");
                };
                let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
                if non_empty(&self.node).is_none() {
                    tracing::warn!("--discovery kubernetes without --node (NODE_NAME): no replica counts as local");
                }
                Some(KubernetesSettings {
                    service: service.clone(),
                    namespace: non_empty(&self.namespace),
                    port: port.clone(),
                    node: non_empty(&self.node),
                    zone: non_empty(&self.zone),
                })
            }
            _ => None,
        };
        if self.busy_poll > 0 && self.coalesce > 0 {
            anyhow::bail!(
                "--busy-poll and --coalesce pull against each other: one polls without sleeping, the other sleeps between polls; choose one"
            );
        }
        if self.upstream_protocol != Protocol::H2 && self.ca_cert.is_none() {
            anyhow::bail!("--upstream-protocol {} needs --ca-cert to verify the replicas", self.upstream_protocol);
        }
        if self.relay == RelayMode::On
            && let Some(why) = self.relay_unfit()
        {
            anyhow::bail!("--relay on: the frame relay {why}; use --relay auto or off");
        }
        Ok(Settings {
            target: self.target.clone(),
            local_target: self.local_target.clone(),
            dns_server: self.dns_server,
            resolve_interval: self.resolve_interval,
            connect_timeout: self.connect_timeout,
            keepalive: self.keepalive_interval,
            replay_limit: self.replay_buffer,
            replay_total: self.replay_buffer_total,
            max_message: self.max_message_size,
            service_config,
            protocol: self.upstream_protocol,
            ca_cert: self.ca_cert.clone(),
            kubernetes,
            metrics: self.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_invalid_service_config_names_the_file_path_and_rule() {
        let dir = std::env::temp_dir().join(format!("proxy-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.json");
        std::fs::write(&file, r#"{"methodConfig":[{"name":[{}],"hedgingPolicy":{"maxAttempts":1}}]}"#).unwrap();
        let args = parse(&["--service-config", file.to_str().unwrap()]).unwrap().serve;
        let err = args.settings().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "--service-config {}: methodConfig[0].hedgingPolicy.maxAttempts: must be an integer of at least 2, got 1",
                file.display()
            )
        );
        let missing = parse(&["--service-config", "/nonexistent/x.json"]).unwrap().serve;
        assert!(missing.settings().unwrap_err().to_string().starts_with("--service-config /nonexistent/x.json: "));
    }

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
        assert_eq!(a.keepalive_interval, Duration::from_secs(1));
        assert_eq!(a.client_keepalive, Duration::from_secs(10));
    }

    #[test]
    fn a_keepalive_interval_under_10ms_is_refused() {
        let a = parse(&["--keepalive-interval", "0s"]).unwrap().serve;
        assert_eq!(a.settings().unwrap_err().to_string(), "--keepalive-interval must be at least 10ms, got 0ns");
        let a = parse(&["--keepalive-interval", "30s"]).unwrap().serve;
        assert_eq!(a.settings().unwrap().keepalive, Duration::from_secs(30));
        let a = parse(&["--client-keepalive", "5ms"]).unwrap().serve;
        assert_eq!(a.settings().unwrap_err().to_string(), "--client-keepalive must be at least 10ms, got 5ms");
        let a = parse(&["--busy-poll", "200", "--coalesce", "100"]).unwrap().serve;
        assert!(
            a.settings().unwrap_err().to_string().starts_with("--busy-poll and --coalesce pull against each other")
        );
    }

    #[test]
    fn the_relay_is_the_default_and_steps_aside_for_an_http3_upstream() {
        let uses = |args: &[&str]| {
            let a = parse(args).unwrap().serve;
            a.settings().map_err(|e| e.to_string())?;
            Ok::<_, String>(a.uses_relay())
        };
        assert_eq!(uses(&[]), Ok((true, None)));
        assert_eq!(uses(&["--relay"]), Ok((true, None)), "the bare flag is on");
        assert_eq!(uses(&["--relay", "off"]), Ok((false, None)));
        let hedging = r#"{"methodConfig":[{"name":[{"service":"s","method":"m"}],
            "hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.05s"}}]}"#;
        let dir = std::env::temp_dir().join(format!("proxy-relay-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hedging.json");
        std::fs::write(&file, hedging).unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(uses(&["--service-config", file]), Ok((true, None)), "the relay hedges too");
        let h3 = ["--upstream-protocol", "h3", "--ca-cert", "ca.pem"];
        let why = "forwards over HTTP/2 only, not --upstream-protocol h3";
        assert_eq!(uses(&h3), Ok((false, Some(why.to_owned()))));
        let on: Vec<&str> = h3.iter().copied().chain(["--relay", "on"]).collect();
        assert_eq!(uses(&on), Err(format!("--relay on: the frame relay {why}; use --relay auto or off")));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--target", "server"][..], "--target"),
            (&["--resolve-interval", "soon"][..], "--resolve-interval"),
            (&["--dns-server", "dns"][..], "--dns-server"),
            (&["--listen", "50050"][..], "--listen"),
            (&["--busy-poll", "100001"][..], "--busy-poll"),
            (&["--busy-poll", "soon"][..], "--busy-poll"),
            (&["--coalesce", "10001"][..], "--coalesce"),
            (&["--coalesce", "soon"][..], "--coalesce"),
            (&["--relay", "yes"][..], "--relay"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
    }
}
