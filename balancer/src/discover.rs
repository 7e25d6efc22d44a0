//! Discovery: where the endpoints come from. DNS (the default) resolves every A/AAAA
//! record of the target (and of the local-target name) with caching off, every
//! `interval`, whenever a connection fails, and more often for a while after a failover;
//! this is the only module that talks DNS.
//! Kubernetes watches a Service's EndpointSlices ([`crate::kubernetes`]).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::{error::Error, kubernetes::KubernetesSettings, pick::Resolved};

/// A `host:port` target, where host is a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(HostPort { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("expected HOST:PORT, got {s:?}"))?;
        let port = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || !host.chars().all(valid) {
            return Err(format!("bad host name in {s:?}"));
        }
        Ok(HostPort { host: host.to_owned(), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// One resolution: the addresses, or why there are none this time.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Resolved),
    /// The resolver could not answer (timeout, refused): keep what was known.
    Failed(String),
}

/// Where the endpoints come from.
pub enum Discovery {
    Dns(Box<Dns>),
    Kubernetes(KubernetesSettings),
}

impl Discovery {
    /// The target as logs and the admin API name it.
    pub fn target(&self) -> String {
        match self {
            Discovery::Dns(d) => d.target.to_string(),
            Discovery::Kubernetes(k) => k.target(),
        }
    }

    /// Tells every answer to `send` until it says nobody listens: DNS every `interval`
    /// (sooner after a failover, see [`next_resolve`]) and on `refresh`; Kubernetes as
    /// the slices change.
    pub(crate) async fn run(
        self,
        send: impl Fn(Lookup) -> bool,
        refresh: Refresh,
        interval: Duration,
        mut failed_over: watch::Receiver<Option<Instant>>,
    ) {
        match self {
            Discovery::Dns(dns) => loop {
                if !send(dns.lookup().await) {
                    return;
                }
                let wait = next_resolve(interval, *failed_over.borrow_and_update(), Instant::now());
                // A failover or failback (often caused by the answer just sent) resolves
                // at once and sets the waits that follow.
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = refresh.notified() => {}
                    Ok(()) = failed_over.changed() => {}
                }
            },
            Discovery::Kubernetes(k) => crate::kubernetes::run(k, send).await,
        }
    }
}

/// Resolves the target and local-target names.
pub struct Dns {
    resolver: TokioResolver,
    target: HostPort,
    local: Option<HostPort>,
}

impl Dns {
    /// Uses `dns_server` when given, else the system configuration (/etc/resolv.conf).
    pub fn new(target: HostPort, local: Option<HostPort>, dns_server: Option<SocketAddr>) -> Result<Self, Error> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match dns_server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                TokioResolver::builder_with_config(ResolverConfig::from_name_servers(vec![ns]), provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| Error::Resolver(e.to_string()))?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        // Docker's DNS answers with TTL 600: honouring it would hide new replicas.
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_millis(500);
        opts.attempts = 2;
        let resolver = builder.build().map_err(|e| Error::Resolver(e.to_string()))?;
        Ok(Dns { resolver, target, local })
    }

    /// Resolves both names once.
    pub async fn lookup(&self) -> Lookup {
        let all = match self.resolve(&self.target).await {
            Ok(all) => all,
            Err(e) => return Lookup::Failed(e),
        };
        let local = match &self.local {
            // A local name with no replicas left resolves to nothing: not an error.
            Some(local) => self.resolve(local).await.unwrap_or_default(),
            None => Vec::new(),
        };
        // Locality compares addresses; the local name's port may differ from the target's.
        let local = all.iter().copied().filter(|a| local.iter().any(|l| l.ip() == a.ip())).collect();
        Lookup::Found(Resolved { all, local, ..Resolved::default() })
    }

    async fn resolve(&self, hp: &HostPort) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = hp.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, hp.port)]);
        }
        match self.resolver.lookup_ip(hp.host.as_str()).await {
            Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, hp.port)).collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(format!("resolving {hp}: {e}")),
        }
    }
}

/// Wakes the discovery loop early, e.g. after a connection failure.
pub type Refresh = Arc<Notify>;

/// How often DNS is asked while failed over: a restarted local replica is back in
/// rotation within this of being published, not within the interval.
const FAILED_OVER_INTERVAL: Duration = Duration::from_millis(200);
/// For how long after a failover: a node whose replicas are gone for good goes back
/// to the interval.
const FAILED_OVER_FOR: Duration = Duration::from_secs(30);

/// How long DNS waits before resolving again: `interval`, or at most
/// [`FAILED_OVER_INTERVAL`] within [`FAILED_OVER_FOR`] of a failover at `failed_over`.
/// Dead replicas leave DNS (Docker's, Kubernetes'), so no failing reconnect would
/// prompt a resolution that finds their successors.
fn next_resolve(interval: Duration, failed_over: Option<Instant>, now: Instant) -> Duration {
    match failed_over {
        Some(at) if now.saturating_duration_since(at) < FAILED_OVER_FOR => interval.min(FAILED_OVER_INTERVAL),
        _ => interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_is_asked_often_only_for_a_while_after_a_failover() {
        let (second, now) = (Duration::from_secs(1), Instant::now());
        let ms = Duration::from_millis;
        assert_eq!(next_resolve(second, None, now), second);
        assert_eq!(next_resolve(second, Some(now), now), ms(200));
        assert_eq!(next_resolve(second, Some(now), now + ms(29_999)), ms(200));
        assert_eq!(next_resolve(second, Some(now), now + ms(30_000)), second);
        assert_eq!(next_resolve(ms(50), Some(now), now), ms(50), "never slower than the interval");
    }

    #[test]
    fn parses_names_and_literals() {
        assert_eq!("server:50051".parse(), Ok(HostPort { host: "server".into(), port: 50051 }));
        assert_eq!("node-a.server:1".parse(), Ok(HostPort { host: "node-a.server".into(), port: 1 }));
        assert_eq!("127.0.0.2:50051".parse(), Ok(HostPort { host: "127.0.0.2".into(), port: 50051 }));
        let v6: HostPort = "[::1]:50051".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:50051");
        for bad in ["server", "server:", "server:x", ":50051", "se rver:1", "a:70000"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad:?}");
        }
    }
}
