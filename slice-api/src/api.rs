//! The part of the Kubernetes API served here, as pure functions: a path and a query
//! string become a `Route` and a `Query`, and answers become the API server's JSON
//! (lists, newline-delimited watch events, `Status` errors). No IO.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, Status, WatchEvent};
use serde::Serialize;
use serde_json::json;

use crate::hub::{Event, Filter, Start};
use crate::selector::Selector;
use crate::store::{ChangeKind, VersionError};

const GROUP_VERSION: &str = "/apis/discovery.k8s.io/v1";
/// Watches without `timeoutSeconds` end after this long; the API server picks 30 to 60 min.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// What a path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/healthz`, `/livez`: the server answers.
    Live,
    /// `/readyz`: the store has been filled from Docker at least once.
    Ready,
    /// `/version`.
    Version,
    /// `.../endpointslices`, in one namespace or (`None`) all of them.
    Slices { namespace: Option<String> },
    /// `.../namespaces/{ns}/endpointslices/{name}`.
    Slice { namespace: String, name: String },
}

/// A collection request's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub watch: bool,
    pub selector: Selector,
    /// `resourceVersion`; `None` when absent or empty.
    pub resource_version: Option<u64>,
    /// `resourceVersionMatch=Exact` (lists only).
    pub exact: bool,
    /// `timeoutSeconds`, for watches.
    pub timeout: Duration,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `sendInitialEvents`.
    pub initial_events: bool,
}

/// An answer other than 200, as the API server words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A malformed or unsupported parameter.
    #[error("{0}")]
    BadRequest(String),
    /// No such path or object.
    #[error("{0}")]
    NotFound(String),
    /// Only GET is served: nothing here can be written through the API.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// `/readyz` before the first list from Docker.
    #[error("not ready: the endpoints have not been listed from Docker yet")]
    NotReady,
    /// A version that cannot be served any more (410 Gone: relist).
    #[error(transparent)]
    Expired(#[from] VersionError),
}

/// Maps a path to what it asks for; `None` for anything else (404).
pub fn route(path: &str) -> Option<Route> {
    match path.trim_end_matches('/') {
        "/healthz" | "/livez" => return Some(Route::Live),
        "/readyz" => return Some(Route::Ready),
        "/version" => return Some(Route::Version),
        _ => {}
    }
    let rest = path.strip_prefix(GROUP_VERSION)?;
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    match parts[..] {
        ["endpointslices"] => Some(Route::Slices { namespace: None }),
        ["namespaces", ns, "endpointslices"] if !ns.is_empty() => Some(Route::Slices { namespace: Some(ns.into()) }),
        ["namespaces", ns, "endpointslices", name] if !ns.is_empty() && !name.is_empty() => {
            Some(Route::Slice { namespace: ns.into(), name: name.into() })
        }
        _ => None,
    }
}

/// Parses a collection's query string. Unknown parameters are ignored, as the API
/// server ignores them; known ones with bad values are refused.
pub fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query {
        watch: false,
        selector: Selector::default(),
        resource_version: None,
        exact: false,
        timeout: DEFAULT_WATCH_TIMEOUT,
        bookmarks: false,
        initial_events: false,
    };
    let bad = |key: &str, value: &str, what: &str| ApiError::BadRequest(format!("{key}={value:?}: {what}"));
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let (key, value) = (key.as_ref(), value.as_ref());
        let boolean = || parse_bool(value).ok_or_else(|| bad(key, value, "expected true or false"));
        match key {
            "watch" => q.watch = boolean()?,
            "allowWatchBookmarks" => q.bookmarks = boolean()?,
            "sendInitialEvents" => q.initial_events = boolean()?,
            "labelSelector" => q.selector = Selector::parse(value).map_err(|e| ApiError::BadRequest(e.to_string()))?,
            "fieldSelector" if !value.is_empty() => {
                return Err(bad(key, value, "field selectors are not supported by this stand-in"));
            }
            "resourceVersion" if !value.is_empty() => {
                q.resource_version = Some(value.parse().map_err(|_| bad(key, value, "expected a resource version"))?);
            }
            "resourceVersionMatch" => match value {
                "" | "NotOlderThan" => q.exact = false,
                "Exact" => q.exact = true,
                _ => return Err(bad(key, value, "expected NotOlderThan or Exact")),
            },
            "timeoutSeconds" => {
                let secs: u64 = value.parse().map_err(|_| bad(key, value, "expected a number of seconds"))?;
                q.timeout = Duration::from_secs(secs);
            }
            "limit" => {
                value.parse::<u64>().map_err(|_| bad(key, value, "expected a non-negative number"))?;
            }
            "continue" if !value.is_empty() => {
                return Err(bad(key, value, "no continue token was issued: every list is one page"));
            }
            _ => {}
        }
    }
    if q.initial_events && !q.bookmarks {
        return Err(ApiError::BadRequest("sendInitialEvents requires allowWatchBookmarks=true".into()));
    }
    Ok(q)
}

/// Go's `strconv.ParseBool`, which the API server uses.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl Query {
    pub fn filter(&self, namespace: Option<String>) -> Filter {
        Filter { namespace, selector: self.selector.clone() }
    }

    /// Where a watch starts: "" and "0" mean "the current state, then changes".
    pub fn start(&self) -> Start {
        match self.resource_version {
            _ if self.initial_events => Start::InitialEvents,
            None | Some(0) => Start::Now,
            Some(version) => Start::After(version),
        }
    }

    /// Whether a list at `current` satisfies the requested version. Only the current
    /// state is kept, so `Exact` works for the current version alone.
    pub fn check_list_version(&self, current: u64) -> Result<(), ApiError> {
        match self.resource_version {
            None | Some(0) => Ok(()),
            Some(v) if self.exact && v != current => Err(VersionError::TooOld { requested: v, oldest: current }.into()),
            Some(v) if v > current => Err(VersionError::TooLarge { requested: v, current }.into()),
            Some(_) => Ok(()),
        }
    }
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed => 405,
            ApiError::Expired(_) => 410,
            ApiError::NotReady => 503,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::NotFound(_) => "NotFound",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Expired(_) => "Expired",
            ApiError::NotReady => "ServiceUnavailable",
        }
    }

    pub fn status(&self) -> Status {
        Status {
            code: Some(self.code().into()),
            message: Some(self.to_string()),
            reason: Some(self.reason().into()),
            status: Some("Failure".into()),
            ..Status::default()
        }
    }
}

/// A `Status` body.
pub fn status_json(error: &ApiError) -> Bytes {
    to_json(&error.status())
}

/// An `EndpointSliceList` at `version`, in one page.
pub fn list_json(version: u64, items: Vec<EndpointSlice>) -> Bytes {
    let metadata = ListMeta { resource_version: Some(version.to_string()), ..ListMeta::default() };
    to_json(&k8s_openapi::List { items, metadata })
}

/// One watch event, newline-terminated.
pub fn event_line(event: &Event) -> Bytes {
    let mut line = match event {
        Event::Change(change) => {
            let slice = change.slice.clone();
            serde_json::to_vec(&match change.kind {
                ChangeKind::Added => WatchEvent::Added(slice),
                ChangeKind::Modified => WatchEvent::Modified(slice),
                ChangeKind::Deleted => WatchEvent::Deleted(slice),
            })
        }
        Event::Bookmark { version, initial_end } => serde_json::to_vec(&Bookmark::new(*version, *initial_end)),
        Event::Expired(e) => {
            serde_json::to_vec(&WatchEvent::<EndpointSlice>::ErrorStatus(ApiError::Expired(e.clone()).status()))
        }
    }
    .unwrap_or_default();
    line.push(b'\n');
    line.into()
}

/// A BOOKMARK event. k8s-openapi's `WatchEvent::Bookmark` leaves out the object's
/// `kind` and `apiVersion`, which the API server sends and kube-rs requires.
#[derive(Serialize)]
struct Bookmark {
    r#type: &'static str,
    object: BookmarkObject,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BookmarkObject {
    kind: &'static str,
    api_version: &'static str,
    metadata: BookmarkMeta,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BookmarkMeta {
    resource_version: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, &'static str>,
}

impl Bookmark {
    fn new(version: u64, initial_end: bool) -> Bookmark {
        let mut annotations = BTreeMap::new();
        if initial_end {
            annotations.insert("k8s.io/initial-events-end", "true");
        }
        let metadata = BookmarkMeta { resource_version: version.to_string(), annotations };
        let object = BookmarkObject { kind: "EndpointSlice", api_version: "discovery.k8s.io/v1", metadata };
        Bookmark { r#type: "BOOKMARK", object }
    }
}

/// `/version`: what kube-rs's `Client::apiserver_version` reads.
pub fn version_json() -> Bytes {
    let info = json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-sandbox",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64",
    });
    to_json(&info)
}

fn to_json(value: &impl Serialize) -> Bytes {
    // Serializing these types cannot fail: no maps with non-string keys, no custom impls.
    serde_json::to_vec(value).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ns = |ns: &str| Some(Route::Slices { namespace: Some(ns.into()) });
        assert_eq!(route("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"), ns("default"));
        assert_eq!(route("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/"), ns("default"));
        assert_eq!(route("/apis/discovery.k8s.io/v1/endpointslices"), Some(Route::Slices { namespace: None }));
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/server-sandbox"),
            Some(Route::Slice { namespace: "default".into(), name: "server-sandbox".into() })
        );
        assert_eq!(route("/healthz"), Some(Route::Live));
        assert_eq!(route("/readyz"), Some(Route::Ready));
        assert_eq!(route("/version"), Some(Route::Version));
        for other in
            ["/", "/api/v1/pods", "/apis/discovery.k8s.io/v1/namespaces//endpointslices", "/apis/discovery.k8s.io/v1"]
        {
            assert_eq!(route(other), None, "{other}");
        }
    }

    /// The query kube-rs's watcher sends for its list and its watch (observed, see
    /// tests/watcher.rs).
    #[test]
    fn parses_what_the_kube_watcher_sends() {
        let list = parse_query(Some("&labelSelector=kubernetes.io%2Fservice-name%3Dserver&limit=500")).unwrap();
        assert!(!list.watch);
        assert_eq!(list.selector, Selector::parse("kubernetes.io/service-name=server").unwrap());
        let watch = parse_query(Some(
            "&watch=true&timeoutSeconds=290&labelSelector=kubernetes.io%2Fservice-name%3Dserver\
             &allowWatchBookmarks=true&resourceVersion=1042",
        ))
        .unwrap();
        assert!(watch.watch && watch.bookmarks);
        assert_eq!(watch.timeout, Duration::from_secs(290));
        assert_eq!(watch.start(), Start::After(1042));
        let streaming = parse_query(Some(
            "watch=true&timeoutSeconds=290&allowWatchBookmarks=true&sendInitialEvents=true\
             &resourceVersionMatch=NotOlderThan&resourceVersion=0",
        ))
        .unwrap();
        assert_eq!(streaming.start(), Start::InitialEvents);
    }

    #[test]
    fn refuses_bad_values_with_400() {
        for bad in [
            "watch=yes",
            "resourceVersion=abc",
            "timeoutSeconds=-1",
            "limit=x",
            "labelSelector=a%20in%20(b",
            "fieldSelector=metadata.name%3Dx",
            "continue=abc",
            "resourceVersionMatch=Newest",
            "watch=true&sendInitialEvents=true",
        ] {
            let err = parse_query(Some(bad)).unwrap_err();
            assert_eq!(err.code(), 400, "{bad}: {err}");
        }
        assert!(parse_query(Some("%zz&=&&pretty=true")).is_ok(), "odd but harmless query strings pass");
    }

    #[test]
    fn list_versions() {
        let q = |s: &str| parse_query(Some(s)).unwrap();
        assert_eq!(q("").check_list_version(5), Ok(()));
        assert_eq!(q("resourceVersion=0&resourceVersionMatch=NotOlderThan").check_list_version(5), Ok(()));
        assert_eq!(q("resourceVersion=3").check_list_version(5), Ok(()));
        assert_eq!(q("resourceVersion=5&resourceVersionMatch=Exact").check_list_version(5), Ok(()));
        assert_eq!(q("resourceVersion=3&resourceVersionMatch=Exact").check_list_version(5).unwrap_err().code(), 410);
        assert_eq!(q("resourceVersion=6").check_list_version(5).unwrap_err().code(), 410);
    }

    #[test]
    fn an_expired_watch_event_is_the_api_servers() {
        let line = event_line(&Event::Expired(VersionError::TooOld { requested: 3, oldest: 10 }));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": "too old resource version: 3 (10)"}})
        );
        assert!(line.ends_with(b"}\n"));
    }

    #[test]
    fn a_bookmark_carries_kind_and_version() {
        let line = event_line(&Event::Bookmark { version: 12, initial_end: false });
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"EndpointSlice\",\"apiVersion\":\"discovery.k8s.io/v1\",\
             \"metadata\":{\"resourceVersion\":\"12\"}}}\n"
        );
    }

    #[test]
    fn a_list_has_kind_and_version() {
        let value: serde_json::Value = serde_json::from_slice(&list_json(9, vec![])).unwrap();
        assert_eq!(
            value,
            json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": "9"}, "items": []})
        );
    }
}
