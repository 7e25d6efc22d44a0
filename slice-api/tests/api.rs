//! The API surface through kube-rs's client: typed lists and gets, `/version`, the
//! `Status` errors it parses, the sandbox kubeconfig, and the health check.

mod support;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use support::{SERVER, slice};

/// A GET through the client; `Err` carries the `Status` code and reason.
async fn get(client: &kube::Client, method: &str, uri: &str) -> Result<String, (u16, String)> {
    let request = http::Request::builder().method(method).uri(uri).body(Vec::new()).unwrap();
    client.request_text(request).await.map_err(|e| match e {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("not an API error: {other}"),
    })
}

#[tokio::test]
async fn typed_list_get_and_all_namespaces() {
    let api = support::Api::start(0, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    api.hub.put(slice("other", &["10.0.1.1"]));
    let slices = Api::<EndpointSlice>::namespaced(api.client(), "default");
    let list = slices.list(&ListParams::default().labels(SERVER)).await.unwrap();
    assert_eq!(list.metadata.resource_version.as_deref(), Some("2"));
    let names: Vec<_> = list.items.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["server-sandbox"]);
    assert_eq!(slices.get("server-sandbox").await.unwrap().endpoints[0].addresses, ["10.0.0.1"]);
    assert!(matches!(slices.get("nope").await, Err(kube::Error::Api(s)) if s.code == 404));
    assert_eq!(Api::<EndpointSlice>::all(api.client()).list(&ListParams::default()).await.unwrap().items.len(), 2);
    let elsewhere = Api::<EndpointSlice>::namespaced(api.client(), "kube-system");
    assert!(elsewhere.list(&ListParams::default()).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn errors_are_status_objects() {
    let api = support::Api::start(0, 1000).await;
    let client = api.client();
    let slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    assert_eq!(get(&client, "GET", "/api/v1/pods").await, Err((404, "NotFound".into())));
    assert_eq!(get(&client, "GET", &format!("{slices}?watch=maybe")).await, Err((400, "BadRequest".into())));
    assert_eq!(get(&client, "GET", &format!("{slices}?resourceVersion=x")).await, Err((400, "BadRequest".into())));
    assert_eq!(
        get(&client, "GET", &format!("{slices}?labelSelector=a%20in%20(b")).await,
        Err((400, "BadRequest".into()))
    );
    assert_eq!(get(&client, "POST", slices).await, Err((405, "MethodNotAllowed".into())));
    assert_eq!(
        get(&client, "GET", &format!("{slices}?resourceVersion=5&resourceVersionMatch=Exact")).await,
        Err((410, "Expired".into()))
    );
    assert_eq!(get(&client, "GET", "/healthz").await, Ok("ok".into()));
    assert_eq!(client.apiserver_version().await.unwrap().git_version, "v1.33.0-sandbox");
}

/// A raw watch, as curl would see it: one JSON line per event, then the end at
/// `timeoutSeconds`.
#[tokio::test]
async fn a_raw_watch_is_newline_delimited_and_ends_at_its_timeout() {
    let api = support::Api::start(0, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    let uri = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?watch=1&timeoutSeconds=1&resourceVersion=0";
    let started = tokio::time::Instant::now();
    let body = get(&api.client(), "GET", uri).await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    let lines: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{body}");
    assert_eq!(lines[0]["type"], "ADDED");
    assert_eq!(lines[0]["object"]["kind"], "EndpointSlice");
    assert_eq!(lines[0]["object"]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(lines[0]["object"]["metadata"]["resourceVersion"], "1");
}

/// The compose override's kubeconfig: plain HTTP, no credentials, namespace default.
/// kube-rs accepts it (no TLS required); pointed here, it lists.
#[tokio::test]
async fn the_sandbox_kubeconfig_needs_no_tls() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/kubeconfig-sandbox.yaml");
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    assert_eq!(config.cluster_url.to_string(), "http://slice-api:8080/");
    assert_eq!(config.default_namespace, "default");
    let api = support::Api::start(0, 1000).await;
    api.hub.put(slice("server", &["10.0.0.1"]));
    config.cluster_url = format!("http://{}", api.addr).parse().unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let list = Api::<EndpointSlice>::default_namespaced(client).list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn health_check_passes_once_synced_and_fails_when_not_serving() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub = std::sync::Arc::new(slice_api::hub::Hub::new(slice_api::store::Store::new("default", 0, 10), 16));
    let api = support::Api::serve(listener, hub);
    assert_eq!(slice_api::http::check_health(api.addr).await, Err("GET /readyz: 503 Service Unavailable".into()));
    assert_eq!(get(&api.client(), "GET", "/healthz").await, Ok("ok".into()));
    api.hub.mark_synced();
    assert_eq!(slice_api::http::check_health(api.addr).await, Ok(()));
    let addr = api.addr;
    api.stop().await;
    let err = slice_api::http::check_health(addr).await.unwrap_err();
    assert!(err.starts_with("connect:"), "{err}");
}
