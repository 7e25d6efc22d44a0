//! What passes through the proxy unchanged: statuses, metadata, every streaming kind;
//! and what it survives: drains, garbage, vanishing clients, huge messages.

mod support;

use std::time::Duration;

use proto::HelloStreamRequest;
use support::{Cluster, hello};
use testkit::{
    echo::pb::{EchoMessage, echo_client::EchoClient},
    replica::Faults,
};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

const LAYOUT: &[(&str, &str)] = &[("s1", "node-a"), ("s2", "node-a"), ("s3", "node-b")];

/// Reads a stream to its end and returns the status it ended with.
async fn final_status(stream: &mut tonic::Streaming<proto::HelloResponse>) -> tonic::Status {
    loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => return status,
            None => panic!("stream ended without a status"),
        }
    }
}

fn msg(text: &str) -> EchoMessage {
    EchoMessage { text: text.into(), server: String::new() }
}

over_h2_and_h3! {
    relay;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_status_with_metadata_reaches_the_client_unchanged() {
        let not_found = |_: &str| Faults { fail_rate: 1.0, fail_code: tonic::Code::NotFound, ..Faults::default() };
        let c = Cluster::start_with(PROTOCOL, &[("s1", "node-a")], &[], not_found).await;
        let mut client = c.client().await;
        let err = loop {
            let err = client.say_hello(hello()).await.unwrap_err();
            if err.code() != tonic::Code::Unavailable {
                break err; // UNAVAILABLE only until the proxy has connected
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(err.message(), "injected fault from server s1");
        assert_eq!(err.metadata().get("x-injected-by").unwrap(), "s1");

        // A trailers-only response on the wire, byte for byte what the server sent.
        let h = support::raw_call(c.proxy, "/hello.HelloService/SayHello", &[], support::frame(b"")).await;
        assert_eq!(h["grpc-status"], "5");
        assert_eq!(h["grpc-message"], "injected%20fault%20from%20server%20s1", "percent-encoded as sent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_methods_get_the_servers_unimplemented() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1"]).await;
        let h = support::raw_call(c.proxy, "/hello.HelloService/Nope", &[], support::frame(b"")).await;
        assert_eq!(h["grpc-status"], "12", "{h:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_streaming_passes_through_in_order() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let req = HelloStreamRequest { name: "s".into(), count: 20, interval_ms: 1, resume_after: 5 };
        let mut stream = c.client().await.say_hello_stream(req).await.unwrap().into_inner();
        let mut seqs = Vec::new();
        while let Some(m) = stream.next().await {
            seqs.push(m.unwrap().seq);
        }
        assert_eq!(seqs, (6..=20).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_streaming_passes_through() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut echo = EchoClient::new(c.channel().await);
        let input = tokio_stream::iter(["a", "b", "c"].map(msg));
        let reply = echo.collect(input).await.unwrap().into_inner();
        assert_eq!(reply.text, "a,b,c");
        assert!(reply.server == "s1" || reply.server == "s2", "a local replica: {reply:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bidi_streaming_passes_through_message_by_message() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut echo = EchoClient::new(c.channel().await);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = echo.chat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        for text in ["one", "two", "three"] {
            tx.send(msg(text)).await.unwrap();
            // Each reply arrives before the next message is sent: nothing is buffered whole.
            assert_eq!(replies.next().await.unwrap().unwrap().text, text);
        }
        drop(tx);
        assert!(replies.next().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_graceful_drain_fails_no_call_in_flight_or_arriving() {
        let slow = |_: &str| Faults { delay: Duration::from_millis(300), ..Faults::default() };
        let mut c = Cluster::start_with(PROTOCOL, LAYOUT, &[], slow).await;
        c.wait_for(&["s1", "s2"]).await;
        let channel = c.channel().await;
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..60 {
            let mut client = proto::hello_service_client::HelloServiceClient::new(channel.clone());
            calls.spawn(async move {
                tokio::time::sleep(Duration::from_millis(i * 10)).await;
                client.say_hello(hello()).await.map(|r| r.into_inner().server)
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let draining = c.begin_stop("s1");
        let mut by_server = std::collections::BTreeMap::<String, usize>::new();
        while let Some(res) = calls.join_next().await {
            let server = res.unwrap().expect("a call failed during the drain");
            *by_server.entry(server).or_default() += 1;
        }
        draining.stop();
        assert!(by_server.get("s1").is_some_and(|n| *n > 0), "s1 finished its in-flight calls: {by_server:?}");
        assert!(by_server["s2"] > by_server["s1"], "later calls moved to s2: {by_server:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unbounded_stream_ends_with_unavailable_when_its_server_drains() {
        let mut c = Cluster::start(PROTOCOL, &[("s1", "node-a")], &[]).await;
        c.wait_for(&["s1"]).await;
        let req = HelloStreamRequest { name: "s".into(), count: 0, interval_ms: 5, resume_after: 0 };
        let mut stream = c.client().await.say_hello_stream(req).await.unwrap().into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().seq, 1);
        c.begin_stop("s1").stop();
        let status = final_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("resume_after="), "{status:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_and_vanishing_clients_do_not_hurt_the_proxy() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let garbage =
            [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0xff; 4096][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"];
        // On the proxy's port and on a replica's.
        for port in [c.proxy, c.addr_of("s1")] {
            for bytes in garbage {
                let mut tcp = tokio::net::TcpStream::connect(port).await.unwrap();
                let _ = tcp.write_all(bytes).await;
                drop(tcp);
            }
        }
        // A client that opens an endless stream and disappears.
        let req = HelloStreamRequest { name: "s".into(), count: 0, interval_ms: 1, resume_after: 0 };
        let mut stream = c.client().await.say_hello_stream(req).await.unwrap().into_inner();
        stream.next().await.unwrap().unwrap();
        drop(stream);
        let (counts, failures) = support::tally(&mut c.client().await, 20).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(counts.values().sum::<usize>(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_100_mb_message_is_refused_with_resource_exhausted() {
        let c = Cluster::start(PROTOCOL, LAYOUT, &[]).await;
        c.wait_for(&["s1", "s2"]).await;
        let mut client = c.client().await.max_encoding_message_size(usize::MAX);
        let huge = proto::HelloRequest { name: "x".repeat(100 << 20) };
        let err = client.say_hello(huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        let (_, failures) = support::tally(&mut client, 10).await;
        assert!(failures.is_empty(), "the proxy still serves: {failures:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unresolvable_target_keeps_the_proxy_up_and_not_serving() {
        let c = Cluster::start(PROTOCOL, &[], &["--connect-timeout", "500ms"]).await;
        let channel = c.channel().await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
        assert_eq!(
            status.unwrap().into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::NotServing
        );
        // Calls fail fast; until the first DNS answer they say the name is not
        // resolved yet, then that it has no addresses.
        let mut client = proto::hello_service_client::HelloServiceClient::new(channel);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let err = client.say_hello(hello()).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable);
            assert!(err.message().contains("server.test:50051"), "{}", err.message());
            if err.message().contains("no addresses") {
                break;
            }
            assert!(err.message().contains("not resolved yet"), "{}", err.message());
            assert!(tokio::time::Instant::now() < deadline, "still not resolved after 5 s: {}", err.message());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxys_health_watch_follows_its_replicas() {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
        let mut c = Cluster::start(PROTOCOL, &[("s1", "node-a")], &[]).await;
        c.wait_for(&["s1"]).await;
        let mut health = HealthClient::new(c.channel().await);
        let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        let mut next = async || {
            let status = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
            status.expect("a status within 10 s").expect("the watch goes on").unwrap().status()
        };
        assert_eq!(next().await, ServingStatus::Serving);
        c.kill("s1");
        assert_eq!(next().await, ServingStatus::NotServing, "its only replica died");
        c.restart("s1");
        assert_eq!(next().await, ServingStatus::Serving, "and came back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_whose_replica_dies_ends_with_unavailable_naming_it() {
        let mut c = Cluster::start(PROTOCOL, &[("s1", "node-a")], &[]).await;
        c.wait_for(&["s1"]).await;
        let req = HelloStreamRequest { name: "s".into(), count: 0, interval_ms: 5, resume_after: 0 };
        let mut stream = c.client().await.say_hello_stream(req).await.unwrap().into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().seq, 1);
        let addr = c.addr_of("s1");
        c.kill("s1");
        let status = final_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&addr.to_string()), "{status:?}");
    }
}

/// `--busy-poll` changes when the runtime sleeps, not what is forwarded: unary calls
/// and a stream pass through as without it, while the spin is on after each call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_through_with_busy_polling_on() {
    let c = Cluster::start(support::Protocol::H2, LAYOUT, &["--busy-poll", "500"]).await;
    c.wait_for(&["s1", "s2"]).await;
    let mut client = c.client().await;
    let (by_server, failures) = support::tally(&mut client, 200).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_server.values().sum::<usize>(), 200, "{by_server:?}");
    let req = HelloStreamRequest { name: "s".into(), count: 20, interval_ms: 1, resume_after: 0 };
    let mut stream = client.say_hello_stream(req).await.unwrap().into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = stream.next().await {
        seqs.push(m.unwrap().seq);
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}

/// `--coalesce` changes when the worker polls, not what is forwarded, on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_through_the_relay_with_coalescing_on() {
    calls_pass_through_with_coalescing_on(support::Path::RELAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_through_the_http2_stack_with_coalescing_on() {
    calls_pass_through_with_coalescing_on(support::Protocol::H2.into()).await;
}

/// 64 callers calling in a loop, until the worker has slept between polls (the metric
/// says so): every call gets its own answer meanwhile, and a stream passes through whole.
async fn calls_pass_through_with_coalescing_on(path: support::Path) {
    let c = Cluster::start(path, LAYOUT, &["--coalesce", "200"]).await;
    c.wait_for(&["s1", "s2"]).await;
    let client = c.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..64)
        .map(|i| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut calls = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("{i}-{calls}");
                    let reply = client.say_hello(proto::HelloRequest { name: name.clone() }).await;
                    let reply = reply.unwrap_or_else(|s| panic!("call {name}: {s:?}")).into_inner();
                    assert!(reply.message.contains(&name), "call {name} answered {reply:?}");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let sleeps = || async {
        let (_, metrics) = c.admin_get("/metrics").await;
        let line = metrics.lines().find_map(|l| l.strip_prefix("proxy_coalesce_sleeps_total "));
        line.unwrap_or_else(|| panic!("no proxy_coalesce_sleeps_total in {metrics}")).parse::<u64>().unwrap()
    };
    let slept = tokio::time::timeout(Duration::from_secs(20), async {
        while sleeps().await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for caller in callers {
        calls += caller.await.expect("every call answered as asked");
    }
    assert!(slept.is_ok(), "64 callers made {calls} calls in 20 s, and the worker never slept between polls");
    let req = HelloStreamRequest { name: "s".into(), count: 20, interval_ms: 1, resume_after: 0 };
    let mut stream = client.clone().say_hello_stream(req).await.unwrap().into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = stream.next().await {
        seqs.push(m.unwrap().seq);
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}
