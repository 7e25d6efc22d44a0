//! HTTP/3 specifics: `auto` falling back per endpoint, the proxy's HTTP/3 front, and
//! what a QUIC listener must survive.

mod support;

use std::{net::SocketAddr, time::Duration};

use proto::{HelloRequest, HelloStreamRequest, hello_service_client::HelloServiceClient};
use support::{Cluster, Protocol, hello};
use testkit::replica::Faults;
use tokio_stream::StreamExt;

fn client_endpoint() -> quinn::Endpoint {
    let ca = testkit::certs().join("ca.pem");
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(grpc_h3::tls::client_config(&ca).unwrap());
    e
}

async fn h3_client(addr: SocketAddr, name: &str) -> HelloServiceClient<grpc_h3::client::H3Channel> {
    let endpoint = client_endpoint();
    let (client, driver) = grpc_h3::client::connect(&endpoint, addr, name).await.expect("HTTP/3 connect");
    tokio::spawn(async move {
        let _endpoint = endpoint;
        driver.await
    });
    HelloServiceClient::new(grpc_h3::client::H3Channel::new(client, format!("{name}:{}", addr.port()).parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_http3_where_served_and_falls_back_to_http2_elsewhere() {
    let faults = |n: &str| Faults { no_h3: n == "s2", ..Faults::default() };
    let c = Cluster::start_with(Protocol::Auto, &[("s1", "node-a"), ("s2", "node-a")], &[], faults).await;
    c.wait_for(&["s1", "s2"]).await;
    let mut client = c.client().await;
    let mut carried = std::collections::BTreeMap::new();
    for _ in 0..100 {
        let resp = client.say_hello(hello()).await.expect("no call fails");
        let protocol = resp.metadata().get("x-served-over").unwrap().to_str().unwrap().to_owned();
        *carried.entry((resp.into_inner().server, protocol)).or_insert(0) += 1;
    }
    let want = [(("s1".to_owned(), "h3".to_owned()), 50), (("s2".to_owned(), "h2".to_owned()), 50)];
    assert_eq!(carried, want.into(), "both protocols in one rotation, each call on its replica's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_front_speaks_http3_unary_and_streaming() {
    let front = testkit::certs();
    let (cert, key) = (front.join("cert.pem"), front.join("key.pem"));
    let args = ["--listen-h3", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    // The front listens on an ephemeral UDP port: find it with a fixed one instead.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    drop(udp);
    let listen = format!("127.0.0.1:{port}");
    let mut args = args.to_vec();
    args[1] = &listen;
    let c = Cluster::start(Protocol::H3, &[("s1", "node-a"), ("s2", "node-a")], &args).await;
    c.wait_for(&["s1", "s2"]).await;
    let mut client = h3_client(listen.parse().unwrap(), "localhost").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = client.say_hello(HelloRequest { name: "h3".into() }).await.unwrap().into_inner();
        assert!(r.message.starts_with("Hello, h3!"), "{r:?}");
        seen.insert(r.server);
    }
    assert_eq!(seen.len(), 2, "balanced over both locals: {seen:?}");
    let req = HelloStreamRequest { name: "s".into(), count: 5, interval_ms: 1, resume_after: 0 };
    let seqs: Vec<u64> =
        client.say_hello_stream(req).await.unwrap().into_inner().map(|m| m.unwrap().seq).collect().await;
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

/// A replica serving HTTP/3, for the tests below.
fn h3_replica(net: testkit::Subnet) -> testkit::Replica {
    let dir = testkit::certs();
    let faults = Faults { tls: Some((dir.join("cert.pem"), dir.join("key.pem"))), ..Faults::default() };
    testkit::Replica::start_with(net.addr(1), "s1", "node-a", faults)
}

async fn still_serves(addr: SocketAddr) {
    let mut client = h3_client(addr, "localhost").await;
    let r = client.say_hello(hello()).await.expect("the server still serves");
    assert_eq!(r.into_inner().server, "s1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_name_or_wrong_alpn_is_refused_and_the_server_goes_on() {
    let net = testkit::Subnet::random();
    let replica = h3_replica(net);
    let endpoint = client_endpoint();
    let wrong_name = grpc_h3::client::connect(&endpoint, replica.addr, "not-in-the-cert.test").await;
    assert!(wrong_name.is_err(), "a certificate for other names must be refused");

    let mut tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                for c in grpc_h3::tls::load_certs(&testkit::certs().join("ca.pem")).unwrap() {
                    roots.add(c).unwrap();
                }
                roots
            })
            .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let wrong_alpn =
        endpoint.connect_with(quinn::ClientConfig::new(std::sync::Arc::new(quic)), replica.addr, "localhost");
    assert!(wrong_alpn.unwrap().await.is_err(), "ALPN h2 over QUIC must be refused");
    still_serves(replica.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_and_silent_streams_are_bounded() {
    let net = testkit::Subnet::random();
    let replica = h3_replica(net);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for n in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|i| (i as u32 * 31 + n) as u8).collect();
        udp.send_to(&junk, replica.addr).await.unwrap();
    }
    // A peer that opens streams and never sends on them: it gets at most the stream
    // limit, and the others are not held up.
    let endpoint = client_endpoint();
    let conn = endpoint.connect(replica.addr, "localhost").unwrap().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..400 {
        match tokio::time::timeout(Duration::from_millis(20), conn.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                // One byte of a HEADERS frame type, and then nothing.
                send.write_all(&[0x01]).await.unwrap();
                held.push((send, recv));
            }
            _ => break,
        }
    }
    assert!(held.len() <= 256, "the stream limit holds: {} opened", held.len());
    still_serves(replica.addr).await;
}
