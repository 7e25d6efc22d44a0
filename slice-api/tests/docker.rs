//! The Docker follower against a small engine on a unix socket that answers the three
//! GETs slice-api makes (list, inspect, events) from containers the test changes: the
//! order of what reaches the slice is checked exactly, which a real engine cannot be
//! made to do on cue. (Against the real engine it was run by hand.)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use slice_api::docker::{self, Client, Source};
use slice_api::hub::{Event, Filter, Hub, Start};
use slice_api::replica::{Selection, ServicePort};
use slice_api::store::Store;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// Containers by id (their `docker inspect`), and the open event streams.
#[derive(Default)]
struct Engine {
    containers: BTreeMap<String, Value>,
    events: Vec<mpsc::UnboundedSender<Value>>,
}

struct FakeDocker {
    socket: PathBuf,
    engine: Arc<Mutex<Engine>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDocker {
    /// A socket path no engine listens on yet.
    fn path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("slice-api-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn start(socket: PathBuf) -> FakeDocker {
        let listener = UnixListener::bind(&socket).unwrap();
        let engine = Arc::new(Mutex::new(Engine::default()));
        let shared = engine.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let engine = shared.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let response = answer(&engine, req.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        FakeDocker { socket, engine, task }
    }

    /// Adds or replaces a container.
    fn put(&self, id: &str, hostname: &str, ip: &str, running: bool, health: &str) {
        let mut inspect = replica_inspect();
        inspect["Id"] = id.into();
        inspect["Config"]["Hostname"] = hostname.into();
        inspect["NetworkSettings"]["Networks"]["slicetest_cluster"]["IPAddress"] = ip.into();
        inspect["State"]["Running"] = running.into();
        inspect["State"]["Health"]["Status"] = health.into();
        self.engine.lock().unwrap().containers.insert(id.into(), inspect);
    }

    fn remove(&self, id: &str) {
        self.engine.lock().unwrap().containers.remove(id);
    }

    fn event(&self, id: &str, action: &str, signal: Option<&str>) {
        let mut attributes = json!({ "com.docker.compose.project": "slicetest" });
        if let Some(signal) = signal {
            attributes["signal"] = signal.into();
        }
        let event = json!({ "Type": "container", "Action": action, "Actor": { "ID": id, "Attributes": attributes } });
        self.engine.lock().unwrap().events.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Ends every open event stream, as a restarting engine would.
    fn end_events(&self) {
        self.engine.lock().unwrap().events.clear();
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn answer(engine: &Mutex<Engine>, path: &str) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let json = |v: &Value| hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    let mut engine = engine.lock().unwrap();
    if path == "/containers/json" {
        let running: Vec<Value> = engine
            .containers
            .iter()
            .filter(|(_, c)| c["State"]["Running"] == true)
            .map(|(id, _)| json!({ "Id": id }))
            .collect();
        return json(&Value::from(running));
    }
    if path == "/events" {
        let (tx, rx) = mpsc::unbounded_channel::<Value>();
        engine.events.push(tx);
        let lines = futures_util::stream::unfold(rx, |mut rx| async move {
            let event = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))), rx))
        });
        return hyper::Response::new(StreamBody::new(lines).boxed());
    }
    let id = path.strip_prefix("/containers/").and_then(|p| p.strip_suffix("/json")).unwrap_or_default();
    match engine.containers.get(id) {
        Some(inspect) => json(inspect),
        None => {
            let mut response = json(&json!({ "message": format!("No such container: {id}") }));
            *response.status_mut() = hyper::StatusCode::NOT_FOUND;
            response
        }
    }
}

/// The captured `docker inspect` of a compose replica.
fn replica_inspect() -> Value {
    let list: Value = serde_json::from_str(include_str!("data/inspect-replica.json")).unwrap();
    list[0].clone()
}

fn source() -> Source {
    Source {
        project: "slicetest".into(),
        selection: Selection { image: "lb-sandbox/server".into(), network: "slicetest_cluster".into() },
        service: "server".into(),
        namespace: "default".into(),
        port: ServicePort { name: "grpc".into(), port: 50051 },
    }
}

/// Each endpoint as `pod ip ready/serving/terminating`, e.g. `server1 172.19.0.3 R S -`.
fn endpoints(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Vec<String> {
    let flag = |b: Option<bool>, c: &str| if b == Some(true) { c.to_owned() } else { "-".to_owned() };
    slice
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            let pod = e.target_ref.as_ref().and_then(|r| r.name.clone()).unwrap_or_default();
            format!(
                "{pod} {} {}{}{}",
                e.addresses[0],
                flag(c.ready, "R"),
                flag(c.serving, "S"),
                flag(c.terminating, "T")
            )
        })
        .collect()
}

/// The next slice the watch sees, within a second.
async fn next_slice(live: &mut mpsc::Receiver<Event>) -> Vec<String> {
    match tokio::time::timeout(Duration::from_secs(1), live.recv()).await {
        Ok(Some(Event::Change(change))) => endpoints(&change.slice),
        other => panic!("expected a change, got {other:?}"),
    }
}

async fn synced(hub: &Hub, within: Duration) {
    tokio::time::timeout(within, async {
        while !hub.is_synced() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the follower never listed the containers");
}

#[tokio::test]
async fn sigterm_marks_terminating_before_death_removes_and_health_gates_ready() {
    let docker = FakeDocker::start(FakeDocker::path("sigterm"));
    docker.put("aaa", "server1", "172.19.0.3", true, "healthy");
    let hub = Arc::new(Hub::new(Store::new("default", 0, 100), 64));
    let follower = tokio::spawn(docker::follow(Client::new(&docker.socket), source(), hub.clone()));
    synced(&hub, Duration::from_secs(1)).await;
    let mut watch = hub.watch(Filter::default(), Start::Now, false);
    let live = watch.live.as_mut().unwrap();
    assert!(matches!(&watch.replay[..], [Event::Change(c)] if endpoints(&c.slice) == ["server1 172.19.0.3 RS-"]));

    // SIGTERM: the container still runs (and drains), the endpoint is terminating now.
    docker.event("aaa", "kill", Some("15"));
    assert_eq!(next_slice(live).await, ["server1 172.19.0.3 -ST"]);
    // A health report while draining keeps it terminating.
    docker.event("aaa", "health_status: healthy", None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(live.try_recv().is_err(), "no change");
    docker.put("aaa", "server1", "172.19.0.3", false, "unhealthy");
    docker.event("aaa", "die", None);
    assert_eq!(next_slice(live).await, Vec::<String>::new());

    // A new replica: not ready until healthy; other signals change nothing.
    docker.put("bbb", "server2", "172.19.0.4", true, "starting");
    docker.event("bbb", "start", None);
    assert_eq!(next_slice(live).await, ["server2 172.19.0.4 ---"]);
    docker.event("bbb", "kill", Some("10"));
    docker.put("bbb", "server2", "172.19.0.4", true, "healthy");
    docker.event("bbb", "health_status: healthy", None);
    assert_eq!(next_slice(live).await, ["server2 172.19.0.4 RS-"]);
    // Started again after a SIGTERM that it survived: no longer terminating.
    docker.event("bbb", "kill", Some("SIGTERM"));
    assert_eq!(next_slice(live).await, ["server2 172.19.0.4 -ST"]);
    docker.event("bbb", "start", None);
    assert_eq!(next_slice(live).await, ["server2 172.19.0.4 RS-"]);
    docker.remove("bbb");
    docker.event("bbb", "destroy", None);
    assert_eq!(next_slice(live).await, Vec::<String>::new());
    follower.abort();
}

/// No engine at start: an empty, unready store; once the engine answers, the full set
/// within about a second. When the event stream ends, the follower lists again.
#[tokio::test]
async fn retries_until_docker_answers_and_relists_after_the_stream_ends() {
    let socket = FakeDocker::path("late");
    let hub = Arc::new(Hub::new(Store::new("default", 0, 100), 64));
    let follower = tokio::spawn(docker::follow(Client::new(&socket), source(), hub.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!hub.is_synced());
    assert_eq!(hub.list(&Filter::default()).1, vec![]);

    let docker = FakeDocker::start(socket);
    docker.put("aaa", "server1", "172.19.0.3", true, "healthy");
    synced(&hub, Duration::from_secs(2)).await;
    let slices = hub.list(&Filter::default()).1;
    assert_eq!(endpoints(&slices[0]), ["server1 172.19.0.3 RS-"]);

    // Missed while the stream is down: found by the next list.
    docker.end_events();
    docker.put("bbb", "server2", "172.19.0.4", true, "healthy");
    tokio::time::timeout(Duration::from_secs(2), async {
        while endpoints(&hub.list(&Filter::default()).1[0]).len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no relist after the event stream ended");
    assert_eq!(endpoints(&hub.list(&Filter::default()).1[0]), ["server1 172.19.0.3 RS-", "server2 172.19.0.4 RS-"]);
    follower.abort();
}
