//! The library used directly as a tonic channel: no proxy, same behaviour.

use std::{collections::BTreeMap, time::Duration};

use balancer::{Balancer, Settings};
use proto::{HelloRequest, hello_service_client::HelloServiceClient};
use testkit::{Dns, Replica, Subnet};

type Client = HelloServiceClient<Balancer<tonic::body::Body>>;

async fn tally(client: &mut Client, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let r = client.say_hello(HelloRequest { name: "lib".into() }).await.expect("call failed");
        *counts.entry(r.into_inner().server).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_balances_local_first_and_fails_over() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let s1 = Replica::start(net.addr(1), "s1", "node-a");
    let s2 = Replica::start(net.addr(2), "s2", "node-a");
    let _s3 = Replica::start(net.addr(3), "s3", "node-b");
    dns.set("svc.test", &[net.ip(1), net.ip(2), net.ip(3)]);
    dns.set("node-a.svc.test", &[net.ip(1), net.ip(2)]);

    let mut settings = Settings::new("svc.test:50051".parse().unwrap());
    settings.local_target = Some("node-a.svc.test:50051".parse().unwrap());
    settings.dns_server = Some(dns.addr());
    // The sandbox's default policy: a call lost with a killed replica may have run, so
    // only a policy listing UNAVAILABLE sends it again.
    let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/service-config.json"));
    settings.service_config = balancer::retry::ServiceConfig::parse(&config.unwrap(), 5).unwrap();
    let channel = Balancer::new(settings).unwrap();
    let mut ready = channel.ready_endpoints();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|n| *n == 3)).await.unwrap().unwrap();
    let counters = channel.counters().clone();
    let mut client = HelloServiceClient::new(channel);

    let counts = tally(&mut client, 300).await;
    assert_eq!(counts, BTreeMap::from([("s1".into(), 150), ("s2".into(), 150)]));

    s1.kill();
    s2.kill();
    let counts = tally(&mut client, 20).await;
    assert_eq!(counts, BTreeMap::from([("s3".into(), 20)]), "no failed calls, all on node-b");

    let m = &counters.snapshot()["/hello.HelloService/SayHello"];
    assert_eq!(m.calls, 320);
    assert_eq!(m.outcomes.get("OK"), Some(&320));
    assert_eq!(m.attempts, 320 + m.retries, "transparent retries are not attempts");
    assert_eq!((m.hedges, m.throttled), (0, 0));
}
