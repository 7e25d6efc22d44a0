//! What the EndpointSlice controller does with pods, done with containers: a replica
//! container's `docker inspect` becomes an endpoint, and a service's replicas become its
//! EndpointSlice. Pure: JSON in, k8s-openapi types out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A replica's node: its container's label, as a pod's node comes from scheduling.
pub const NODE_LABEL: &str = "sandbox.node";
/// A replica's zone, optional.
pub const ZONE_LABEL: &str = "sandbox.zone";

/// Which containers are replicas, and where their addresses are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The replica image's repository, e.g. `lb-sandbox/server` (any tag). Proxies and
    /// clients carry `sandbox.node` too and must not become endpoints.
    pub image: String,
    /// The Docker network whose address is the endpoint's.
    pub network: String,
}

/// One replica container, as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The container's hostname: the endpoint's "pod".
    pub pod: String,
    /// The container id: the pod's uid.
    pub uid: String,
    pub ip: String,
    pub node: String,
    pub zone: Option<String>,
    /// Docker's health: `None` when the image declares no healthcheck.
    pub health: Option<Health>,
    /// When this run of the container started: a terminating mark belongs to one run.
    pub started_at: String,
    /// Docker reported SIGTERM (or a stop) and the replica is draining.
    pub terminating: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// Why a container is not an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// No `sandbox.node` label, or another image.
    #[error("not a replica")]
    NotAReplica,
    /// Created, exited, paused or restarting: a pod that is not running has no endpoint.
    #[error("not running")]
    NotRunning,
    /// Running, but with no address on the cluster network (yet).
    #[error("no IPv4 address on network {0}")]
    NoAddress(String),
}

impl Replica {
    /// Reads the replica out of a `GET /containers/{id}/json` answer.
    pub fn from_inspect(inspect: &Value, selection: &Selection) -> Result<Replica, Skip> {
        let str_at = |pointer: &str| inspect.pointer(pointer).and_then(Value::as_str);
        let label = |name: &str| inspect.pointer("/Config/Labels").and_then(|l| l.get(name)).and_then(Value::as_str);
        let node = label(NODE_LABEL).ok_or(Skip::NotAReplica)?;
        if !is_image(str_at("/Config/Image").unwrap_or_default(), &selection.image) {
            return Err(Skip::NotAReplica);
        }
        let flag = |pointer: &str| inspect.pointer(pointer).and_then(Value::as_bool).unwrap_or(false);
        if !flag("/State/Running") || flag("/State/Paused") || flag("/State/Restarting") {
            return Err(Skip::NotRunning);
        }
        let ip = inspect
            .pointer("/NetworkSettings/Networks")
            .and_then(|n| n.get(&selection.network))
            .and_then(|n| n.get("IPAddress"))
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| Skip::NoAddress(selection.network.clone()))?;
        let health = str_at("/State/Health/Status").map(|s| match s {
            "healthy" => Health::Healthy,
            "starting" => Health::Starting,
            _ => Health::Unhealthy,
        });
        let uid = str_at("/Id").unwrap_or_default();
        Ok(Replica {
            pod: str_at("/Config/Hostname").filter(|h| !h.is_empty()).unwrap_or(uid).to_owned(),
            uid: uid.to_owned(),
            ip: ip.to_owned(),
            node: node.to_owned(),
            zone: label(ZONE_LABEL).map(str::to_owned),
            health,
            started_at: str_at("/State/StartedAt").unwrap_or_default().to_owned(),
            terminating: false,
        })
    }

    /// Kubernetes' conditions: `serving` is the readiness probe's verdict, `ready` is
    /// serving and not terminating.
    pub fn conditions(&self) -> EndpointConditions {
        let serving = matches!(self.health, None | Some(Health::Healthy));
        EndpointConditions {
            ready: Some(serving && !self.terminating),
            serving: Some(serving),
            terminating: Some(self.terminating),
        }
    }

    fn endpoint(&self, namespace: &str) -> Endpoint {
        Endpoint {
            addresses: vec![self.ip.clone()],
            conditions: Some(self.conditions()),
            node_name: Some(self.node.clone()),
            zone: self.zone.clone(),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(self.pod.clone()),
                namespace: Some(namespace.to_owned()),
                uid: Some(self.uid.clone()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }
}

/// Whether `image` (as in `Config.Image`) is `repository` with any tag or digest.
fn is_image(image: &str, repository: &str) -> bool {
    image.strip_prefix(repository).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '@']))
}

/// The Service's port, named so clients can ask for it by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: i32,
}

/// The one EndpointSlice of `service`, with an endpoint per replica sorted by node and
/// pod so that equal sets give equal slices (and no spurious MODIFIED).
pub fn endpoint_slice<'a>(
    service: &str,
    namespace: &str,
    port: &ServicePort,
    replicas: impl IntoIterator<Item = &'a Replica>,
) -> EndpointSlice {
    let mut replicas: Vec<&Replica> = replicas.into_iter().collect();
    replicas.sort_by(|a, b| (&a.node, &a.pod, &a.ip).cmp(&(&b.node, &b.pod, &b.ip)));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(service)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), service.to_owned()),
                ("endpointslice.kubernetes.io/managed-by".to_owned(), "slice-api.sandbox".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: replicas.iter().map(|r| r.endpoint(namespace)).collect(),
        ports: Some(vec![EndpointPort {
            name: Some(port.name.clone()),
            port: Some(port.port),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

/// The slice's name: the controller's would be `<service>-<random>`.
pub fn slice_name(service: &str) -> String {
    format!("{service}-sandbox")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker inspect` of a replica that docker-compose started (project slicetest,
    /// network slicetest_cluster) from lb-sandbox/server:latest, healthy.
    const INSPECT: &str = include_str!("../tests/data/inspect-replica.json");

    fn selection() -> Selection {
        Selection { image: "lb-sandbox/server".into(), network: "slicetest_cluster".into() }
    }

    fn inspect() -> Value {
        let list: Value = serde_json::from_str(INSPECT).unwrap();
        list[0].clone()
    }

    #[test]
    fn a_healthy_replica_becomes_a_ready_endpoint() {
        let replica = Replica::from_inspect(&inspect(), &selection()).unwrap();
        assert_eq!(replica.pod, "server1");
        assert_eq!(replica.node, "node-a");
        assert_eq!(replica.zone, None);
        assert_eq!(replica.ip, "172.19.0.3");
        assert_eq!(replica.health, Some(Health::Healthy));
        assert_eq!(replica.started_at, "2026-11-23T09:08:32.88886388Z");
        let port = ServicePort { name: "grpc".into(), port: 50051 };
        let slice = endpoint_slice("server", "default", &port, [&replica]);
        let json = serde_json::to_value(&slice).unwrap();
        assert_eq!(json["endpoints"][0]["addresses"], serde_json::json!(["172.19.0.3"]));
        assert_eq!(json["endpoints"][0]["nodeName"], "node-a");
        assert_eq!(json["endpoints"][0]["targetRef"]["kind"], "Pod");
        assert_eq!(json["endpoints"][0]["targetRef"]["name"], "server1");
        assert_eq!(
            json["endpoints"][0]["conditions"],
            serde_json::json!({"ready": true, "serving": true, "terminating": false})
        );
        assert_eq!(json["ports"], serde_json::json!([{"name": "grpc", "port": 50051, "protocol": "TCP"}]));
        assert_eq!(json["metadata"]["labels"][SERVICE_NAME_LABEL], "server");
    }

    #[test]
    fn a_terminating_replica_is_serving_but_not_ready() {
        let mut replica = Replica::from_inspect(&inspect(), &selection()).unwrap();
        replica.terminating = true;
        assert_eq!(
            replica.conditions(),
            EndpointConditions { ready: Some(false), serving: Some(true), terminating: Some(true) }
        );
        replica.health = Some(Health::Unhealthy);
        assert_eq!(replica.conditions().serving, Some(false));
    }

    #[test]
    fn starting_is_not_ready_and_no_healthcheck_is() {
        let mut replica = Replica::from_inspect(&inspect(), &selection()).unwrap();
        replica.health = Some(Health::Starting);
        assert_eq!(replica.conditions().ready, Some(false));
        replica.health = None;
        assert_eq!(replica.conditions().ready, Some(true));
    }

    #[test]
    fn other_images_stopped_containers_and_other_networks_are_skipped() {
        let mut proxy = inspect();
        proxy["Config"]["Image"] = "lb-sandbox/proxy:latest".into();
        assert_eq!(Replica::from_inspect(&proxy, &selection()), Err(Skip::NotAReplica));
        let mut lookalike = inspect();
        lookalike["Config"]["Image"] = "lb-sandbox/server-old:latest".into();
        assert_eq!(Replica::from_inspect(&lookalike, &selection()), Err(Skip::NotAReplica));
        let mut unlabelled = inspect();
        unlabelled["Config"]["Labels"].as_object_mut().unwrap().remove(NODE_LABEL);
        assert_eq!(Replica::from_inspect(&unlabelled, &selection()), Err(Skip::NotAReplica));
        let mut exited = inspect();
        exited["State"]["Running"] = false.into();
        assert_eq!(Replica::from_inspect(&exited, &selection()), Err(Skip::NotRunning));
        let elsewhere = Selection { network: "other".into(), ..selection() };
        assert_eq!(Replica::from_inspect(&inspect(), &elsewhere), Err(Skip::NoAddress("other".into())));
    }

    #[test]
    fn endpoints_are_sorted_by_node_then_pod() {
        let base = Replica::from_inspect(&inspect(), &selection()).unwrap();
        let at = |pod: &str, node: &str| Replica { pod: pod.into(), node: node.into(), ..base.clone() };
        let (b3, a2, a1) = (at("server3", "node-b"), at("server2", "node-a"), at("server1", "node-a"));
        let port = ServicePort { name: "grpc".into(), port: 50051 };
        let slice = endpoint_slice("server", "default", &port, [&b3, &a2, &a1]);
        let pods: Vec<_> =
            slice.endpoints.iter().map(|e| e.target_ref.as_ref().unwrap().name.clone().unwrap()).collect();
        assert_eq!(pods, ["server1", "server2", "server3"]);
        assert_eq!(slice, endpoint_slice("server", "default", &port, [&a1, &b3, &a2]));
    }
}
