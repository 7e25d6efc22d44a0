//! kube-rs's own watcher and reflector against slice-api: the list, live changes,
//! resumed watches, 410 Gone and relists, exactly as the proxy's discovery will see them.

mod support;

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use slice_api::hub::Hub;
use slice_api::store::Store;
use support::{SERVER, slice};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The watcher's events, described, from a task that polls it as a consumer would.
struct Events(mpsc::UnboundedReceiver<String>, tokio::task::JoinHandle<()>);

impl Events {
    fn follow(stream: BoxStream<'static, watcher::Result<watcher::Event<EndpointSlice>>>) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = stream;
            while let Some(event) = stream.next().await {
                if tx.send(describe(&event)).is_err() {
                    return;
                }
            }
        });
        Events(rx, task)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.1.abort();
    }
}

fn watch(api: &support::Api, config: watcher::Config) -> Events {
    Events::follow(watcher(Api::<EndpointSlice>::namespaced(api.client(), "default"), config).boxed())
}

/// One watcher event in a line: kind, then `name@resourceVersion [addresses]`.
fn describe(event: &watcher::Result<watcher::Event<EndpointSlice>>) -> String {
    let slice = |s: &EndpointSlice| {
        let ips: Vec<&str> = s.endpoints.iter().flat_map(|e| e.addresses.iter().map(String::as_str)).collect();
        let name = s.metadata.name.as_deref().unwrap_or_default();
        format!("{name}@{} [{}]", s.metadata.resource_version.as_deref().unwrap_or_default(), ips.join(" "))
    };
    match event {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(s)) => format!("InitApply {}", slice(s)),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(s)) => format!("Apply {}", slice(s)),
        Ok(watcher::Event::Delete(s)) => format!("Delete {}", slice(s)),
        Err(watcher::Error::WatchError(status)) => format!("Error {} {}", status.code, status.message),
        Err(e) => format!("Failed {e}"),
    }
}

/// The next event, which must come within `within`.
async fn next(events: &mut Events, within: Duration) -> String {
    timeout(within, events.0.recv()).await.expect("no watcher event in time").expect("stream ended")
}

/// The next `n` events, each within two seconds.
async fn take(events: &mut Events, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(next(events, 2 * SECOND).await);
    }
    seen
}

/// Every event within `window`.
async fn collect(events: &mut Events, window: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.0.recv()).await {
        seen.push(event);
    }
    seen
}

/// Waits until the watcher's watch request is open on the server.
async fn watch_open(hub: &Hub) {
    timeout(Duration::from_secs(2), async {
        while hub.watch_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the watcher never opened a watch");
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn lists_then_applies_changes_within_a_second_and_deletes() {
    let api = support::Api::start(100, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    api.hub.put(slice("other", &["10.0.1.1"]));
    let mut events = watch(&api, watcher::Config::default().labels(SERVER));
    assert_eq!(next(&mut events, SECOND).await, "Init");
    assert_eq!(next(&mut events, SECOND).await, "InitApply server-sandbox@101 [10.0.0.1]");
    assert_eq!(next(&mut events, SECOND).await, "InitDone");
    watch_open(&api.hub).await;
    api.hub.put(slice("server", &["10.0.0.1", "10.0.0.2"]));
    api.hub.put(slice("other", &[]));
    assert_eq!(next(&mut events, SECOND).await, "Apply server-sandbox@103 [10.0.0.1 10.0.0.2]");
    api.hub.delete("server-sandbox");
    assert_eq!(next(&mut events, SECOND).await, "Delete server-sandbox@105 [10.0.0.1 10.0.0.2]");
    assert_eq!(collect(&mut events, Duration::from_millis(500)).await, Vec::<String>::new());
}

/// `timeoutSeconds=1`: the server ends each watch after a second and the watcher
/// resumes from the last version it saw; every change arrives once, in order.
#[tokio::test]
async fn a_watch_that_times_out_resumes_without_losing_or_duplicating() {
    let api = support::Api::start(0, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    let mut events = watch(&api, watcher::Config::default().labels(SERVER).timeout(1));
    assert_eq!(take(&mut events, 3).await, ["Init", "InitApply server-sandbox@1 [10.0.0.1]", "InitDone"]);
    let hub = api.hub.clone();
    let feeder = tokio::spawn(async move {
        for n in 2..=9 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            hub.put(slice("server", &[&format!("10.0.0.{n}")]));
        }
    });
    let seen = collect(&mut events, Duration::from_millis(3500)).await;
    feeder.await.unwrap();
    let expected: Vec<String> = (2..=9).map(|n| format!("Apply server-sandbox@{n} [10.0.0.{n}]")).collect();
    assert_eq!(seen, expected);
}

/// Changes to other services push the history past the watcher's version (bookmarks
/// off, so it cannot move on): its next watch gets 410 Gone and it lists again.
#[tokio::test]
async fn a_version_older_than_the_history_gets_410_and_a_relist_to_the_exact_set() {
    let api = support::Api::start(0, 3).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    let config = watcher::Config::default().labels(SERVER).timeout(1).disable_bookmarks();
    let (reader, writer) = reflector::store();
    let mut events = Events::follow(
        watcher(Api::<EndpointSlice>::namespaced(api.client(), "default"), config).reflect(writer).boxed(),
    );
    assert_eq!(take(&mut events, 3).await, ["Init", "InitApply server-sandbox@1 [10.0.0.1]", "InitDone"]);
    watch_open(&api.hub).await;
    api.hub.put(slice("server", &["10.0.0.2"]));
    assert_eq!(next(&mut events, SECOND).await, "Apply server-sandbox@2 [10.0.0.2]");
    for n in 1..=5 {
        api.hub.put(slice("other", &[&format!("10.0.1.{n}")]));
    }
    // Versions 3..=7 are the other service's; the history keeps 5..=7.
    assert_eq!(
        collect(&mut events, Duration::from_millis(2500)).await,
        ["Error 410 too old resource version: 2 (4)", "Init", "InitApply server-sandbox@2 [10.0.0.2]", "InitDone",]
    );
    let state: Vec<EndpointSlice> = reader.state().iter().map(|s| (**s).clone()).collect();
    let current: Vec<EndpointSlice> =
        api.hub.list(&slice_api::hub::Filter::default()).1.into_iter().filter(is_server).collect();
    assert_eq!(state, current);
}

fn is_server(s: &EndpointSlice) -> bool {
    s.metadata.name.as_deref() == Some("server-sandbox")
}

/// slice-api restarts (a new store, versions from a later start) while its endpoints
/// change: the watcher's next watch gets 410 and the relist brings exactly the new set.
#[tokio::test]
async fn after_a_restart_the_watcher_relists_and_holds_exactly_the_new_set() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = support::Api::serve(listener, std::sync::Arc::new(Hub::new(Store::new("default", 1000, 1000), 256)));
    first.hub.put(slice("server", &["10.0.0.1"]));
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(SERVER);
    let client = first.client();
    let mut events =
        Events::follow(watcher(Api::<EndpointSlice>::namespaced(client, "default"), config).reflect(writer).boxed());
    assert_eq!(take(&mut events, 3).await, ["Init", "InitApply server-sandbox@1001 [10.0.0.1]", "InitDone"]);
    watch_open(&first.hub).await;
    first.stop().await;

    let second = support::Api::serve(
        TcpListener::bind(addr).await.unwrap(),
        std::sync::Arc::new(Hub::new(Store::new("default", 5000, 1000), 256)),
    );
    second.hub.put(slice("server", &["10.0.0.2", "10.0.0.3"]));
    let seen: Vec<String> = collect(&mut events, Duration::from_millis(2500))
        .await
        .into_iter()
        .filter(|e| !e.starts_with("Failed")) // connection refused while down
        .collect();
    assert_eq!(
        seen,
        [
            "Error 410 too old resource version: 1001 (5000)",
            "Init",
            "InitApply server-sandbox@5001 [10.0.0.2 10.0.0.3]",
            "InitDone"
        ]
    );
    let state: Vec<EndpointSlice> = reader.state().iter().map(|s| (**s).clone()).collect();
    assert_eq!(state, second.hub.list(&slice_api::hub::Filter::default()).1);
}

/// `streaming_lists()` starts with `sendInitialEvents=true` instead of a list.
#[tokio::test]
async fn streaming_lists_get_initial_events_then_changes() {
    let api = support::Api::start(0, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    let mut events = watch(&api, watcher::Config::default().labels(SERVER).streaming_lists());
    assert_eq!(take(&mut events, 3).await, ["Init", "InitApply server-sandbox@1 [10.0.0.1]", "InitDone"]);
    api.hub.put(slice("server", &[]));
    assert_eq!(next(&mut events, SECOND).await, "Apply server-sandbox@2 []");
}

/// What the proxy will run: a reflector's store follows the slice.
#[tokio::test]
async fn a_reflector_follows_the_slice() {
    let api = support::Api::start(0, 1000).await;
    let (reader, writer) = reflector::store();
    let stream =
        watcher(Api::<EndpointSlice>::namespaced(api.client(), "default"), watcher::Config::default().labels(SERVER))
            .default_backoff()
            .reflect(writer)
            .applied_objects();
    let task = tokio::spawn(stream.try_for_each(|_| async { Ok(()) }));
    timeout(SECOND, reader.wait_until_ready()).await.unwrap().unwrap();
    assert!(reader.state().is_empty());
    api.hub.put(slice("server", &["10.0.0.1"]));
    let ips =
        || reader.state().iter().flat_map(|s| s.endpoints.iter().map(|e| e.addresses[0].clone())).collect::<Vec<_>>();
    timeout(SECOND, async {
        while ips() != ["10.0.0.1"] {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the reflector saw the slice within 1 s");
    task.abort();
}
