//! gRFC A17 health checking with real replicas: NOT_SERVING takes a replica out of
//! rotation and SERVING brings it back, a replica without the health service counts as
//! healthy, and one that answers Watch with garbage stays out without a busy loop.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use balancer::{Balancer, Settings, retry::ServiceConfig};
use http::Response;
use proto::{HelloRequest, hello_service_client::HelloServiceClient, hello_service_server::HelloServiceServer};
use testkit::{Dns, Replica, Subnet};
use tokio::{net::TcpListener, sync::watch, time::Instant};

type Channel = Balancer<tonic::body::Body>;

fn settings(dns: &Dns) -> Settings {
    let mut settings = Settings::new("svc.test:50051".parse().unwrap());
    settings.dns_server = Some(dns.addr());
    let json = r#"{ "healthCheckConfig": { "serviceName": "hello.HelloService" } }"#;
    settings.service_config = ServiceConfig::parse(json, 5).unwrap();
    settings
}

async fn wait_ready(channel: &Channel, n: usize) -> Duration {
    let started = Instant::now();
    let mut ready = channel.ready_endpoints();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r == n))
        .await
        .unwrap_or_else(|_| panic!("never {n} ready endpoints"))
        .unwrap();
    started.elapsed()
}

async fn calls(channel: &Channel, n: usize) -> BTreeMap<String, usize> {
    let mut client = HelloServiceClient::new(channel.clone());
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let r = client.say_hello(HelloRequest { name: "hc".into() }).await.expect("call failed");
        *served.entry(r.into_inner().server).or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_takes_a_replica_out_and_serving_brings_it_back() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let s1 = Replica::start(net.addr(1), "s1", "node-a");
    let _s2 = Replica::start(net.addr(2), "s2", "node-a");
    dns.set("svc.test", &[net.ip(1), net.ip(2)]);
    let channel = Balancer::new(settings(&dns)).unwrap();
    wait_ready(&channel, 2).await;

    s1.set_sick(true); // health NOT_SERVING, and its calls would fail
    let out = wait_ready(&channel, 1).await;
    println!("NOT_SERVING to out of rotation: {out:?}");
    assert_eq!(calls(&channel, 10).await, BTreeMap::from([("s2".into(), 10)]), "no call reached the sick one");

    s1.set_sick(false);
    wait_ready(&channel, 2).await;
    assert_eq!(calls(&channel, 10).await, BTreeMap::from([("s1".into(), 5), ("s2".into(), 5)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_health_service_counts_as_healthy() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    // HelloService alone: Health/Watch answers UNIMPLEMENTED.
    let listener = TcpListener::bind(net.addr(1)).await.unwrap();
    let cfg = server::Config {
        name: "bare".into(),
        node: "node-a".into(),
        drain_timeout: Duration::from_secs(1),
        fail_rate: 0.0,
        fail_code: tonic::Code::Unavailable,
        fail_pushback_ms: None,
        delay: Duration::ZERO,
        h3: None,
        sick: watch::channel(false).1,
    };
    let greeter = server::greeter::Greeter::new(Arc::new(cfg), watch::channel(false).1);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder().add_service(HelloServiceServer::new(greeter)).serve_with_incoming(incoming),
    );
    dns.set("svc.test", &[net.ip(1)]);
    let channel = Balancer::new(settings(&dns)).unwrap();
    wait_ready(&channel, 1).await;
    assert_eq!(calls(&channel, 3).await, BTreeMap::from([("bare".into(), 3)]));
}

/// An HTTP/2 server that answers Health/Watch with response headers and garbage, and
/// counts the Watch streams opened.
async fn garbage_watch_server(listener: TcpListener, watches: Arc<AtomicUsize>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let watches = watches.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if req.uri().path() != "/grpc.health.v1.Health/Watch" {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                watches.fetch_add(1, Ordering::SeqCst);
                let head = Response::builder().header("content-type", "application/grpc").body(()).unwrap();
                let Ok(mut send) = respond.send_response(head, false) else { continue };
                let _ = send.send_data(bytes::Bytes::from_static(&[7, 0, 0, 0, 1, 8]), false);
                tokio::spawn(async move {
                    // Keep the stream open: the balancer must be the one to give up on it.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(send);
                });
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_watch_keeps_a_replica_out_without_a_busy_loop() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let watches = Arc::new(AtomicUsize::new(0));
    tokio::spawn(garbage_watch_server(TcpListener::bind(net.addr(1)).await.unwrap(), watches.clone()));
    dns.set("svc.test", &[net.ip(1)]);
    let channel: Channel = Balancer::new(settings(&dns)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(*channel.ready_endpoints().borrow(), 0, "never healthy");
    let n = watches.load(Ordering::SeqCst);
    // Re-opened after 0.1, 0.2, 0.4, 0.8 s (each with jitter down to half): a few times
    // in two seconds, not thousands.
    assert!((3..=6).contains(&n), "{n} Watch streams in 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_is_not_held_open_by_the_health_watch() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let s1 = Replica::start(net.addr(1), "s1", "node-a"); // drain timeout 5 s
    let _s2 = Replica::start(net.addr(2), "s2", "node-a");
    dns.set("svc.test", &[net.ip(1), net.ip(2)]);
    let channel = Balancer::new(settings(&dns)).unwrap();
    wait_ready(&channel, 2).await;

    // SIGTERM's drain: NOT_SERVING, GOAWAY, then it waits for open streams, the
    // balancer's Watch among them, unless the balancer lets go on the GOAWAY.
    let started = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || s1.stop());
    tokio::time::timeout(Duration::from_secs(3), stopped).await.expect("the drain waited for the watch").unwrap();
    println!("drained in {:?}", started.elapsed());
    assert_eq!(calls(&channel, 4).await, BTreeMap::from([("s2".into(), 4)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checking_works_over_http3_too() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let certs = testkit::certs();
    let tls = Some((certs.join("cert.pem"), certs.join("key.pem")));
    let faults = testkit::replica::Faults { tls, ..Default::default() };
    let s1 = Replica::start_with(net.addr(1), "s1", "node-a", faults.clone());
    let _s2 = Replica::start_with(net.addr(2), "s2", "node-a", faults);
    dns.set("svc.test", &[net.ip(1), net.ip(2)]);
    let mut settings = settings(&dns);
    settings.protocol = balancer::Protocol::H3;
    settings.ca_cert = Some(certs.join("ca.pem"));
    let channel = Balancer::new(settings).unwrap();
    wait_ready(&channel, 2).await;
    s1.set_sick(true);
    wait_ready(&channel, 1).await;
    assert_eq!(calls(&channel, 4).await, BTreeMap::from([("s2".into(), 4)]));
    s1.set_sick(false);
    wait_ready(&channel, 2).await;
}
