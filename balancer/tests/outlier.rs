//! Outlier detection end to end, with real replicas: a run of failed calls ejects a
//! replica (statuses in trailers count too), the caller's own deadlines do not, and an
//! ejected replica comes back after its ejection time.

use std::{collections::BTreeMap, time::Duration};

use balancer::{Balancer, Settings, retry::ServiceConfig};
use proto::{HelloRequest, hello_service_client::HelloServiceClient};
use testkit::{
    Dns, Replica, Subnet,
    echo::pb::{EchoMessage, echo_client::EchoClient},
    replica::Faults,
};

/// Consecutive-failure ejection after five, back after one second, with `extra` JSON
/// (a method config) added to the service config.
fn config(extra: &str) -> ServiceConfig {
    let json = format!(
        r#"{{ "loadBalancingConfig": [{{ "outlier_detection": {{
              "interval": "0.1s", "baseEjectionTime": "1s", "maxEjectionPercent": 50,
              "consecutiveFailures": {{ "threshold": 5 }},
              "childPolicy": [{{ "round_robin": {{}} }}] }} }}]
            {extra} }}"#
    );
    ServiceConfig::parse(&json, 5).unwrap()
}

const RETRY: &str = r#", "methodConfig": [{ "name": [{ "service": "hello.HelloService" }],
    "retryPolicy": { "maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                     "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"] } }]"#;

struct Cluster {
    channel: Balancer<tonic::body::Body>,
    replicas: Vec<Replica>,
    _dns: Dns,
}

/// Replicas on one node, one per entry of `faults`, named s1, s2, …
async fn cluster(faults: Vec<Faults>, config: ServiceConfig) -> Cluster {
    cluster_with(faults, config, |_| {}).await
}

async fn cluster_with(faults: Vec<Faults>, config: ServiceConfig, tune: impl FnOnce(&mut Settings)) -> Cluster {
    testkit::init_logging();
    let net = Subnet::random();
    let dns = Dns::start(net.ip(250)).await;
    let n = faults.len();
    let replicas: Vec<Replica> = faults
        .into_iter()
        .enumerate()
        .map(|(i, f)| Replica::start_with(net.addr(i as u8 + 1), &format!("s{}", i + 1), "node-a", f))
        .collect();
    let ips: Vec<_> = (1..=n as u8).map(|i| net.ip(i)).collect();
    dns.set("svc.test", &ips);
    let mut settings = Settings::new("svc.test:50051".parse().unwrap());
    settings.dns_server = Some(dns.addr());
    settings.service_config = config;
    tune(&mut settings);
    let channel = Balancer::new(settings).unwrap();
    let mut ready = channel.ready_endpoints();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r == n)).await.unwrap().unwrap();
    Cluster { channel, replicas, _dns: dns }
}

/// `n` SayHello calls: who answered each successful one, and how many failed.
async fn calls(channel: &Balancer<tonic::body::Body>, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut client = HelloServiceClient::new(channel.clone());
    let (mut served, mut failed) = (BTreeMap::new(), 0);
    for _ in 0..n {
        match client.say_hello(HelloRequest { name: "od".into() }).await {
            Ok(r) => *served.entry(r.into_inner().server).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (served, failed)
}

fn failing() -> Faults {
    Faults { fail_rate: 1.0, ..Faults::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_every_call_is_ejected_after_five_failed_calls() {
    let c = cluster(vec![failing(), Faults::default(), Faults::default()], config("")).await;
    let (served, failed) = calls(&c.channel, 60).await;
    assert_eq!(failed, 5, "round-robin gave s1 a call in three until its fifth failure ejected it");
    assert_eq!(served.values().sum::<usize>(), 55);
    assert!(!served.contains_key("s1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_retry_policy_callers_see_no_failure_at_all() {
    let c = cluster(vec![failing(), Faults::default(), Faults::default()], config(RETRY)).await;
    let (served, failed) = calls(&c.channel, 60).await;
    assert_eq!(failed, 0);
    assert_eq!(served.values().sum::<usize>(), 60);
    let m = &c.channel.counters().snapshot()["/hello.HelloService/SayHello"];
    assert_eq!((m.attempts, m.retries), (65, 5), "s1 took five attempts, each retried, then no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_replica_comes_back_after_its_ejection_time() {
    let c = cluster(vec![Faults::default(), Faults::default()], config("")).await;
    c.replicas[0].set_sick(true); // its calls fail with UNAVAILABLE
    let (_, failed) = calls(&c.channel, 10).await;
    assert_eq!(failed, 5);
    c.replicas[0].set_sick(false);
    let (served, failed) = calls(&c.channel, 10).await;
    assert_eq!((served.get("s1"), failed), (None, 0), "still ejected");
    // Back after baseEjectionTime (1 s), at the next interval (0.1 s): wait for it.
    let back = async {
        loop {
            if calls(&c.channel, 2).await.0.contains_key("s1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), back).await.expect("s1 never came back");
    let (served, _) = calls(&c.channel, 10).await;
    assert_eq!(served, BTreeMap::from([("s1".into(), 5), ("s2".into(), 5)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_in_trailers_counts_as_a_failure() {
    let c = cluster(vec![Faults::default(), Faults::default(), Faults::default()], config("")).await;
    let mut echo = EchoClient::new(c.channel.clone());
    let (mut failed, mut served) = (0, BTreeMap::<String, usize>::new());
    for _ in 0..30 {
        // Every replica echoes it, but s1 answers it with headers, then UNAVAILABLE in trailers.
        let msg = EchoMessage { text: "fail:s1".into(), server: String::new() };
        let mut stream = echo.chat(tokio_stream::iter([msg])).await.expect("headers").into_inner();
        match stream.message().await {
            Ok(Some(m)) => *served.entry(m.server).or_default() += 1,
            _ => failed += 1,
        }
    }
    assert_eq!(failed, 5, "the fifth UNAVAILABLE in trailers ejected s1");
    assert_eq!(served.values().sum::<usize>(), 25);
    assert!(!served.contains_key("s1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_own_deadlines_are_not_failures() {
    let slow = Faults { delay: Duration::from_millis(300), ..Faults::default() };
    let c = cluster(vec![slow, Faults::default()], config("")).await;
    let mut client = HelloServiceClient::new(c.channel.clone());
    let mut deadlines = 0;
    for _ in 0..20 {
        let mut req = tonic::Request::new(HelloRequest { name: "hurry".into() });
        req.set_timeout(Duration::from_millis(50));
        if let Err(s) = client.say_hello(req).await {
            // The proxy's deadline, or tonic's server giving up on the same deadline
            // first (it answers CANCELLED "Timeout expired").
            assert!(matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{s:?}");
            deadlines += 1;
        }
    }
    assert_eq!(deadlines, 10, "every call on s1 ran out of time");
    let (served, failed) = calls(&c.channel, 4).await;
    assert_eq!((served.get("s1"), failed), (Some(&2), 0), "s1 still takes its share");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_failing_on_their_own_do_not_eject_a_replica() {
    let c = cluster_with(vec![Faults::default(), Faults::default()], config(""), |s| s.max_message = 1024).await;
    let mut client = HelloServiceClient::new(c.channel.clone());
    for _ in 0..12 {
        let err = client.say_hello(HelloRequest { name: "x".repeat(4096) }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    }
    let (served, failed) = calls(&c.channel, 4).await;
    assert_eq!((served.get("s1"), served.get("s2"), failed), (Some(&2), Some(&2), 0), "neither was ejected");
}
