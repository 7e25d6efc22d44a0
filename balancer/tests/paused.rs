//! The call driver's timers under paused time, with no endpoint to reach: the proxy's
//! own answers arrive at exactly the moment the rules say.

use std::time::Duration;

use balancer::{Balancer, Settings, retry::ServiceConfig};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::time::Instant;
use tonic::Code;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A balancer whose target never resolves: its DNS server does not answer.
fn balancer(config: &str) -> Balancer<Full<Bytes>> {
    let mut s = Settings::new("nothing.test:50051".parse().unwrap());
    s.dns_server = Some("127.0.0.1:9".parse().unwrap());
    s.connect_timeout = CONNECT_TIMEOUT;
    s.service_config = ServiceConfig::parse(config, 5).unwrap();
    Balancer::new(s).unwrap()
}

fn call(timeout: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method("POST").uri("/hello.HelloService/SayHello");
    if let Some(t) = timeout {
        req = req.header("grpc-timeout", t);
    }
    req.header("content-type", "application/grpc").body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))).unwrap()
}

#[tokio::test(start_paused = true)]
async fn waiting_for_an_endpoint_ends_exactly_at_the_deadline() {
    let b = balancer("{}");
    let started = Instant::now();
    let err = b.send(call(Some("300m"))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert!(err.message().contains("nothing.test:50051"), "{}", err.message());
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_wait_ends_at_the_connect_timeout() {
    let b = balancer("{}");
    let started = Instant::now();
    let err = b.send(call(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(started.elapsed(), CONNECT_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_method_timeout_shorter_than_the_callers_wins() {
    let b = balancer(r#"{"methodConfig":[{"name":[{}],"timeout":"0.05s"}]}"#);
    let started = Instant::now();
    let err = b.send(call(Some("10S"))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn a_fail_fast_call_is_unavailable_at_once() {
    let b = balancer(r#"{"methodConfig":[{"name":[{}],"waitForReady":false}]}"#);
    let started = Instant::now();
    let err = b.send(call(Some("10S"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "not DEADLINE_EXCEEDED: {err:?}");
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(err.message().contains("fail-fast"), "{}", err.message());
}
