//! Local-first round-robin, failover, failback and discovery, through the real proxy.

mod support;

use std::time::Duration;

use proto::hello_service_client::HelloServiceClient;
use support::{Cluster, hello, tally};
use tokio::time::Instant;
use tonic::transport::Channel;

const LAYOUT: &[(&str, &str)] = &[("s1", "node-a"), ("s2", "node-a"), ("s3", "node-b")];

/// Calls until one is answered by `replica`, every call succeeding, within `within`.
async fn calls_reach(client: &mut HelloServiceClient<Channel>, replica: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let r = client.say_hello(hello()).await.expect("call during failback").into_inner();
        if r.server == replica {
            return;
        }
        assert!(Instant::now() < until, "{replica} got no call within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

over_h2_and_h3! {
    relay;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spreads_calls_evenly_over_local_replicas_only() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let (counts, failures) = tally(&mut c.client().await, 300).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.get("s3"), None, "no calls to the remote replica: {counts:?}");
        for local in ["s1", "s2"] {
            let n = counts[local];
            assert!((135..=165).contains(&n), "{local} got {n} of 300, expected 150 ± 10%: {counts:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_replica_receives_calls_within_a_second_of_resolving() {
        let mut c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut client = c.client().await;
        let added = Instant::now();
        c.add("s4", "node-a");
        loop {
            let r = client.say_hello(hello()).await.unwrap().into_inner();
            if r.server == "s4" {
                break;
            }
            assert!(added.elapsed() < Duration::from_secs(1), "s4 got no call within 1 s");
        }
        let (counts, _) = tally(&mut client, 30).await;
        assert_eq!(counts.get("s4"), Some(&10), "s4 takes its round-robin share: {counts:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_draining_mid_load_fails_no_call() {
        let mut c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut client = c.client().await;
        let (flowing, started) = tokio::sync::oneshot::channel();
        let load = tokio::spawn(async move {
            let (mut counts, mut failures) = tally(&mut client, 100).await;
            let _ = flowing.send(());
            let (more, more_failures) = tally(&mut client, 300).await;
            more.into_iter().for_each(|(k, n)| *counts.entry(k).or_default() += n);
            failures.extend(more_failures);
            (counts, failures)
        });
        // SIGTERM once 100 calls went through, with 300 to go: the replica sends GOAWAY
        // and finishes what it took; calls it did not take go to s2, whichever
        // connection they were on.
        started.await.unwrap();
        let _stopping = c.begin_stop("s1");
        let (counts, failures) = load.await.unwrap();
        assert!(failures.is_empty(), "a drain failed calls: {failures:?} ({counts:?})");
        assert_eq!(counts.values().sum::<usize>(), 400);
        assert_eq!(counts.get("s3"), None, "s2 took s1's share, not the remote: {counts:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fails_over_to_remote_when_locals_die_then_fails_back() {
        // A call in flight on a killed replica may have run: only the sandbox's default
        // policy (retry UNAVAILABLE) sends it again.
        let mut c = Cluster::start(PROTOCOL, LAYOUT, &["--service-config", support::SANDBOX_CONFIG]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut client = c.client().await;
        c.kill("s1");
        c.kill("s2");
        let (counts, failures) = tally(&mut client, 50).await;
        assert!(failures.is_empty(), "killing the locals failed calls: {failures:?}");
        assert_eq!(counts.get("s3"), Some(&50), "{counts:?}");

        c.restart("s1");
        calls_reach(&mut client, "s1", Duration::from_secs(2)).await;
        let (counts, failures) = tally(&mut client, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.get("s1"), Some(&20), "calls return to the local replica: {counts:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_over_proxy_finds_a_new_local_replica_long_before_its_resolve_interval() {
        // As in Docker or Kubernetes, dead replicas leave DNS: no failing reconnect
        // prompts a resolution, only the interval, here 30 s. The sandbox's policy
        // retries the calls the kill caught.
        let args = ["--resolve-interval", "30s", "--service-config", support::SANDBOX_CONFIG];
        let mut c = Cluster::start(PROTOCOL, LAYOUT, &args).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut client = c.client().await;
        for name in ["s1", "s2"] {
            c.kill(name);
            c.set_in_dns(name, false);
        }
        let (counts, failures) = tally(&mut client, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.get("s3"), Some(&20), "failed over: {counts:?}");

        c.add("s4", "node-a");
        calls_reach(&mut client, "s4", Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_removed_from_dns_receives_no_new_calls() {
        let mut c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        c.set_in_dns("s2", false);
        // Wait for the next resolution: round-robin over s1 and s2 until then, so four
        // answers from s1 in a row say s2 is gone.
        let mut client = c.client().await;
        let (until, mut in_a_row) = (Instant::now() + Duration::from_secs(5), 0);
        while in_a_row < 4 {
            assert!(Instant::now() < until, "s2 still in rotation 5 s after leaving DNS");
            let r = client.say_hello(hello()).await.expect("no call fails");
            in_a_row = if r.into_inner().server == "s1" { in_a_row + 1 } else { 0 };
        }
        let (counts, failures) = tally(&mut client, 50).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.get("s1"), Some(&50), "{counts:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_locality_every_replica_shares_the_calls() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.dns.set(support::LOCAL, &[]);
        c.wait_for(&["s1", "s2", "s3"]).await;
        let (counts, failures) = tally(&mut c.client().await, 300).await;
        assert!(failures.is_empty(), "{failures:?}");
        for name in ["s1", "s2", "s3"] {
            let n = counts[name];
            assert!((90..=110).contains(&n), "{name} got {n} of 300: {counts:?}");
        }
    }
}

/// A call finding no ready replica waits for one up to its deadline, or the connect
/// timeout without one.
mod waiting {
    use super::*;

    /// A cluster whose replicas all served, then all died, with the proxy told so: until
    /// the proxy notices, a call may go out on a dying connection and fail naming that
    /// replica (it may have run); once it has, nothing is tried.
    async fn all_down(path: impl Into<support::Path>, connect_timeout: &str) -> Cluster {
        let mut c = Cluster::start(path, LAYOUT, &["--connect-timeout", connect_timeout]).await;
        c.wait_for(&["s1", "s2"]).await;
        for name in ["s1", "s2", "s3"] {
            c.kill(name);
        }
        c.wait_not_serving().await;
        c
    }

    over_h2_and_h3! {
        relay;
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn when_every_replica_is_down_calls_fail_within_the_connect_timeout() {
            let c = all_down(PROTOCOL, "1s").await;
            let mut client = c.client().await;
            let started = Instant::now();
            let err = client.say_hello(hello()).await.unwrap_err();
            let took = started.elapsed();
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
            assert!(err.message().contains("server.test:50051"), "names the target: {}", err.message());
            // TCP is refused at once; QUIC hears nothing and gives up at its timeout. Which
            // QUIC error an address shows depends on whether a reconnect timed out within
            // the call's wait ("timed out") or the lost connection's is still the last
            // ("connection lost: Timeout"); both say what was tried.
            let (what, bound): (&[&str], _) = match PROTOCOL == support::Protocol::H2 {
                true => (&["refused"], Duration::from_millis(1500)),
                false => (&["timed out", "Timeout"], Duration::from_millis(3000)),
            };
            assert!(what.iter().any(|w| err.message().contains(w)), "says what was tried: {}", err.message());
            assert!(took < bound, "took {took:?} with a 1 s connect timeout");

            // A bare HTTP/2 call, so the proxy's answer is seen rather than a client's own timer.
            let started = Instant::now();
            let path = "/hello.HelloService/SayHello";
            let h = support::raw_call(c.proxy, path, &[("grpc-timeout", "300m")], support::frame(b"")).await;
            assert_eq!(h["grpc-status"], "4", "DEADLINE_EXCEEDED: {h:?}");
            assert!(started.elapsed() < Duration::from_millis(1000), "waited past the deadline");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_call_made_while_every_replica_is_down_is_answered_once_one_is_back() {
            let mut c = all_down(PROTOCOL, "10s").await;
            let mut client = c.client().await;
            let call = tokio::spawn(async move { client.say_hello(hello()).await });
            // It waits rather than failing at once.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!call.is_finished(), "the call ended with no replica ready: {:?}", call.await);
            c.restart("s3");
            let reply = call.await.unwrap().expect("answered once a replica was back");
            assert_eq!(reply.into_inner().server, "s3");
        }
    }
}

/// A replica that hangs mid-call (its process stopped, its node gone without a FIN).
mod hung {
    use super::*;

    on_h2_and_relay! {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_call_on_a_hung_replica_ends_unavailable_after_a_missed_ping_not_at_its_deadline() {
            let mut c = Cluster::start(PATH, &[], &["--keepalive-interval", "500ms"]).await;
            c.add_silent("hung", "node-a").await;
            c.wait_serving().await;
            let mut client = c.client().await;
            let started = Instant::now();
            let mut call = tonic::Request::new(hello());
            call.set_timeout(Duration::from_secs(10));
            let err = client.say_hello(call).await.expect_err("a hung replica answers nothing");
            let took = started.elapsed();
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
            let hung = c.addr_of("hung").to_string();
            assert!(err.message().contains(&hung), "names the replica: {}", err.message());
            // Silent for an interval, then 750 ms past the ping: about 1.25 s.
            assert!(took < Duration::from_secs(5), "took {took:?}, as if waiting for the deadline");
        }
    }
}

/// A fresh proxy's first calls.
mod starting {
    use super::*;

    on_h2_and_relay! {
        // With health checking, a local replica is on its way in from its connection's
        // opening until its first health answer: a fresh proxy's first call waits for it
        // (within the start-up grace) rather than taking the node-b replica that answered
        // first.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_fresh_proxy_waits_for_a_local_replica_whose_first_health_answer_comes_late() {
            let late = |name: &str| testkit::replica::Faults {
                answers_after: if name == "s1" { Duration::from_millis(150) } else { Duration::ZERO },
                ..testkit::replica::Faults::default()
            };
            let layout = [("s1", "node-a"), ("s3", "node-b")];
            let c = Cluster::start_with(PATH, &layout, &["--service-config", support::SANDBOX_CONFIG], late).await;
            let first = c.client().await.say_hello(hello()).await.expect("the first call").into_inner();
            assert_eq!(first.server, "s1", "the first call went to the other node");
        }
    }
}
