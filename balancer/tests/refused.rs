//! A replica that refuses a stream (REFUSED_STREAM, as a server above its
//! MAX_CONCURRENT_STREAMS does) has not processed it: the call is sent again, and the
//! replica stays in rotation.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use balancer::{Balancer, Settings};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use testkit::Subnet;
use tokio::net::TcpListener;

/// An HTTP/2 server that refuses every `refuse_every`-th stream and answers the others
/// with a trailers-only OK. Counts the streams it answered.
async fn refusing_server(listener: TcpListener, refuse_every: usize, answered: Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let (seen, answered) = (seen.clone(), answered.clone());
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                if seen.fetch_add(1, Ordering::SeqCst) % refuse_every == 0 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                answered.fetch_add(1, Ordering::SeqCst);
                let resp = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(())
                    .unwrap();
                let _ = respond.send_response(resp, true);
            }
        });
    }
}

fn call() -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri("/hello.HelloService/SayHello")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_and_its_replica_stays_in_rotation() {
    let addr = Subnet::random().addr(1);
    let listener = TcpListener::bind(addr).await.unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    tokio::spawn(refusing_server(listener, 3, answered.clone()));
    let b: Balancer<Full<Bytes>> = Balancer::new(Settings::new(addr.to_string().parse().unwrap())).unwrap();
    let mut ready = b.ready_endpoints();
    ready.wait_for(|n| *n == 1).await.unwrap();
    for n in 1..=30 {
        let resp = b.send(call()).await.unwrap_or_else(|e| panic!("call {n}: {e:?}"));
        assert_eq!(resp.headers()["grpc-status"], "0", "call {n}: the replica's answer");
        assert_eq!(*ready.borrow(), 1, "call {n}: the replica stays ready after a refusal");
    }
    assert_eq!(answered.load(Ordering::SeqCst), 30, "every call answered once, refused ones resent");
    let counters = &b.counters().snapshot()["/hello.HelloService/SayHello"];
    assert_eq!((counters.calls, counters.attempts, counters.replays), (30, 30, 15));
}
