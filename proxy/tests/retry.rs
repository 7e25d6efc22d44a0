//! Retries, hedging and throttling from a service config, against fault-injecting
//! replicas, through the real proxy.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use support::{Cluster, Path, config_file, hello, tally};
use testkit::{
    echo::pb::{EchoMessage, echo_client::EchoClient},
    replica::Faults,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;

const LOCALS: &[(&str, &str)] = &[("s1", "node-a"), ("s2", "node-a")];

fn retry_config(attempts: u32, backoff: &str, codes: &str) -> String {
    format!(
        r#"{{"methodConfig":[{{"name":[{{}}],"retryPolicy":{{"maxAttempts":{attempts},
        "initialBackoff":"{backoff}","maxBackoff":"{backoff}","backoffMultiplier":1,
        "retryableStatusCodes":[{codes}]}}}}]}}"#
    )
}

fn failing(name: &'static str, rate: f64, code: Code) -> impl Fn(&str) -> Faults {
    move |n: &str| {
        if n == name { Faults { fail_rate: rate, fail_code: code, ..Faults::default() } } else { Faults::default() }
    }
}

/// A cluster whose proxy retries UNAVAILABLE (4 attempts, 10 ms backoff).
async fn retrying(path: Path, layout: &[(&str, &str)], faults: impl Fn(&str) -> Faults) -> Cluster {
    let config = config_file(&retry_config(4, "0.01s", r#""UNAVAILABLE""#));
    Cluster::start_with(path, layout, &["--service-config", &config], faults).await
}

fn previous_attempts(md: &tonic::metadata::MetadataMap) -> u64 {
    md.get("grpc-previous-rpc-attempts").map_or(0, |v| v.to_str().unwrap().parse().unwrap())
}

fn hedging_config(delay: &str) -> String {
    format!(
        r#"{{"methodConfig":[{{"name":[{{}}],"hedgingPolicy":{{"maxAttempts":3,"hedgingDelay":"{delay}",
        "nonFatalStatusCodes":["UNAVAILABLE"]}}}}]}}"#
    )
}

// Through the h2 path and through the frame relay: both apply retryPolicy, hedgingPolicy,
// pushback and the throttle.
on_h2_and_relay! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hedging_beats_a_slow_replica_and_cancels_the_loser() {
        let config = config_file(
            r#"{"methodConfig":[{"name":[{"service":"echo.Echo"}],
                "hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.05s","nonFatalStatusCodes":["UNAVAILABLE"]}}]}"#,
        );
        let slow = support::late("s1", Duration::from_secs(1));
        let c = Cluster::start_with(PATH, LOCALS, &["--service-config", &config], slow).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut echo = EchoClient::new(c.channel().await);
        for _ in 0..6 {
            let started = Instant::now();
            let msgs = tokio_stream::iter([EchoMessage { text: "hi".into(), server: String::new() }]);
            let reply = echo.collect(msgs).await.unwrap().into_inner();
            assert_eq!(reply.server, "s2");
            assert!(started.elapsed() < Duration::from_millis(800), "not held up by s1: {:?}", started.elapsed());
        }
        let s1 = &c.replica("s1").echo;
        assert!(s1.calls() >= 3, "s1 got the first attempt of about half the calls: {}", s1.calls());
        // The resets reach s1 a moment after the winners' replies reach us.
        let until = Instant::now() + Duration::from_secs(2);
        while s1.cancelled() < s1.calls() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s1.cancelled(), s1.calls(), "every losing attempt on s1 was cancelled");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_non_fatal_status_fires_the_next_hedge_at_once_and_a_fatal_one_ends_the_call() {
        let config = config_file(&hedging_config("5s"));
        let c = Cluster::start_with(
            PATH,
            LOCALS,
            &["--service-config", &config],
            failing("s1", 1.0, Code::Unavailable),
        )
        .await;
        c.wait_for(&["s2"]).await;
        let mut client = c.client().await;
        for _ in 0..6 {
            let started = Instant::now();
            let r = client.say_hello(hello()).await.expect("the next hedge goes to s2");
            assert_eq!(r.get_ref().server, "s2");
            assert!(started.elapsed() < Duration::from_secs(2), "not after the 5 s hedging delay");
        }

        let fatal =
            Cluster::start_with(PATH, LOCALS, &["--service-config", &config], failing("s1", 1.0, Code::NotFound))
                .await;
        fatal.wait_for(&["s2"]).await;
        let mut client = fatal.client().await;
        // Calls alternate between s1 and s2 once both are connected; one starting on s1
        // must end with s1's NOT_FOUND instead of waiting for a hedge.
        let mut not_found = false;
        for _ in 0..100 {
            match client.say_hello(hello()).await {
                Err(s) if s.code() == Code::NotFound => {
                    not_found = true;
                    break;
                }
                Err(s) => panic!("only NOT_FOUND may fail a call: {s:?}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert!(not_found, "a call that started on s1 ended with its NOT_FOUND");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_reset_is_retried_when_the_status_it_reads_as_is_retryable() {
        // INTERNAL_ERROR reads as INTERNAL (PROTOCOL-HTTP2), which this policy retries.
        let config = config_file(&retry_config(4, "0.01s", r#""INTERNAL""#));
        let mut c = Cluster::start(PATH, &[("s1", "node-a")], &["--service-config", &config]).await;
        c.wait_for(&["s1"]).await;
        let resets = c.add_resetting("resets", "node-a", 0x2).await;
        let mut client = c.client().await;
        let until = Instant::now() + Duration::from_secs(5);
        let mut calls = 0;
        while resets.load(Ordering::Relaxed) < 5 || calls < 20 {
            assert!(Instant::now() < until, "the resetting replica got {resets:?} calls");
            let reply = client.say_hello(hello()).await.expect("a reset attempt is retried on s1");
            assert_eq!(reply.get_ref().server, "s1");
            calls += 1;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_deadline_bounds_every_attempt_and_backoff() {
        // Attempts of 100 ms, up to 10 ms apart, five allowed: the fourth is in flight at
        // 380 ms, even when a loaded machine stretches each attempt by 20 ms. (Were the
        // deadline to fall in a backoff, the proxy would return the last failure instead:
        // a retry it could not finish is not started.) The relay keeps the deadline on its
        // own clock and sends each attempt the time left.
        let config = config_file(&retry_config(5, "0.01s", r#""UNAVAILABLE""#));
        let slow_fail = |_: &str| Faults { fail_rate: 1.0, delay: Duration::from_millis(100), ..Faults::default() };
        let c = Cluster::start_with(PATH, LOCALS, &["--service-config", &config], slow_fail).await;
        c.wait_serving().await;
        let path = "/hello.HelloService/SayHello";
        let started = Instant::now();
        let h = support::raw_call(c.proxy, path, &[("grpc-timeout", "380m")], support::frame(b"")).await;
        let took = started.elapsed();
        assert_eq!(h["grpc-status"], "4", "the proxy answers DEADLINE_EXCEEDED itself: {h:?}");
        // Three or four attempts fit in 380 ms; the proxy's own answer says how many came before.
        let previous = h.get("grpc-previous-rpc-attempts").and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
        assert!(matches!(previous, Some(2 | 3)), "previous attempts on the proxy's own answer: {h:?}");
        let message = h["grpc-message"].to_str().unwrap();
        match PATH.relay {
            true => assert!(message.starts_with("deadline exceeded after"), "{h:?}"),
            false => {
                assert!(message.contains("(local):%20ready"), "says the replicas were ready, not connecting: {message}")
            }
        }
        assert!(took < Duration::from_millis(700), "5 attempts of 100 ms would take > 500 ms; took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_turn_a_30_percent_unavailable_replica_into_zero_failures() {
        let c = retrying(PATH, LOCALS, failing("s1", 0.3, Code::Unavailable)).await;
        c.wait_for(&["s1", "s2"]).await;
        let (counts, failures) = tally(&mut c.client().await, 300).await;
        assert!(failures.is_empty(), "{} calls failed: {:?}", failures.len(), failures.first());
        assert!(counts["s1"] > 50 && counts["s2"] > 150, "retries moved to s2: {counts:?}");

        // The same replicas without the policy: failures reach the caller.
        let plain = Cluster::start_with(PATH, LOCALS, &[], failing("s1", 0.3, Code::Unavailable)).await;
        plain.wait_for(&["s2"]).await;
        let (_, failures) = tally(&mut plain.client().await, 300).await;
        assert!(!failures.is_empty(), "without retries some of 150 calls at 30% must fail");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn codes_not_listed_are_not_retried() {
        let c = retrying(PATH, &[("s1", "node-a")], failing("s1", 1.0, Code::NotFound)).await;
        let mut client = c.client().await;
        let err = loop {
            let e = client.say_hello(hello()).await.unwrap_err();
            if e.code() != Code::Unavailable {
                break e; // UNAVAILABLE only until the proxy has connected
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(previous_attempts(err.metadata()), 0, "no retry: {err:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trailers_only_status_is_retried_and_reports_previous_attempts() {
        let c = retrying(PATH, LOCALS, failing("s1", 1.0, Code::Unavailable)).await;
        c.wait_for(&["s2"]).await;
        let mut client = c.client().await;
        // Until s1 is connected every call goes straight to s2; after, about half start on
        // s1 and come back retried.
        let mut retried = 0;
        for _ in 0..100 {
            let resp = client.say_hello(hello()).await.expect("every call lands on s2 in the end");
            assert_eq!(resp.get_ref().server, "s2");
            retried += previous_attempts(resp.metadata());
            if retried >= 8 {
                break;
            }
        }
        assert!(retried >= 8, "calls that tried s1 first came back retried: {retried}");
    }

    // gRFC A6: response headers commit the call. A client that waits for them before it
    // writes (tonic, grpc-go's Header(), grpcio's initial_metadata()) gets them under a
    // retry policy too, and a status in trailers after them is the call's, not retried.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headers_commit_a_retried_call_and_a_later_status_reaches_the_caller() {
        let config = config_file(&retry_config(3, "0.01s", r#""UNAVAILABLE""#));
        let c = Cluster::start(PATH, LOCALS, &["--service-config", &config]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut echo = EchoClient::new(c.channel().await);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..4 {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            // Nothing written yet: the headers must come anyway.
            let resp =
                tokio::time::timeout(Duration::from_secs(2), echo.chat(tokio_stream::wrappers::ReceiverStream::new(rx)))
                    .await
                    .expect("response headers before the first message")
                    .unwrap();
            assert_eq!(previous_attempts(resp.metadata()), 0);
            let mut replies = resp.into_inner();
            tx.send(EchoMessage { text: "fail:s1".into(), server: String::new() }).await.unwrap();
            match replies.next().await.unwrap() {
                Ok(m) => {
                    assert_eq!(m.server, "s2", "only s1 fails");
                    *seen.entry("s2").or_insert(0) += 1;
                }
                Err(status) => {
                    assert_eq!((status.code(), status.message()), (Code::Unavailable, "s1 fails fail:s1"), "not retried");
                    *seen.entry("s1").or_insert(0) += 1;
                }
            }
        }
        assert_eq!(seen, [("s1", 2), ("s2", 2)].into(), "round-robin over both, s1's failures reach the caller");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_stream_is_not_retried() {
        let mut c = retrying(PATH, LOCALS, |_| Faults::default()).await;
        c.wait_for(&["s1", "s2"]).await;
        let req = proto::HelloStreamRequest { name: "s".into(), count: 0, interval_ms: 5, resume_after: 0 };
        let mut stream = c.client().await.say_hello_stream(req).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        let _draining = c.begin_stop(&first.server.clone());
        let mut last = first.seq;
        let status = loop {
            match stream.next().await.expect("ends with a status") {
                Ok(m) => {
                    assert_eq!(m.seq, last + 1, "no replay from the start on another replica");
                    last = m.seq;
                }
                Err(s) => break s,
            }
        };
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_pushback_sets_the_delay_and_a_negative_one_stops_retries() {
        let config = config_file(&retry_config(3, "0.01s", r#""UNAVAILABLE""#));
        let pushback = |ms: i64| move |_: &str| Faults { fail_rate: 1.0, fail_pushback_ms: Some(ms), ..Faults::default() };
        let c = Cluster::start_with(PATH, &[("s1", "node-a")], &["--service-config", &config], pushback(300)).await;
        let mut client = c.client().await;
        c.wait_serving().await;
        let started = Instant::now();
        let err = client.say_hello(hello()).await.unwrap_err();
        assert_eq!(previous_attempts(err.metadata()), 2, "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(600), "two pushbacks of 300 ms: {:?}", started.elapsed());

        let c = Cluster::start_with(PATH, &[("s1", "node-a")], &["--service-config", &config], pushback(-1)).await;
        let mut client = c.client().await;
        c.wait_serving().await;
        let err = client.say_hello(hello()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(previous_attempts(err.metadata()), 0, "negative pushback: no retry");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_over_the_replay_buffer_is_committed_and_not_retried() {
        let config = config_file(&retry_config(4, "0.01s", r#""UNAVAILABLE""#));
        let args = ["--service-config", config.as_str(), "--replay-buffer", "64"];
        let c = Cluster::start_with(PATH, LOCALS, &args, failing("s1", 1.0, Code::Unavailable)).await;
        c.wait_for(&["s2"]).await;
        let mut client = c.client().await;
        // Small requests are retried onto s2; once one was, s1 is in the rotation too.
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let resp = client.say_hello(hello()).await.expect("small requests are retried onto s2");
            assert_eq!(resp.get_ref().server, "s2");
            if previous_attempts(resp.metadata()) > 0 {
                break;
            }
            assert!(Instant::now() < until, "s1 never tried");
        }
        // Round-robin alternates the first attempt between s1 and s2: the big requests that
        // start on s1 fail there, unretried; those on s2 succeed.
        let (mut failed, mut answered) = (0, 0);
        for _ in 0..10 {
            match client.say_hello(proto::HelloRequest { name: "x".repeat(1000) }).await {
                Ok(_) => answered += 1,
                Err(e) => {
                    assert_eq!((e.code(), previous_attempts(e.metadata())), (Code::Unavailable, 0), "{e:?}");
                    failed += 1;
                }
            }
        }
        assert_eq!((failed, answered), (5, 5), "a request over the buffer is never sent again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_100_kib_request_is_kept_for_its_retry_within_the_shared_total() {
        let config = config_file(&retry_config(4, "0.01s", r#""UNAVAILABLE""#));
        let big = || proto::HelloRequest { name: "x".repeat(100 << 10) };
        for (total, retried) in [("16777216", true), ("50000", false)] {
            let args = ["--service-config", config.as_str(), "--replay-buffer-total", total];
            let c = Cluster::start_with(PATH, LOCALS, &args, failing("s1", 1.0, Code::Unavailable)).await;
            c.wait_for(&["s2"]).await;
            let mut client = c.client().await;
            // Until s1 has been tried once it may not be in the rotation yet.
            let mut tried = async || previous_attempts(client.say_hello(hello()).await.unwrap().metadata()) > 0;
            let mut calls = 0;
            while !tried().await {
                calls += 1;
                assert!(calls < 100, "s1 never tried");
            }
            let (mut failed, mut answered) = (0, 0);
            for _ in 0..10 {
                match client.say_hello(big()).await {
                    Ok(resp) => {
                        assert_eq!(resp.get_ref().server, "s2");
                        answered += 1;
                    }
                    Err(e) => {
                        assert_eq!((e.code(), previous_attempts(e.metadata())), (Code::Unavailable, 0), "{e:?}");
                        failed += 1;
                    }
                }
            }
            match retried {
                true => assert_eq!((failed, answered), (0, 10), "every big request that failed on s1 was retried"),
                false => assert_eq!((failed, answered), (5, 5), "past the shared total: sent once"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throttling_stops_a_retry_storm_when_every_replica_fails() {
        let storm = retry_config(5, "0.001s", r#""UNAVAILABLE""#);
        let throttled = storm.replace(r#"]}"#, r#"], "retryThrottling":{"maxTokens":10,"tokenRatio":0.1}}"#);
        let all_fail = |_: &str| Faults { fail_rate: 1.0, ..Faults::default() };
        let mut retries = Vec::new();
        for json in [storm, throttled] {
            let config = config_file(&json);
            let c = Cluster::start_with(PATH, LOCALS, &["--service-config", &config], all_fail).await;
            c.wait_serving().await;
            let mut client = c.client().await;
            let mut n = 0;
            for _ in 0..50 {
                n += previous_attempts(client.say_hello(hello()).await.unwrap_err().metadata());
            }
            retries.push(n);
        }
        assert_eq!(retries[0], 200, "without a throttle: 4 retries for each of 50 calls");
        // The first call fails 5 times (10 -> 5 tokens): 4 retries while more than half was
        // left; after that the bucket never allows one.
        assert_eq!(retries[1], 4, "the bucket stops retries at half its 10 tokens");
    }
}
