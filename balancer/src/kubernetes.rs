//! Kubernetes discovery: the EndpointSlices of one Service, watched through the API
//! server with kube-rs's watcher (it lists, then watches from the list's version, and
//! lists again after a lost watch or `410 Gone`, with backoff). Each endpoint's node
//! and zone give its tier; its conditions say whether it takes calls, as kube-proxy
//! reads them: `ready` ones do; `serving` and `terminating` ones only when their tier
//! has nothing else; the others take no new calls (their open calls finish).
//!
//! [`Slices`] is the pure part: the watcher's events in, the endpoints out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use crate::{discover::Lookup, pick::Resolved};

/// The label the EndpointSlice controller puts on a Service's slices.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// The Service's port, by name (as in its spec) or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

impl FromStr for PortRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(n) = s.parse::<u16>() {
            return if n == 0 { Err("port 0 is not a port".to_owned()) } else { Ok(PortRef::Number(n)) };
        }
        // An IANA service name, as port names are: at most 15 lowercase letters, digits
        // and single dashes, at least one letter, no dash at either end.
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        let name = s.len() <= 15
            && s.chars().all(allowed)
            && s.chars().any(|c| c.is_ascii_lowercase())
            && !s.starts_with('-')
            && !s.ends_with('-')
            && !s.contains("--");
        if !name {
            return Err(format!("expected a port number (1-65535) or name (like grpc), got {s:?}"));
        }
        Ok(PortRef::Name(s.to_owned()))
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Name(n) => f.write_str(n),
            PortRef::Number(n) => write!(f, "{n}"),
        }
    }
}

/// What to watch, and where this balancer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// The Service whose EndpointSlices to watch.
    pub service: String,
    /// Its namespace; `None`: the client's default (the pod's own, in a cluster).
    pub namespace: Option<String>,
    pub port: PortRef,
    /// This node (`spec.nodeName`): its endpoints come first.
    pub node: Option<String>,
    /// This zone: its endpoints come next.
    pub zone: Option<String>,
}

impl KubernetesSettings {
    /// `kubernetes:///service.namespace:port`, as gRPC's kuberesolver names it.
    pub fn target(&self) -> String {
        let ns = self.namespace.as_deref().unwrap_or("default");
        format!("kubernetes:///{}.{ns}:{}", self.service, self.port)
    }
}

/// The slices the watcher has shown, complete after each list.
#[derive(Debug, Default)]
pub struct Slices {
    /// By name, as last listed or watched.
    current: BTreeMap<String, EndpointSlice>,
    /// A list in progress, swapped in when complete.
    listing: Option<BTreeMap<String, EndpointSlice>>,
    /// Problems already logged, so each is logged once.
    told: BTreeSet<String>,
}

impl Slices {
    /// Applies one watcher event; true when the endpoints may have changed (a watched
    /// change, or a list complete). Nothing is published halfway through a list.
    pub fn on_event(&mut self, event: watcher::Event<EndpointSlice>) -> bool {
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(s) => {
                self.current.insert(name(&s), s);
                true
            }
            watcher::Event::Delete(s) => {
                self.current.remove(&name(&s));
                true
            }
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(s) => {
                self.listing.get_or_insert_default().insert(name(&s), s);
                false
            }
            watcher::Event::InitDone => {
                self.current = self.listing.take().unwrap_or_default();
                true
            }
        }
    }

    /// The endpoints to balance over, and the problems not told before (a slice
    /// skipped, and why), each to be logged once.
    pub fn resolve(&mut self, s: &KubernetesSettings) -> (Resolved, Vec<String>) {
        let mut found: BTreeMap<SocketAddr, (crate::pick::Tier, bool)> = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, slice) in &self.current {
            let port = match usable(slice, &s.port) {
                Ok(port) => port,
                Err(why) => {
                    problems.push(format!("EndpointSlice {name} skipped: {why}"));
                    continue;
                }
            };
            for e in &slice.endpoints {
                let c = e.conditions.as_ref();
                // Unknown readiness reads as ready, unknown serving as the readiness,
                // unknown terminating as not (the API's documented defaults).
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let takes_calls = ready || (serving && terminating);
                if !takes_calls {
                    continue;
                }
                let tier = if s.node.is_some() && e.node_name == s.node {
                    crate::pick::Tier::Local
                } else if s.zone.as_deref().is_some_and(|z| !z.is_empty()) && e.zone == s.zone {
                    crate::pick::Tier::Zone
                } else {
                    crate::pick::Tier::Remote
                };
                for a in &e.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        problems.push(format!("EndpointSlice {name}: {a:?} is not an IP address"));
                        continue;
                    };
                    // An address in two slices (the controller moving it): the better wins.
                    let draining = !ready;
                    found
                        .entry(SocketAddr::new(ip, port))
                        .and_modify(|seen| *seen = (*seen).min((tier, draining)))
                        .or_insert((tier, draining));
                }
            }
        }
        let mut resolved = Resolved::default();
        for (addr, (tier, draining)) in found {
            resolved.all.push(addr);
            match tier {
                crate::pick::Tier::Local => resolved.local.push(addr),
                crate::pick::Tier::Zone => resolved.zone.push(addr),
                crate::pick::Tier::Remote => {}
            }
            if draining {
                resolved.terminating.push(addr);
            }
        }
        problems.retain(|p| self.told.insert(p.clone()));
        (resolved, problems)
    }
}

/// The port number `port` names in `slice`, or why the slice cannot be used.
fn usable(slice: &EndpointSlice, port: &PortRef) -> Result<u16, String> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(format!("address type {:?} (IPv4 and IPv6 are balanced)", slice.address_type));
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("it lists no ports".to_owned());
    }
    let found = ports.iter().find(|p| match port {
        PortRef::Name(n) => p.name.as_deref() == Some(n),
        PortRef::Number(n) => p.port == Some(i32::from(*n)),
    });
    let names: Vec<String> =
        ports.iter().map(|p| format!("{}={}", p.name.as_deref().unwrap_or(""), p.port.unwrap_or(0))).collect();
    let found = found.ok_or_else(|| format!("no port {port} among [{}]", names.join(", ")))?;
    found
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} has no number"))
}

/// Watches the Service's EndpointSlices until `send` says nobody listens, telling each
/// complete set of endpoints; without a usable configuration or permission, tells the
/// failure (the pool keeps what it knew) and tries again.
pub(crate) async fn run(settings: KubernetesSettings, send: impl Fn(Lookup) -> bool) {
    let mut delay = Duration::from_millis(500);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                let why = format!(
                    "kubernetes discovery: no usable API configuration ({e}); \
                     set KUBECONFIG or run in a pod with a service account"
                );
                if !send(Lookup::Failed(why)) {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    let namespace = settings.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let settings = KubernetesSettings { namespace: Some(namespace.clone()), ..settings };
    info!(service = %settings.service, %namespace, port = %settings.port, node = ?settings.node, zone = ?settings.zone,
        "Watching the Service's EndpointSlices");
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={}", settings.service));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut slices = Slices::default();
    while let Some(event) = events.next().await {
        let lookup = match event {
            Ok(event) => {
                if !slices.on_event(event) {
                    continue;
                }
                let (resolved, problems) = slices.resolve(&settings);
                for p in problems {
                    warn!(service = %settings.service, "{p}");
                }
                Lookup::Found(resolved)
            }
            Err(e) => Lookup::Failed(explain(&e, &namespace)),
        };
        if !send(lookup) {
            return;
        }
    }
}

/// A watcher error in words, naming the RBAC rule when the API refused.
fn explain(e: &watcher::Error, namespace: &str) -> String {
    let api_code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r))
        | watcher::Error::WatchStartFailed(kube::Error::Api(r))
        | watcher::Error::WatchFailed(kube::Error::Api(r)) => Some(r.code),
        _ => None,
    };
    match api_code {
        Some(401 | 403) => format!(
            "kubernetes discovery: the API refused to list EndpointSlices in namespace {namespace} ({e}); \
             the service account needs a Role rule: apiGroups [discovery.k8s.io], resources [endpointslices], \
             verbs [get, list, watch]"
        ),
        _ => format!("kubernetes discovery: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::pick::Tier;

    /// (address, node, zone, ready, serving, terminating)
    type Ep<'a> = (&'a str, &'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(name: &str, ports: &[(&str, i32)], endpoints: &[Ep<'_>]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            address_type: "IPv4".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort { name: Some((*n).into()), port: Some(*p), ..EndpointPort::default() })
                    .collect(),
            ),
            endpoints: endpoints
                .iter()
                .map(|(a, node, zone, ready, serving, terminating)| Endpoint {
                    addresses: vec![(*a).into()],
                    node_name: Some((*node).into()),
                    zone: (!zone.is_empty()).then(|| (*zone).into()),
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }

    fn settings() -> KubernetesSettings {
        KubernetesSettings {
            service: "greeter".into(),
            namespace: Some("ns".into()),
            port: PortRef::Name("grpc".into()),
            node: Some("node-a".into()),
            zone: Some("z1".into()),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        format!("{s}:50051").parse().unwrap()
    }

    const T: Option<bool> = Some(true);
    const F: Option<bool> = Some(false);

    #[test]
    fn endpoints_take_their_tier_from_node_and_zone() {
        let mut slices = Slices::default();
        let s = slice(
            "greeter-abc",
            &[("grpc", 50051)],
            &[
                ("10.0.0.1", "node-a", "z1", T, T, F),
                ("10.0.0.2", "node-b", "z1", T, T, F),
                ("10.0.0.3", "node-c", "z2", T, T, F),
                ("10.0.0.4", "node-d", "", None, None, None),
            ],
        );
        assert!(slices.on_event(watcher::Event::Apply(s)));
        let (r, problems) = slices.resolve(&settings());
        assert!(problems.is_empty());
        assert_eq!(r.all, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"].map(addr));
        assert_eq!(r.tier(&addr("10.0.0.1")), Tier::Local);
        assert_eq!(r.tier(&addr("10.0.0.2")), Tier::Zone);
        assert_eq!(r.tier(&addr("10.0.0.3")), Tier::Remote);
        assert!(r.terminating.is_empty(), "conditions unknown read as ready");
    }

    #[test]
    fn conditions_decide_as_kube_proxy_reads_them() {
        let mut slices = Slices::default();
        let s = slice(
            "greeter-abc",
            &[("grpc", 50051)],
            &[
                ("10.0.0.1", "node-a", "", T, T, F), // ready
                ("10.0.0.2", "node-a", "", F, T, T), // draining: a fallback
                ("10.0.0.3", "node-a", "", F, F, T), // terminating, no longer serving
                ("10.0.0.4", "node-a", "", F, F, F), // not ready (starting, failing probes)
            ],
        );
        slices.on_event(watcher::Event::Apply(s));
        let (r, _) = slices.resolve(&settings());
        assert_eq!(r.all, ["10.0.0.1", "10.0.0.2"].map(addr));
        assert_eq!(r.terminating, [addr("10.0.0.2")]);
    }

    #[test]
    fn a_list_replaces_everything_only_when_complete() {
        let mut slices = Slices::default();
        let one = slice("a", &[("grpc", 50051)], &[("10.0.0.1", "node-a", "", T, T, F)]);
        let two = slice("b", &[("grpc", 50051)], &[("10.0.0.2", "node-b", "", T, T, F)]);
        slices.on_event(watcher::Event::Apply(one.clone()));
        slices.on_event(watcher::Event::Apply(two.clone()));
        // The watch was lost; the relist finds only `b`: `a` goes, nothing is doubled.
        assert!(!slices.on_event(watcher::Event::Init));
        assert!(!slices.on_event(watcher::Event::InitApply(two.clone())));
        assert_eq!(slices.resolve(&settings()).0.all.len(), 2, "unchanged until the list completes");
        assert!(slices.on_event(watcher::Event::InitDone));
        assert_eq!(slices.resolve(&settings()).0.all, [addr("10.0.0.2")]);
        assert!(slices.on_event(watcher::Event::Delete(two)));
        assert!(slices.resolve(&settings()).0.all.is_empty());
    }

    #[test]
    fn unusable_slices_are_skipped_and_told_once() {
        let mut slices = Slices::default();
        let mut fqdn = slice("fqdn", &[("grpc", 50051)], &[("10.0.0.1", "node-a", "", T, T, F)]);
        fqdn.address_type = "FQDN".into();
        let other_port = slice("http", &[("http", 8080)], &[("10.0.0.2", "node-a", "", T, T, F)]);
        let no_ports = slice("none", &[], &[("10.0.0.3", "node-a", "", T, T, F)]);
        let good = slice("good", &[("grpc", 50051)], &[("10.0.0.4", "node-a", "", T, T, F)]);
        for s in [fqdn, other_port, no_ports, good] {
            slices.on_event(watcher::Event::Apply(s));
        }
        let (r, problems) = slices.resolve(&settings());
        assert_eq!(r.all, [addr("10.0.0.4")]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("no port grpc among [http=8080]")), "{problems:?}");
        assert!(slices.resolve(&settings()).1.is_empty(), "told once");
        let by_number = KubernetesSettings { port: PortRef::Number(8080), ..settings() };
        assert_eq!(slices.resolve(&by_number).0.all, ["10.0.0.2:8080".parse().unwrap()]);
    }

    #[test]
    fn an_address_in_two_slices_counts_once_as_its_better_self() {
        let mut slices = Slices::default();
        slices.on_event(watcher::Event::Apply(slice("a", &[("grpc", 50051)], &[("10.0.0.1", "node-a", "", F, T, T)])));
        slices.on_event(watcher::Event::Apply(slice("b", &[("grpc", 50051)], &[("10.0.0.1", "node-a", "", T, T, F)])));
        let (r, _) = slices.resolve(&settings());
        assert_eq!((r.all, r.terminating), (vec![addr("10.0.0.1")], vec![]));
    }

    #[test]
    fn ports_are_numbers_or_names() {
        assert_eq!("grpc".parse(), Ok(PortRef::Name("grpc".into())));
        assert_eq!("50051".parse(), Ok(PortRef::Number(50051)));
        for bad in ["", "0", "Grpc", "-x", "a_b", "70000", "a--b", "sixteen-letters-"] {
            assert!(bad.parse::<PortRef>().is_err(), "{bad:?}");
        }
        assert_eq!(settings().target(), "kubernetes:///greeter.ns:grpc");
    }
}
