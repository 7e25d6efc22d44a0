//! How the client reaches the replicas: through the proxy (a plain tonic channel) or
//! directly, balancing with the `balancer` library like the proxy does.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use balancer::{Balancer, HostPort, Settings, discover::Dns, duration};
use clap::Args;
use grpc_h3::client::H3Channel;
use proto::{HelloRequest, HelloResponse, HelloStreamRequest, hello_service_client::HelloServiceClient};
use tokio::sync::watch;
use tonic::{Request, Status, Streaming, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The proxy to call, HOST:PORT.
    #[arg(long, global = true, env = "CLIENT_PROXY", default_value = "localhost:50050")]
    pub proxy: HostPort,
    /// Balance by itself over every address of this HOST:PORT instead of using the proxy.
    #[arg(long, global = true, env = "CLIENT_TARGET")]
    pub target: Option<HostPort>,
    /// With --target: HOST:PORT whose addresses are this node's replicas.
    #[arg(long, global = true, env = "CLIENT_LOCAL_TARGET", requires = "target")]
    pub local_target: Option<HostPort>,
    /// With client-side balancing: where replicas come from, `dns` (--target) or
    /// `kubernetes` (the EndpointSlices of --service, through the kubeconfig).
    #[arg(long, global = true, env = "CLIENT_DISCOVERY", default_value = "dns", value_parser = ["dns", "kubernetes"])]
    pub discovery: String,
    /// With --discovery kubernetes: the Service, its namespace, and its port (name or number).
    #[arg(long, global = true, env = "CLIENT_SERVICE")]
    pub service: Option<String>,
    #[arg(long, global = true, env = "CLIENT_NAMESPACE")]
    pub namespace: Option<String>,
    #[arg(long = "port", global = true, env = "CLIENT_SERVICE_PORT")]
    pub service_port: Option<balancer::kubernetes::PortRef>,
    /// With --discovery kubernetes: this node and zone, whose replicas come first.
    #[arg(long, global = true, env = "NODE_NAME")]
    pub node: Option<String>,
    #[arg(long, global = true, env = "ZONE")]
    pub zone: Option<String>,
    /// DNS server IP:PORT [default: the system resolver configuration].
    #[arg(long, global = true, env = "CLIENT_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Call the proxy's HTTP/3 front (UDP, same port) instead of h2c.
    #[arg(long, global = true, env = "CLIENT_HTTP3", requires = "ca_cert")]
    pub http3: bool,
    /// CA certificate (PEM) to verify the proxy with, for --http3.
    #[arg(long, global = true, env = "CLIENT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Deadline of each call.
    #[arg(long, global = true, env = "CLIENT_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub timeout: Duration,
}

#[derive(Clone)]
enum Inner {
    Proxy { hello: HelloServiceClient<Channel>, health: HealthClient<Channel> },
    Direct { hello: HelloServiceClient<Balancer<tonic::body::Body>>, ready: watch::Receiver<usize> },
    Http3 { hello: HelloServiceClient<H3Channel>, health: HealthClient<H3Channel> },
}

/// A connection to HelloService, through the proxy or direct. Cheap to clone.
#[derive(Clone)]
pub struct Conn {
    inner: Inner,
    describe: String,
    timeout: Duration,
}

impl Conn {
    pub async fn open(a: &ConnArgs) -> anyhow::Result<Conn> {
        if a.discovery == "kubernetes" {
            let (Some(service), Some(port)) = (&a.service, &a.service_port) else {
                bail!("--discovery kubernetes needs --service NAME and --port NAME|NUMBER");
            };
            let k = balancer::kubernetes::KubernetesSettings {
                service: service.clone(),
                namespace: a.namespace.clone().filter(|n| !n.is_empty()),
                port: port.clone(),
                node: a.node.clone().filter(|n| !n.is_empty()),
                zone: a.zone.clone().filter(|z| !z.is_empty()),
            };
            let describe = format!("{} (client-side balancing)", k.target());
            let mut s = Settings::kubernetes(k);
            s.connect_timeout = a.timeout;
            let balancer = Balancer::new(s).context("starting the balancer")?;
            let inner = Inner::Direct { ready: balancer.ready_endpoints(), hello: HelloServiceClient::new(balancer) };
            return Ok(Conn { inner, describe, timeout: a.timeout });
        }
        if let Some(target) = &a.target {
            let mut s = Settings::new(target.clone());
            s.local_target = a.local_target.clone();
            s.dns_server = a.dns_server;
            s.connect_timeout = a.timeout;
            let describe = match &a.local_target {
                Some(local) => format!("{target} (local: {local}, client-side balancing)"),
                None => format!("{target} (client-side balancing)"),
            };
            let balancer = Balancer::new(s).context("starting the balancer")?;
            let inner = Inner::Direct { ready: balancer.ready_endpoints(), hello: HelloServiceClient::new(balancer) };
            return Ok(Conn { inner, describe, timeout: a.timeout });
        }
        // Resolved with hickory, not libc: the static binaries have no NSS.
        let addr = resolve(&a.proxy, a.dns_server).await?;
        if a.http3 {
            let ca = a.ca_cert.as_deref().context("--http3 needs --ca-cert")?;
            let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?).context("binding a UDP socket")?;
            endpoint.set_default_client_config(grpc_h3::tls::client_config(ca)?);
            let connect = grpc_h3::client::connect(&endpoint, addr, &a.proxy.host);
            let (client, driver) = tokio::time::timeout(a.timeout, connect)
                .await
                .map_err(|_| {
                    anyhow::anyhow!("--proxy {} over HTTP/3: no QUIC handshake within {:?}", a.proxy, a.timeout)
                })?
                .map_err(|e| anyhow::anyhow!("--proxy {} over HTTP/3: {e}", a.proxy))?;
            tokio::spawn(async move {
                let _endpoint = endpoint; // lives as long as the connection
                driver.await
            });
            let channel = H3Channel::new(client, a.proxy.to_string().parse()?);
            let inner =
                Inner::Http3 { hello: HelloServiceClient::new(channel.clone()), health: HealthClient::new(channel) };
            return Ok(Conn { inner, describe: format!("proxy {} ({addr}, HTTP/3)", a.proxy), timeout: a.timeout });
        }
        let channel =
            Channel::from_shared(format!("http://{addr}"))?.connect_timeout(a.timeout).tcp_nodelay(true).connect_lazy();
        let inner =
            Inner::Proxy { hello: HelloServiceClient::new(channel.clone()), health: HealthClient::new(channel) };
        Ok(Conn { inner, describe: format!("proxy {} ({addr})", a.proxy), timeout: a.timeout })
    }

    /// What this connects to, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub async fn hello(&self, name: &str) -> Result<HelloResponse, Status> {
        let mut req = Request::new(HelloRequest { name: name.to_owned() });
        req.set_timeout(self.timeout);
        let resp = match self.inner.clone() {
            Inner::Proxy { mut hello, .. } => hello.say_hello(req).await?,
            Inner::Direct { mut hello, .. } => hello.say_hello(req).await?,
            Inner::Http3 { mut hello, .. } => hello.say_hello(req).await?,
        };
        Ok(resp.into_inner())
    }

    /// Opens a stream; no deadline, since it may run for as long as the caller wants.
    pub async fn stream(&self, req: HelloStreamRequest) -> Result<Streaming<HelloResponse>, Status> {
        let resp = match self.inner.clone() {
            Inner::Proxy { mut hello, .. } => hello.say_hello_stream(req).await?,
            Inner::Direct { mut hello, .. } => hello.say_hello_stream(req).await?,
            Inner::Http3 { mut hello, .. } => hello.say_hello_stream(req).await?,
        };
        Ok(resp.into_inner())
    }

    /// Whether calls can be placed now: the proxy's health, or a ready replica.
    pub async fn ready(&self) -> bool {
        match self.inner.clone() {
            Inner::Proxy { mut health, .. } => serving(health.check(check()).await),
            Inner::Http3 { mut health, .. } => serving(health.check(check()).await),
            Inner::Direct { ready, .. } => *ready.borrow() > 0,
        }
    }
}

fn check() -> Request<HealthCheckRequest> {
    let mut req = Request::new(HealthCheckRequest { service: String::new() });
    req.set_timeout(Duration::from_secs(1));
    req
}

fn serving(r: Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, Status>) -> bool {
    matches!(r, Ok(r) if r.get_ref().status() == ServingStatus::Serving)
}

async fn resolve(hp: &HostPort, dns: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let discovery = Dns::new(hp.clone(), None, dns)?;
    match discovery.lookup().await {
        balancer::discover::Lookup::Found(r) => {
            let mut all = r.all;
            all.sort_by_key(|a| a.is_ipv6());
            match all.first() {
                Some(addr) => Ok(*addr),
                None => bail!("--proxy {hp}: the name does not resolve"),
            }
        }
        balancer::discover::Lookup::Failed(e) => bail!("--proxy {hp}: {e}"),
    }
}

/// One line for a failed call: the code, the message, and the root cause if any.
pub fn explain(s: &Status) -> String {
    let mut line = format!("{}: {}", balancer::code::code_name(s.code()), s.message());
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    if let Some(root) = root {
        line += &format!(" ({root})");
    }
    line
}
