//! HTTP/2 keepalive against real sockets: a replica that completes its handshake and
//! then falls silent (hung, or its node gone without a FIN) leaves rotation 1 to 1.25
//! keepalive intervals plus the 750 ms ping timeout after its last word, while one
//! that answers pings stays in.

use std::time::Duration;

use balancer::{Balancer, Settings};
use testkit::{Dns, Replica, Subnet};
use tokio::time::Instant;

type Channel = Balancer<tonic::body::Body>;

async fn wait_ready(channel: &Channel, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    let mut ready = channel.ready_endpoints();
    tokio::time::timeout(within, ready.wait_for(|r| *r == n))
        .await
        .unwrap_or_else(|_| panic!("not {n} ready endpoints within {within:?}"))
        .unwrap();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_leaves_rotation_after_one_unanswered_ping() {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let _s1 = Replica::start(net.addr(1), "s1", "node-a");
    testkit::replica::silent(net.addr(2)).await;
    dns.set("svc.test", &[net.ip(1), net.ip(2)]);
    let mut settings = Settings::new("svc.test:50051".parse().unwrap());
    settings.dns_server = Some(dns.addr());
    settings.keepalive = Duration::from_millis(500);
    let channel = Channel::new(settings).unwrap();
    wait_ready(&channel, 2, Duration::from_secs(5)).await;
    let mut ready = channel.ready_endpoints();
    let lowest = tokio::spawn(async move {
        let mut lowest = usize::MAX;
        let until = Instant::now() + Duration::from_secs(3);
        while let Ok(Ok(())) = tokio::time::timeout_at(until, ready.changed()).await {
            lowest = lowest.min(*ready.borrow_and_update());
        }
        lowest
    });

    // Silent for an interval (checked every quarter of one), a ping, 750 ms without
    // its answer: 1.25 to 1.375 s, plus scheduling; the figure is printed, not asserted.
    let out = wait_ready(&channel, 1, Duration::from_secs(3)).await;
    println!("silent replica out of rotation after {out:?}");
    // Out for the unanswered ping, not for anything else.
    let silent = channel.endpoints().endpoints.into_iter().find(|e| e.address == net.addr(2)).expect("still known");
    let why = silent.last_error.unwrap_or_default();
    assert!(why.contains("keep-alive timed out"), "dropped for another reason: {why}");
    // The silent one may come and go again as it accepts new connections; the one
    // answering its pings never leaves.
    assert_eq!(lowest.await.unwrap(), 1, "the replica answering pings stayed in rotation");
}
