//! Kubernetes discovery end to end: the real proxy binary, its kube-rs watcher talking
//! to slice-api (the sandbox's stand-in for the API server) over a kubeconfig, and
//! real replicas on 127.a.b.x. The tests change the EndpointSlice the way the
//! EndpointSlice controller does and watch where calls go.

mod support;

use std::{collections::BTreeMap, net::SocketAddr, process::Stdio, sync::Arc, time::Duration};

use k8s_openapi::{
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proto::hello_service_client::HelloServiceClient;
use slice_api::{hub::Hub, store::Store};
use support::hello;
use testkit::{Replica, Subnet};
use tokio::{net::TcpListener, sync::oneshot, time::Instant};
use tonic::transport::Channel;

/// Where a replica runs: node and zone.
const PLACES: &[(&str, &str, &str)] = &[
    ("s1", "node-a", "z1"), // this node
    ("s2", "node-b", "z1"), // this zone
    ("s3", "node-c", "z2"), // elsewhere
    ("s4", "node-a", "z1"), // this node, added later
];

/// An endpoint's conditions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cond {
    Ready,
    /// Draining: terminating, still serving.
    Terminating,
    /// Failing its readiness probe.
    NotReady,
}

/// slice-api serving a hub the test writes to; restartable on the same port.
struct Api {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start(addr: SocketAddr, first_version: u64) -> Api {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hub = Arc::new(Hub::new(Store::new("default", first_version, 100), 256));
        hub.mark_synced();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(slice_api::serve(listener, hub.clone(), Duration::from_millis(500), async {
            let _ = stopped.await;
        }));
        Api { addr, hub, stop: Some(stop), task }
    }

    async fn stop(mut self) -> SocketAddr {
        let _ = self.stop.take().unwrap().send(());
        let _ = (&mut self.task).await;
        self.addr
    }
}

struct Cluster {
    net: Subnet,
    api: Option<Api>,
    /// Serving for as long as the cluster lives.
    _replicas: BTreeMap<&'static str, Replica>,
    proxy: tokio::process::Child,
    client: HelloServiceClient<Channel>,
}

impl Cluster {
    /// Every replica of [`PLACES`] running, slice-api with `endpoints`, and the proxy on
    /// node-a in zone z1 watching them.
    async fn start(endpoints: &[(&str, Cond)]) -> Cluster {
        let net = Subnet::random();
        let replicas = PLACES
            .iter()
            .enumerate()
            .map(|(i, (name, node, _))| (*name, Replica::start(net.addr(i as u8 + 1), name, node)))
            .collect();
        let api = Api::start(SocketAddr::new(net.ip(210), 0), 1).await;
        // No ':' in the name: KUBECONFIG is a list of paths split on ':'.
        let name = format!("lb-kubeconfig-{}-{}-{}", std::process::id(), api.addr.ip(), api.addr.port());
        let kubeconfig = std::env::temp_dir().join(name);
        std::fs::write(&kubeconfig, kubeconfig_for(api.addr)).unwrap();
        let proxy = spawn_proxy(net, &kubeconfig);
        let mut c = Cluster { net, api: Some(api), _replicas: replicas, proxy, client: connect(net).await };
        c.publish(endpoints);
        c
    }

    /// The proxy's `/admin/events`, read from its greeting on.
    async fn events(&self) -> tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let admin = SocketAddr::new(self.net.ip(201), support::ADMIN_PORT);
        let mut tcp = tokio::net::TcpStream::connect(admin).await.expect("admin API reachable");
        tcp.write_all(b"GET /admin/events HTTP/1.1\r\nHost: admin\r\n\r\n").await.unwrap();
        let mut lines = BufReader::new(tcp).lines();
        while !lines.next_line().await.unwrap().unwrap().starts_with(": events") {}
        lines
    }

    fn addr_of(&self, name: &str) -> SocketAddr {
        let i = PLACES.iter().position(|p| p.0 == name).unwrap();
        self.net.addr(i as u8 + 1)
    }

    /// The Service's slice now holds `endpoints`, as the controller would write it.
    fn publish(&mut self, endpoints: &[(&str, Cond)]) {
        let api = self.api.as_ref().expect("slice-api running");
        let endpoints = endpoints.iter().map(|(name, cond)| self.endpoint(name, *cond)).collect();
        api.hub.put(slice(endpoints));
    }

    fn endpoint(&self, name: &str, cond: Cond) -> Endpoint {
        let (_, node, zone) = PLACES.iter().find(|p| p.0 == name).unwrap();
        let (ready, serving, terminating) = match cond {
            Cond::Ready => (true, true, false),
            Cond::Terminating => (false, true, true),
            Cond::NotReady => (false, false, false),
        };
        Endpoint {
            addresses: vec![self.addr_of(name).ip().to_string()],
            node_name: Some((*node).into()),
            zone: Some((*zone).into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            ..Endpoint::default()
        }
    }

    /// Calls per replica over `n` calls; every call must succeed.
    async fn tally(&mut self, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let r = self.client.say_hello(hello()).await.expect("the call succeeds");
            *counts.entry(r.into_inner().server).or_default() += 1;
        }
        counts
    }

    /// Calls until `n` calls in a row land only on `names`; how long that took.
    async fn settle_on(&mut self, names: &[&str], n: usize) -> Duration {
        let started = Instant::now();
        loop {
            let counts = self.tally(n).await;
            if counts.keys().all(|k| names.contains(&k.as_str())) && names.iter().all(|n| counts.contains_key(*n)) {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never only {names:?}: last {counts:?}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.proxy.start_kill();
    }
}

fn slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    let labels = [("kubernetes.io/service-name".to_owned(), "server".to_owned())].into();
    EndpointSlice {
        metadata: ObjectMeta { name: Some("server-x7k2p".into()), labels: Some(labels), ..ObjectMeta::default() },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(i32::from(testkit::PORT)),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
        endpoints,
    }
}

fn kubeconfig_for(api: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{api}\n\
         users:\n- name: t\n  user: {{}}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n\
         namespace: default\ncurrent-context: t\n"
    )
}

fn spawn_proxy(net: Subnet, kubeconfig: &std::path::Path) -> tokio::process::Child {
    let listen = SocketAddr::new(net.ip(200), 50050).to_string();
    let admin = SocketAddr::new(net.ip(201), support::ADMIN_PORT).to_string();
    let args = ["--listen", &listen, "--admin-listen", &admin, "--discovery", "kubernetes", "--service", "server"];
    tokio::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(args)
        .args(["--port", "grpc", "--node", "node-a", "--zone", "z1", "--keepalive-interval", "200ms"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy binary starts")
}

async fn connect(net: Subnet) -> HelloServiceClient<Channel> {
    let url = format!("http://{}", SocketAddr::new(net.ip(200), 50050));
    let channel = Channel::from_shared(url).unwrap().timeout(Duration::from_secs(5));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match channel.connect().await {
            Ok(c) => return HelloServiceClient::new(c),
            Err(e) => assert!(Instant::now() < until, "the proxy never listened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use Cond::{NotReady, Ready, Terminating};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_first_then_the_zone_then_the_rest_and_back() {
    let mut c = Cluster::start(&[("s1", Ready), ("s2", Ready), ("s3", Ready)]).await;
    c.settle_on(&["s1"], 10).await;
    assert_eq!(c.tally(20).await, [("s1".to_owned(), 20)].into(), "this node's replica takes every call");
    // s1 fails its readiness probe: the zone's replica, not the far one.
    c.publish(&[("s1", NotReady), ("s2", Ready), ("s3", Ready)]);
    c.settle_on(&["s2"], 10).await;
    // s2 goes too: the rest.
    c.publish(&[("s1", NotReady), ("s3", Ready)]);
    c.settle_on(&["s3"], 10).await;
    // s1 is ready again: back to this node.
    c.publish(&[("s1", Ready), ("s2", Ready), ("s3", Ready)]);
    c.settle_on(&["s1"], 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_takes_calls_within_a_second_of_its_slice_change() {
    let mut c = Cluster::start(&[("s1", Ready), ("s3", Ready)]).await;
    c.settle_on(&["s1"], 10).await;
    c.publish(&[("s1", Ready), ("s3", Ready), ("s4", Ready)]);
    let took = c.settle_on(&["s1", "s4"], 4).await;
    assert!(took < Duration::from_secs(1), "s4 took calls {took:?} after the slice named it");
    assert_eq!(c.tally(20).await, [("s1".to_owned(), 10), ("s4".to_owned(), 10)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_endpoint_takes_calls_only_when_its_tier_has_no_other() {
    let mut c = Cluster::start(&[("s1", Ready), ("s4", Ready), ("s3", Ready)]).await;
    c.settle_on(&["s1", "s4"], 10).await;
    let mut events = c.events().await;
    // s1 drains (its pod is deleted): no new calls while s4 is ready.
    c.publish(&[("s1", Terminating), ("s4", Ready), ("s3", Ready)]);
    c.settle_on(&["s4"], 10).await;
    let said = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), events.next_line()).await;
        let line = line.expect("a terminating event within 10 s").unwrap().expect("the stream stays open");
        if line.starts_with("data: ") && line.contains(r#""kind":"terminating""#) {
            break line;
        }
    };
    assert!(said.contains(&c.addr_of("s1").to_string()), "the event names s1: {said}");
    assert_eq!(c.tally(20).await, [("s4".to_owned(), 20)].into());
    // s4 goes as well: the draining s1 keeps the calls on this node rather than s3.
    c.publish(&[("s1", Terminating), ("s3", Ready)]);
    c.settle_on(&["s1"], 10).await;
    // Neither ready nor serving: no calls; the rest takes them.
    c.publish(&[("s1", NotReady), ("s3", Ready)]);
    c.settle_on(&["s3"], 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_api_server_keeps_the_endpoints_and_a_relist_after_410_replaces_them_exactly() {
    let mut c = Cluster::start(&[("s1", Ready), ("s3", Ready)]).await;
    c.settle_on(&["s1"], 10).await;
    // The API server goes away: the last known endpoints keep serving.
    let addr = c.api.take().unwrap().stop().await;
    assert_eq!(c.tally(10).await, [("s1".to_owned(), 10)].into());
    // It comes back with a history that no longer holds the watch's version (410
    // Gone): the watcher lists again and gets exactly the new set, nothing doubled.
    c.api = Some(Api::start(addr, 1_000_000).await);
    c.publish(&[("s1", Ready), ("s4", Ready), ("s3", Ready)]);
    c.settle_on(&["s1", "s4"], 4).await;
    assert_eq!(c.tally(20).await, [("s1".to_owned(), 10), ("s4".to_owned(), 10)].into());
    c.publish(&[("s4", Ready), ("s3", Ready)]);
    c.settle_on(&["s4"], 10).await;
}
