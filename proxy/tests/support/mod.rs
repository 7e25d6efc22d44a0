//! A small cluster for the proxy's tests: replicas on 127.a.b.x:50051, a real DNS
//! server publishing them, and the proxy in-process, all on real sockets.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use clap::Parser;
use proto::{HelloRequest, hello_service_client::HelloServiceClient};
use testkit::{Dns, Replica, Subnet, replica::Faults};
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

pub use balancer::Protocol;

pub const TARGET: &str = "server.test";
pub const LOCAL: &str = "node-a.server.test";
/// The sandbox's default service config: retry UNAVAILABLE, with the throttle.
/// The proxy's admin API port, on the test subnet's .201 (clear of a running sandbox's
/// 9901).
pub const ADMIN_PORT: u16 = 19901;

pub const SANDBOX_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/service-config.json");

struct Member {
    host: u8,
    node: String,
    in_dns: bool,
    faults: Faults,
    replica: Option<Replica>,
}

/// How the proxy under test forwards: the protocol to the replicas, and whether h2c
/// calls go through the frame relay (`--relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub protocol: Protocol,
    pub relay: bool,
}

impl Path {
    /// HTTP/2 to the replicas, through the frame relay.
    pub const RELAY: Path = Path { protocol: Protocol::H2, relay: true };
}

impl From<Protocol> for Path {
    fn from(protocol: Protocol) -> Path {
        Path { protocol, relay: false }
    }
}

impl PartialEq<Protocol> for Path {
    fn eq(&self, other: &Protocol) -> bool {
        self.protocol == *other
    }
}

pub struct Cluster {
    pub net: Subnet,
    pub dns: Dns,
    members: BTreeMap<String, Member>,
    protocol: Protocol,
    relay: bool,
    pub proxy: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Cluster {
    /// Replicas named in `layout` with their node; the proxy runs on node-a and talks
    /// to them over `protocol`.
    pub async fn start(path: impl Into<Path>, layout: &[(&str, &str)], proxy_args: &[&str]) -> Cluster {
        Self::start_with(path, layout, proxy_args, |_| Faults::default()).await
    }

    pub async fn start_with(
        path: impl Into<Path>,
        layout: &[(&str, &str)],
        proxy_args: &[&str],
        faults: impl Fn(&str) -> Faults,
    ) -> Cluster {
        testkit::init_logging();
        let net = Subnet::random();
        let dns = Dns::start(net.ip(250)).await;
        let Path { protocol, relay } = path.into();
        let mut c = Cluster {
            net,
            dns,
            members: BTreeMap::new(),
            protocol,
            relay,
            proxy: net.addr(200),
            stop: None,
            task: None,
        };
        for (name, node) in layout {
            c.add_with(name, node, faults(name));
        }
        c.start_proxy(proxy_args).await;
        c
    }

    async fn start_proxy(&mut self, extra: &[&str]) {
        let listener = tokio::net::TcpListener::bind((self.net.ip(200), 0)).await.unwrap();
        self.proxy = listener.local_addr().unwrap();
        let target = format!("{TARGET}:50051");
        let local = format!("{LOCAL}:50051");
        let dns = self.dns.addr().to_string();
        let mut argv = vec!["proxy", "--target", &target, "--local-target", &local, "--dns-server", &dns];
        if !extra.contains(&"--resolve-interval") {
            argv.extend_from_slice(&["--resolve-interval", "250ms"]);
        }
        let admin = SocketAddr::new(self.net.ip(201), ADMIN_PORT).to_string();
        argv.extend_from_slice(&["--admin-listen", &admin]);
        let ca = testkit::certs().join("ca.pem").to_string_lossy().into_owned();
        let protocol = self.protocol.to_string();
        if self.protocol != Protocol::H2 {
            argv.extend_from_slice(&["--upstream-protocol", &protocol, "--ca-cert", &ca]);
        }
        argv.extend_from_slice(&["--relay", if self.relay { "on" } else { "off" }]);
        argv.extend_from_slice(extra);
        let args = proxy::config::Args::try_parse_from(argv).unwrap().serve;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        self.task = Some(tokio::spawn(proxy::run(args, listener, shutdown)));
        self.stop = Some(stop);
    }

    /// Starts a replica and publishes it in DNS.
    pub fn add(&mut self, name: &str, node: &str) {
        self.add_with(name, node, Faults::default());
    }

    pub fn add_with(&mut self, name: &str, node: &str, mut faults: Faults) {
        if self.protocol != Protocol::H2 && !faults.no_h3 {
            let dir = testkit::certs();
            faults.tls = Some((dir.join("cert.pem"), dir.join("key.pem")));
        }
        let host = self.members.len() as u8 + 1;
        let replica = Replica::start_with(self.net.addr(host), name, node, faults.clone());
        let m = Member { host, node: node.to_owned(), in_dns: true, faults, replica: Some(replica) };
        self.members.insert(name.to_owned(), m);
        self.publish();
    }

    /// Adds a replica that hangs after its HTTP/2 handshake ([`testkit::replica::silent`]),
    /// and publishes it in DNS. It cannot be killed or restarted.
    pub async fn add_silent(&mut self, name: &str, node: &str) {
        let host = self.members.len() as u8 + 1;
        testkit::replica::silent(self.net.addr(host)).await;
        let m = Member { host, node: node.to_owned(), in_dns: true, faults: Faults::default(), replica: None };
        self.members.insert(name.to_owned(), m);
        self.publish();
    }

    /// Adds a replica that resets every call with HTTP/2 error `reason`
    /// ([`testkit::replica::resetting`]), and publishes it in DNS. Returns the count of
    /// calls it reset. It cannot be killed or restarted.
    pub async fn add_resetting(&mut self, name: &str, node: &str, reason: u32) -> Arc<AtomicUsize> {
        let host = self.members.len() as u8 + 1;
        let resets = testkit::replica::resetting(self.net.addr(host), reason).await;
        let m = Member { host, node: node.to_owned(), in_dns: true, faults: Faults::default(), replica: None };
        self.members.insert(name.to_owned(), m);
        self.publish();
        resets
    }

    /// Writes every replica that is in DNS under TARGET, and node-a's under LOCAL.
    pub fn publish(&self) {
        let ips = |node: Option<&str>| -> Vec<_> {
            self.members
                .values()
                .filter(|m| m.in_dns && node.is_none_or(|n| m.node == n))
                .map(|m| self.net.ip(m.host))
                .collect()
        };
        self.dns.set(TARGET, &ips(None));
        self.dns.set(LOCAL, &ips(Some("node-a")));
    }

    pub fn set_in_dns(&mut self, name: &str, in_dns: bool) {
        self.members.get_mut(name).unwrap().in_dns = in_dns;
        self.publish();
    }

    /// The proxy's admin API.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.net.ip(201), ADMIN_PORT)
    }

    /// `GET path` on the admin API: the status code and the body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(self.admin()).await.expect("admin API reachable");
        let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
        (status, body.to_owned())
    }

    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.net.addr(self.members[name].host)
    }

    /// Drops every connection of `name` at once, like `kill -9`.
    pub fn kill(&mut self, name: &str) {
        self.members.get_mut(name).unwrap().replica.take().unwrap().kill();
    }

    /// Starts `name` again on its old address.
    pub fn restart(&mut self, name: &str) {
        let m = self.members.get_mut(name).unwrap();
        m.replica = Some(Replica::start_with(self.net.addr(m.host), name, &m.node, m.faults.clone()));
    }

    /// Begins a graceful drain of `name` (SIGTERM) and returns at once.
    pub fn begin_stop(&mut self, name: &str) -> Replica {
        let mut r = self.members.get_mut(name).unwrap().replica.take().unwrap();
        r.begin_stop();
        r
    }

    pub async fn client(&self) -> HelloServiceClient<Channel> {
        HelloServiceClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.proxy)).unwrap().connect().await.unwrap()
    }

    /// Waits until the proxy's own health says NOT_SERVING (no replica ready), or
    /// panics after 5 s.
    pub async fn wait_not_serving(&self) {
        self.wait_health(ServingStatus::NotServing).await;
    }

    /// Waits until the proxy's own health says SERVING (a replica is ready, whether or
    /// not its calls succeed), or panics after 5 s.
    pub async fn wait_serving(&self) {
        self.wait_health(ServingStatus::Serving).await;
    }

    async fn wait_health(&self, want: ServingStatus) {
        let mut health = HealthClient::new(self.channel().await);
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let status =
                health.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status());
            if status.as_ref().is_ok_and(|s| *s == want) {
                return;
            }
            assert!(Instant::now() < until, "the proxy not {want:?} after 5 s: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls until every replica in `names` has answered once, or panics after 5 s.
    pub async fn wait_for(&self, names: &[&str]) {
        let mut client = self.client().await;
        let until = Instant::now() + Duration::from_secs(5);
        let mut seen = std::collections::BTreeSet::new();
        while !names.iter().all(|n| seen.contains(*n)) {
            assert!(Instant::now() < until, "replicas {names:?} not all reached; saw {seen:?}");
            if let Ok(r) = client.say_hello(hello()).await {
                seen.insert(r.into_inner().server);
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Faults for a cluster where only replica `name` answers, `by` late.
pub fn late(name: &'static str, by: Duration) -> impl Fn(&str) -> Faults {
    move |n: &str| Faults { delay: if n == name { by } else { Duration::ZERO }, ..Faults::default() }
}

pub fn hello() -> HelloRequest {
    HelloRequest { name: "test".into() }
}

/// Calls per replica over `n` sequential calls, and the failures.
pub async fn tally(
    client: &mut HelloServiceClient<Channel>,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<tonic::Status>) {
    let mut counts = BTreeMap::new();
    let mut failures = Vec::new();
    for _ in 0..n {
        match client.say_hello(hello()).await {
            Ok(r) => *counts.entry(r.into_inner().server).or_default() += 1,
            Err(s) => failures.push(s),
        }
    }
    (counts, failures)
}

/// One gRPC call over a bare HTTP/2 connection, with no client-side deadline logic:
/// returns the response headers merged with the trailers.
pub async fn raw_call(proxy: SocketAddr, path: &str, headers: &[(&str, &str)], body: bytes::Bytes) -> http::HeaderMap {
    use http_body_util::{BodyExt, Full};
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{proxy}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let mut all = parts.headers;
    if let Some(trailers) = body.collect().await.unwrap().trailers() {
        all.extend(trailers.clone());
    }
    all
}

/// A gRPC length-prefixed frame around `msg`.
pub fn frame(msg: &[u8]) -> bytes::Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.into()
}

/// Runs the tests given once over HTTP/2 (`mod h2`) and once over HTTP/3 (`mod h3`) to
/// the replicas; each sees its protocol as `PROTOCOL`. With `relay;` first, also once
/// through the frame relay (`mod relay`, `PROTOCOL` a [`Path`]).
#[macro_export]
macro_rules! over_h2_and_h3 {
    (relay; $($item:item)*) => {
        $crate::over_h2_and_h3! { $($item)* }
        mod relay {
            #[allow(unused_imports)]
            use super::*;
            const PROTOCOL: $crate::support::Path = $crate::support::Path::RELAY;
            $($item)*
        }
    };
    ($($item:item)*) => {
        mod h2 {
            #[allow(unused_imports)]
            use super::*;
            const PROTOCOL: $crate::support::Protocol = $crate::support::Protocol::H2;
            $($item)*
        }
        mod h3 {
            #[allow(unused_imports)]
            use super::*;
            const PROTOCOL: $crate::support::Protocol = $crate::support::Protocol::H3;
            $($item)*
        }
    };
}

/// Runs the tests given once through the h2 path (`mod h2`) and once through the frame
/// relay (`mod relay`), both over HTTP/2 to the replicas; each sees its [`Path`] as
/// `PATH`.
#[macro_export]
macro_rules! on_h2_and_relay {
    ($($item:item)*) => {
        mod h2 {
            #[allow(unused_imports)]
            use super::*;
            const PATH: $crate::support::Path =
                $crate::support::Path { protocol: $crate::support::Protocol::H2, relay: false };
            $($item)*
        }
        mod relay {
            #[allow(unused_imports)]
            use super::*;
            const PATH: $crate::support::Path = $crate::support::Path::RELAY;
            $($item)*
        }
    };
}

/// Writes `json` to a fresh file and returns its path, for `--service-config`.
pub fn config_file(json: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("lb-sandbox-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("config-{}.json", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&path, json).unwrap();
    path.to_string_lossy().into_owned()
}

/// The replica `name`, for reading its counters.
impl Cluster {
    pub fn replica(&self, name: &str) -> &Replica {
        self.members[name].replica.as_ref().unwrap()
    }
}
