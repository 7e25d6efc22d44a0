//! The admin API of the real proxy: `/admin/endpoints` and `/metrics` after known
//! traffic, and each endpoint's state through a kill and a restart.

mod support;

use std::time::Duration;

use balancer::Protocol;
use serde_json::Value;
use support::{Cluster, config_file, tally};
use tokio::time::Instant;

const LAYOUT: &[(&str, &str)] = &[("s1", "node-a"), ("s2", "node-a"), ("s3", "node-b")];

async fn endpoints(c: &Cluster) -> Value {
    let (status, body) = c.admin_get("/admin/endpoints").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// The endpoint object of replica `name`.
fn endpoint<'a>(v: &'a Value, c: &Cluster, name: &str) -> &'a Value {
    let addr = c.addr_of(name).to_string();
    v["endpoints"].as_array().unwrap().iter().find(|e| e["address"] == addr.as_str()).expect("listed")
}

fn calls(v: &Value, c: &Cluster, name: &str) -> u64 {
    endpoint(v, c, name)["calls"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_follow_a_kill_and_a_restart() {
    let mut c = Cluster::start(Protocol::H2, LAYOUT, &[]).await;
    c.wait_for(&["s1", "s2"]).await;
    let state_of = |v: &Value, c: &Cluster| endpoint(v, c, "s1")["state"].as_str().unwrap().to_owned();
    c.kill("s1");
    let until = Instant::now() + Duration::from_secs(5);
    let gone = loop {
        let v = endpoints(&c).await;
        if state_of(&v, &c) != "ready" {
            break v;
        }
        assert!(Instant::now() < until, "s1 still ready after its kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let e = endpoint(&gone, &c, "s1");
    assert!(matches!(e["state"].as_str(), Some("failed" | "connecting")), "{e}");
    assert!(e["last_error"].as_str().is_some_and(|s| !s.is_empty()), "says why: {e}");

    c.restart("s1");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let v = endpoints(&c).await;
        if state_of(&v, &c) == "ready" {
            assert!(endpoint(&v, &c, "s1")["last_error"].is_null());
            break;
        }
        assert!(Instant::now() < until, "s1 not ready again after its restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads `/admin/events` from its greeting on: each call returns the next event's data.
async fn event_stream(c: &Cluster) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = Value> + Send>> + use<> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut tcp = tokio::net::TcpStream::connect(c.admin()).await.unwrap();
    tcp.write_all(b"GET /admin/events HTTP/1.1\r\nHost: admin\r\n\r\n").await.unwrap();
    let mut lines = BufReader::new(tcp).lines();
    while !lines.next_line().await.unwrap().unwrap().starts_with(": events") {}
    let lines = std::sync::Arc::new(tokio::sync::Mutex::new(lines));
    move || {
        let lines = lines.clone();
        Box::pin(async move {
            let mut lines = lines.lock().await;
            loop {
                let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                    .await
                    .expect("an event within 10 s")
                    .unwrap()
                    .unwrap();
                if let Some(data) = line.strip_prefix("data: ") {
                    return serde_json::from_str(data).unwrap();
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_reads_unhealthy_then_draining_then_gone() {
    let mut c = Cluster::start(Protocol::H2, LAYOUT, &["--service-config", support::SANDBOX_CONFIG]).await;
    c.wait_for(&["s1", "s2"]).await;
    let mut next = event_stream(&c).await;
    let s2 = c.addr_of("s2").to_string();
    let _draining = c.begin_stop("s2");
    // The replica says NOT_SERVING, then sends GOAWAY, then stops listening.
    let mut states = Vec::new();
    while states.last().is_none_or(|d: &String| !d.starts_with("draining -> ")) {
        let e = next().await;
        if e["kind"] == "state" && e["endpoint"] == s2.as_str() {
            states.push(e["detail"].as_str().unwrap().to_owned());
        }
        if e["kind"] == "goaway" {
            assert_eq!(e["endpoint"], s2.as_str(), "{e}");
        }
    }
    let prefixes: Vec<_> = states.iter().map(|d| d.split(':').next().unwrap()).collect();
    assert_eq!(prefixes, ["ready -> unhealthy", "unhealthy -> draining", prefixes[2]], "{states:?}");
    let v = endpoints(&c).await;
    let e = endpoint(&v, &c, "s2");
    assert!(matches!(e["state"].as_str(), Some("failed" | "connecting")), "{e}");
    assert_eq!(endpoint(&v, &c, "s1")["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_the_retry_throttle_engaging_and_releasing() {
    let config = config_file(
        r#"{"methodConfig": [{"name": [{"service": "hello.HelloService"}],
            "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
                            "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}],
            "retryThrottling": {"maxTokens": 4, "tokenRatio": 1}}"#,
    );
    let c = Cluster::start(Protocol::H2, &[("s1", "node-a")], &["--service-config", &config]).await;
    c.wait_for(&["s1"]).await;
    let mut next = event_stream(&c).await;
    c.replica("s1").set_sick(true);
    let mut client = c.client().await;
    // Each call fails twice (a token each) until the bucket is at half: 4 -> 2.
    let _ = tally(&mut client, 2).await;
    let e = loop {
        let e = next().await;
        if e["kind"] == "throttle" {
            break e;
        }
    };
    assert!(e["detail"].as_str().unwrap().starts_with("engaged: 2 tokens"), "{e}");
    // The second call failed once more (1 token left); each success earns one back.
    c.replica("s1").set_sick(false);
    let (_, failures) = tally(&mut client, 2).await;
    assert!(failures.is_empty());
    let e = next().await;
    assert_eq!(e["kind"], "throttle");
    assert!(e["detail"].as_str().unwrap().starts_with("released: 3 tokens"), "{e}");
}

/// Retries on UNAVAILABLE, and the throttle, so a sick replica's calls are retried.
const RETRY: &str = r#"{
  "methodConfig": [{
    "name": [{"service": "hello.HelloService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
  }],
  "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1}
}"#;

/// The change in `series` between two scrapes.
fn delta(before: &str, after: &str, series: &str) -> u64 {
    value(after, series) - value(before, series)
}

// Through the h2 path and the frame relay: both count a call once, at its end, with its
// attempts, retries and hedges, and each attempt against its endpoint.
on_h2_and_relay! {
    // Both wait for the local replicas at start-up: the first calls go to neither node-b
    // replica, which the last ten seconds' rate of s3 would show.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_and_metrics_count_exactly_what_each_replica_took() {
        let c = Cluster::start(PATH, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let before = endpoints(&c).await;
        let metrics_before = c.admin_get("/metrics").await.1;
        let (counts, failures) = tally(&mut c.client().await, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        let after = endpoints(&c).await;

        assert_eq!(after["target"], "server.test:50051");
        assert!(after["resolved_at"].as_str().is_some_and(|t| t.ends_with('Z')));
        for (name, locality, took) in [("s1", "local", 10), ("s2", "local", 10), ("s3", "remote", 0)] {
            let e = endpoint(&after, &c, name);
            assert_eq!(counts.get(name).copied().unwrap_or(0), took);
            assert_eq!(calls(&after, &c, name) - calls(&before, &c, name), took as u64, "{name}: {e}");
            assert_eq!((e["state"].as_str(), e["locality"].as_str()), (Some("ready"), Some(locality)), "{e}");
            assert_eq!(
                (e["protocol"].as_str(), e["failures"].as_u64(), e["in_flight"].as_u64()),
                (Some("h2"), Some(0), Some(0))
            );
            // The last ten seconds: every call of this test, and those of the wait before it.
            let rps = e["rps"].as_f64().unwrap();
            if took > 0 {
                assert!(rps >= 1.0 && e["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{e}");
                assert!(e["p99_ms"].as_f64() >= e["p50_ms"].as_f64(), "{e}");
            } else {
                assert_eq!((rps, e["p50_ms"].as_f64()), (0.0, None), "{e}");
            }
        }

        let (status, metrics) = c.admin_get("/metrics").await;
        assert_eq!(status, 200);
        let hello = "grpc_client_attempt_started_total{grpc_method=\"hello.HelloService/SayHello\",grpc_target=\"server.test:50051\"}";
        assert_eq!(value(&metrics, hello) - value(&metrics_before, hello), 20, "{metrics}");
        let s1 = c.addr_of("s1");
        let line = format!(
            "lb_endpoint_attempts_total{{grpc_target=\"server.test:50051\",endpoint=\"{s1}\",grpc_lb_locality=\"local\",outcome=\"ok\"}} {}",
            calls(&after, &c, "s1")
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
        let ready = format!(
            "lb_endpoint_state{{grpc_target=\"server.test:50051\",endpoint=\"{s1}\",grpc_lb_locality=\"local\",state=\"ready\"}} 1"
        );
        assert!(metrics.contains(&ready), "{metrics}");
        assert!(
            metrics.contains(
                "grpc_subchannel_open_connections{grpc_target=\"server.test:50051\",grpc_lb_locality=\"local\"} 2"
            )
        );

        assert_eq!(c.admin_get("/nope").await.0, 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forty_thousand_random_method_names_add_no_series() {
        use futures_util::StreamExt;
        use http_body_util::{BodyExt, Full};

        let c = Cluster::start(PATH, &[("s1", "node-a")], &[]).await;
        c.wait_for(&["s1"]).await;
        let tcp = tokio::net::TcpStream::connect(c.proxy).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let call = |n: u32| {
            let mut send = send.clone();
            async move {
                let req = http::Request::post(format!("http://svc/random{n}.S/M{n}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(support::frame(b"")))
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                let status = resp.headers().get("grpc-status").cloned();
                let _ = resp.into_body().collect().await;
                status
            }
        };
        call(0).await; // the `other` row exists from here on
        let other = "grpc_client_attempt_started_total{grpc_method=\"other\",grpc_target=\"server.test:50051\"}";
        let before = c.admin_get("/metrics").await.1;

        let statuses: Vec<_> = futures_util::stream::iter(1..=40_000).map(call).buffer_unordered(64).collect().await;
        assert!(statuses.iter().all(|s| s.as_ref().is_some_and(|s| s == "12")), "every call UNIMPLEMENTED");

        let after = c.admin_get("/metrics").await.1;
        assert_eq!(series(&before), series(&after), "no new series");
        assert_eq!(value(&after, other) - value(&before, other), 40_000);
        let hello = "grpc_client_attempt_started_total{grpc_method=\"hello.HelloService/SayHello\",grpc_target=\"server.test:50051\"}";
        assert!(value(&after, hello) > 0, "a method that succeeded has its own row:\n{after}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_metrics_count_calls_and_attempts_per_method_status_and_endpoint() {
        let config = config_file(RETRY);
        let mut c = Cluster::start(PATH, LAYOUT, &["--service-config", &config]).await;
        c.wait_for(&["s1", "s2"]).await;
        let (s1, s2) = (c.addr_of("s1"), c.addr_of("s2"));
        let t = "grpc_target=\"server.test:50051\"";
        let m = "grpc_method=\"hello.HelloService/SayHello\"";
        let attempts = |status: &str, ep: std::net::SocketAddr| {
            format!(
                "grpc_client_attempt_duration_seconds_count{{{m},{t},grpc_status=\"{status}\",endpoint=\"{ep}\",grpc_lb_locality=\"local\"}}"
            )
        };
        let calls = |status: &str| format!("grpc_client_call_duration_seconds_count{{{m},{t},grpc_status=\"{status}\"}}");
        let started = format!("grpc_client_attempt_started_total{{{m},{t}}}");
        let retried = format!("grpc_client_call_retries_count{{{m},{t}}}");
        let once = format!("grpc_client_call_retries_bucket{{{m},{t},le=\"1\"}}");

        // 20 calls to two healthy replicas: 10 each, every one OK at the first attempt.
        let m0 = c.admin_get("/metrics").await.1;
        let (_, failures) = tally(&mut c.client().await, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        let m1 = c.admin_get("/metrics").await.1;
        assert_eq!(delta(&m0, &m1, &attempts("OK", s1)), 10, "{m1}");
        assert_eq!(delta(&m0, &m1, &attempts("OK", s2)), 10);
        assert_eq!((delta(&m0, &m1, &calls("OK")), delta(&m0, &m1, &started)), (20, 20));
        assert_eq!(delta(&m0, &m1, &retried), 0, "no call retried");

        // s1 answers UNAVAILABLE: each call placed there first is retried once, on s2.
        c.replica("s1").set_sick(true);
        let (_, failures) = tally(&mut c.client().await, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        let m2 = c.admin_get("/metrics").await.1;
        let failed_on_s1 = delta(&m1, &m2, &attempts("UNAVAILABLE", s1));
        assert!(failed_on_s1 > 0, "{m2}");
        assert_eq!(delta(&m1, &m2, &attempts("OK", s1)), 0);
        assert_eq!(delta(&m1, &m2, &attempts("OK", s2)), 20);
        assert_eq!(delta(&m1, &m2, &calls("OK")), 20);
        assert_eq!(delta(&m1, &m2, &calls("UNAVAILABLE")), 0);
        assert_eq!(delta(&m1, &m2, &started), 20 + failed_on_s1);
        assert_eq!((delta(&m1, &m2, &retried), delta(&m1, &m2, &once)), (failed_on_s1, failed_on_s1));
        assert!(m2.contains(&format!("lb_retry_throttle_tokens{{{t}}} ")), "{m2}");

        // A method no call has succeeded on counts as `other`.
        let headers = support::raw_call(c.proxy, "/nope.S/M", &[], support::frame(b"")).await;
        assert_eq!(headers["grpc-status"], "12");
        let m3 = c.admin_get("/metrics").await.1;
        let other =
            format!("grpc_client_call_duration_seconds_count{{grpc_method=\"other\",{t},grpc_status=\"UNIMPLEMENTED\"}}");
        assert_eq!(delta(&m2, &m3, &other), 1, "{m3}");

        // Connections: three made; s3's lost when it is killed.
        assert!(value(&m3, &format!("grpc_subchannel_connection_attempts_succeeded_total{{{t}}}")) >= 3);
        c.kill("s3");
        let until = Instant::now() + Duration::from_secs(10);
        let lost = format!("grpc_subchannel_disconnections_total{{{t},grpc_lb_locality=\"remote\",");
        let m4 = loop {
            let m4 = c.admin_get("/metrics").await.1;
            if m4.contains(&lost) {
                break m4;
            }
            assert!(Instant::now() < until, "no disconnection counted:\n{m4}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        promtool_accepts(&m4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedged_call_is_counted_once_with_its_hedges_and_no_cancelled_call() {
        let config = config_file(
            r#"{"methodConfig":[{"name":[{"service":"hello.HelloService"}],
                "hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.05s","nonFatalStatusCodes":["UNAVAILABLE"]}}]}"#,
        );
        let slow = support::late("s1", Duration::from_secs(1));
        let c = Cluster::start_with(PATH, &[("s1", "node-a"), ("s2", "node-a")], &["--service-config", &config], slow).await;
        c.wait_for(&["s2"]).await;
        let t = "grpc_target=\"server.test:50051\"";
        let m = "grpc_method=\"hello.HelloService/SayHello\"";
        let calls = |status: &str| format!("grpc_client_call_duration_seconds_count{{{m},{t},grpc_status=\"{status}\"}}");
        let hedged = format!("grpc_client_call_hedges_count{{{m},{t}}}");
        let started = format!("grpc_client_attempt_started_total{{{m},{t}}}");
        let m0 = c.admin_get("/metrics").await.1;
        let (counts, failures) = tally(&mut c.client().await, 6).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.get("s2"), Some(&6), "s2 answers every call, first or hedged: {counts:?}");
        let m1 = c.admin_get("/metrics").await.1;
        assert_eq!(delta(&m0, &m1, &calls("OK")), 6, "{m1}");
        assert_eq!(value(&m1, &calls("CANCELLED")), 0, "a losing attempt is no call: {m1}");
        let hedges = delta(&m0, &m1, &hedged);
        assert!(hedges >= 1, "the calls placed on s1 first were hedged: {m1}");
        assert_eq!(delta(&m0, &m1, &started), 6 + hedges, "each call's attempts, the hedges included");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_finds_no_replica_is_counted() {
        let config = config_file(r#"{"methodConfig":[{"name":[{"service":"hello.HelloService"}],"waitForReady":false}]}"#);
        let c = Cluster::start(PATH, &[], &["--service-config", &config]).await;
        let t = "grpc_target=\"server.test:50051\"";
        let unavailable = format!("grpc_client_call_duration_seconds_count{{grpc_method=\"other\",{t},grpc_status=\"UNAVAILABLE\"}}");
        let err = c.client().await.say_hello(support::hello()).await.expect_err("no replica");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let m = c.admin_get("/metrics").await.1;
        assert_eq!(value(&m, &unavailable), 1, "{m}");
    }
}

/// `promtool check metrics` (Debian's `prometheus` package) finds nothing to say.
fn promtool_accepts(metrics: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = child.expect("promtool runs (apt-get install prometheus)");
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{metrics}");
}

/// The series names (everything before the value) of a scrape.
fn series(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(name, _)| name.to_owned()))
        .collect()
}

fn value(metrics: &str, series: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_a_failover_and_the_failback() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let mut c = Cluster::start(Protocol::H2, LAYOUT, &[]).await;
    c.wait_for(&["s1", "s2"]).await;
    let mut tcp = tokio::net::TcpStream::connect(c.admin()).await.unwrap();
    tcp.write_all(b"GET /admin/events HTTP/1.1\r\nHost: admin\r\n\r\n").await.unwrap();
    let mut lines = BufReader::new(tcp).lines();
    // Until the stream's greeting: the events from here on reach us.
    while !lines.next_line().await.unwrap().unwrap().starts_with(": events") {}
    let mut next_event = async || -> Value {
        loop {
            let line =
                tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str(data).unwrap();
            }
        }
    };

    c.kill("s1");
    c.kill("s2");
    let mut seen = Vec::new();
    loop {
        let e = next_event().await;
        seen.push(e.clone());
        if e["kind"] == "failover" {
            break;
        }
    }
    let s1 = c.addr_of("s1").to_string();
    assert!(
        seen.iter().any(|e| e["kind"] == "state"
            && e["endpoint"] == s1.as_str()
            && e["detail"].as_str().is_some_and(|d| d.starts_with("ready -> "))),
        "s1 left ready before the failover: {seen:?}"
    );

    c.restart("s1");
    loop {
        let e = next_event().await;
        if e["kind"] == "failback" {
            assert!(e["at"].as_str().is_some_and(|t| t.ends_with('Z')));
            break;
        }
    }
}
