//! The store shared by the Docker source (which writes) and the HTTP watches (which
//! read): each change goes into every matching watch's bounded channel without waiting,
//! and a watch whose channel is full is ended, so a slow or vanished client never holds
//! up the store. No IO; the caller decides when bookmarks go out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;

use crate::selector::Selector;
use crate::store::{Change, ChangeKind, Store, VersionError};

/// The store and its open watches.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// Events a watch may have queued before it is ended for falling behind.
    watch_buffer: usize,
    /// The writer has filled the store once (`/readyz`).
    synced: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    watches: Vec<WatchTx>,
    /// Set by `close`: no new watches, and open ones have ended.
    closed: bool,
}

#[derive(Debug)]
struct WatchTx {
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::Sender<Event>,
}

/// What a watch sends, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Shared by every watch it goes to.
    Change(Arc<Change>),
    /// Nothing the watch selects changed up to this version. `initial_end` marks the
    /// end of the initial events of a `sendInitialEvents` watch.
    Bookmark { version: u64, initial_end: bool },
    /// The watch cannot start from the version asked for; the client must relist.
    Expired(VersionError),
}

/// Which slices a list or a watch is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub selector: Selector,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `resourceVersion` unset or "0": an ADDED event per current slice, then changes.
    Now,
    /// `sendInitialEvents=true`: as `Now`, then a bookmark marking the initial events' end.
    InitialEvents,
    /// `resourceVersion=N`: the changes after N.
    After(u64),
}

/// An open watch: the events owed at its start, then the live ones.
#[derive(Debug)]
pub struct Watch {
    pub replay: Vec<Event>,
    /// `None` when the watch ends after its replay (too old a version, or closed hub).
    pub live: Option<mpsc::Receiver<Event>>,
}

impl Hub {
    pub fn new(store: Store, watch_buffer: usize) -> Hub {
        Hub {
            inner: Mutex::new(Inner { store, watches: Vec::new(), closed: false }),
            watch_buffer: watch_buffer.max(1),
            synced: AtomicBool::new(false),
        }
    }

    /// The current version and the slices the filter picks.
    pub fn list(&self, filter: &Filter) -> (u64, Vec<EndpointSlice>) {
        let inner = self.lock();
        let items = if filter.admits_namespace(inner.store.namespace()) {
            inner.store.list(&filter.selector)
        } else {
            Vec::new()
        };
        (inner.store.version(), items)
    }

    /// Opens a watch. Replay and registration happen under one lock, so no change falls
    /// between them.
    pub fn watch(&self, filter: Filter, start: Start, bookmarks: bool) -> Watch {
        let mut inner = self.lock();
        let in_namespace = filter.admits_namespace(inner.store.namespace());
        let replay = match start {
            Start::After(version) => match inner.store.changes_after(version, &filter.selector) {
                Ok(changes) if in_namespace => changes.into_iter().map(|c| Event::Change(Arc::new(c))).collect(),
                Ok(_) => Vec::new(),
                Err(e) => return Watch { replay: vec![Event::Expired(e)], live: None },
            },
            Start::Now | Start::InitialEvents => {
                let current = if in_namespace { inner.store.list(&filter.selector) } else { Vec::new() };
                let mut replay: Vec<Event> = current
                    .into_iter()
                    .map(|slice| Event::Change(Arc::new(Change { kind: ChangeKind::Added, slice })))
                    .collect();
                if start == Start::InitialEvents {
                    replay.push(Event::Bookmark { version: inner.store.version(), initial_end: true });
                }
                replay
            }
        };
        if inner.closed {
            return Watch { replay, live: None };
        }
        let (tx, rx) = mpsc::channel(self.watch_buffer);
        inner.watches.push(WatchTx { filter, bookmarks, tx });
        Watch { replay, live: Some(rx) }
    }

    /// Creates or replaces a slice and tells the watches. Returns the change, if any.
    pub fn put(&self, slice: EndpointSlice) -> Option<Arc<Change>> {
        let mut inner = self.lock();
        let change = Arc::new(inner.store.put(slice)?);
        inner.broadcast(&change);
        Some(change)
    }

    /// Deletes a slice and tells the watches.
    pub fn delete(&self, name: &str) -> Option<Arc<Change>> {
        let mut inner = self.lock();
        let change = Arc::new(inner.store.delete(name)?);
        inner.broadcast(&change);
        Some(change)
    }

    /// Sends the current version to every watch that asked for bookmarks. Queued behind
    /// the changes already sent, so a client never skips one by resuming from it.
    pub fn bookmark(&self) {
        let mut inner = self.lock();
        let version = inner.store.version();
        inner.watches.retain(|w| !w.bookmarks || offer(w, Event::Bookmark { version, initial_end: false }));
    }

    /// Ends every watch and refuses new ones: for shutdown.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.watches.clear();
    }

    /// Called by the writer once the store holds the full current state.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// How many watches are open (for tests and logs).
    pub fn watch_count(&self) -> usize {
        self.lock().watches.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here panics while holding the lock; if something did, the store is
        // still consistent (each method updates it in one step).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn broadcast(&mut self, change: &Arc<Change>) {
        let namespace = self.store.namespace().to_owned();
        let labels = change.slice.metadata.labels.as_ref();
        self.watches.retain(|w| {
            let picked = w.filter.admits_namespace(&namespace) && w.filter.selector.matches(labels);
            !picked || offer(w, Event::Change(change.clone()))
        });
    }
}

/// Queues an event without waiting; `false` (drop the watch) when the client fell behind
/// or went away. Dropping the sender ends the response, and the client resumes or relists.
fn offer(watch: &WatchTx, event: Event) -> bool {
    match watch.tx.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(selector = ?watch.filter.selector, "Watch fell behind; ending it");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

impl Filter {
    fn admits_namespace(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn slice(name: &str, service: &str, ips: usize) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/service-name".to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: (0..ips)
                .map(|n| k8s_openapi::api::discovery::v1::Endpoint {
                    addresses: vec![format!("10.0.0.{n}")],
                    ..Default::default()
                })
                .collect(),
            ports: None,
        }
    }

    fn server_filter() -> Filter {
        Filter {
            namespace: Some("default".into()),
            selector: Selector::parse("kubernetes.io/service-name=server").unwrap(),
        }
    }

    /// (kind or "BOOKMARK", version) of each event.
    fn summary(events: &[Event]) -> Vec<(String, u64)> {
        events
            .iter()
            .map(|e| match e {
                Event::Change(c) => (format!("{:?}", c.kind), c.version()),
                Event::Bookmark { version, initial_end } => (format!("Bookmark(end={initial_end})"), *version),
                Event::Expired(_) => ("Expired".into(), 0),
            })
            .collect()
    }

    fn drain(rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn a_watch_gets_the_matching_changes_in_order_with_bookmarks_between() {
        let hub = Hub::new(Store::new("default", 0, 100), 16);
        hub.put(slice("server-sandbox", "server", 1));
        let mut watch = hub.watch(server_filter(), Start::Now, true);
        assert_eq!(summary(&watch.replay), [("Added".into(), 1)]);
        let live = watch.live.as_mut().unwrap();
        hub.put(slice("other-sandbox", "other", 1));
        hub.put(slice("server-sandbox", "server", 2));
        hub.bookmark();
        hub.delete("server-sandbox");
        assert_eq!(
            summary(&drain(live)),
            [("Modified".into(), 3), ("Bookmark(end=false)".into(), 3), ("Deleted".into(), 4)]
        );
    }

    #[test]
    fn a_watch_from_a_version_replays_then_follows() {
        let hub = Hub::new(Store::new("default", 0, 100), 16);
        hub.put(slice("server-sandbox", "server", 1));
        hub.put(slice("server-sandbox", "server", 2));
        let mut watch = hub.watch(server_filter(), Start::After(1), false);
        assert_eq!(summary(&watch.replay), [("Modified".into(), 2)]);
        hub.bookmark();
        hub.put(slice("server-sandbox", "server", 3));
        assert_eq!(summary(&drain(watch.live.as_mut().unwrap())), [("Modified".into(), 3)], "no bookmarks unasked");
    }

    #[test]
    fn initial_events_end_with_a_marked_bookmark() {
        let hub = Hub::new(Store::new("default", 7, 100), 16);
        hub.put(slice("server-sandbox", "server", 1));
        let watch = hub.watch(server_filter(), Start::InitialEvents, true);
        assert_eq!(summary(&watch.replay), [("Added".into(), 8), ("Bookmark(end=true)".into(), 8)]);
    }

    #[test]
    fn a_too_old_version_gets_only_an_expired_event() {
        let hub = Hub::new(Store::new("default", 0, 1), 16);
        hub.put(slice("server-sandbox", "server", 1));
        hub.put(slice("server-sandbox", "server", 2));
        let watch = hub.watch(server_filter(), Start::After(0), true);
        assert_eq!(watch.replay, [Event::Expired(VersionError::TooOld { requested: 0, oldest: 1 })]);
        assert!(watch.live.is_none());
        assert_eq!(hub.watch_count(), 0);
    }

    #[test]
    fn a_watch_that_falls_behind_is_ended_and_the_store_goes_on() {
        let hub = Hub::new(Store::new("default", 0, 100), 2);
        let mut slow = hub.watch(server_filter(), Start::Now, false);
        for ips in 1..=5 {
            hub.put(slice("server-sandbox", "server", ips));
        }
        assert_eq!(hub.watch_count(), 0);
        let live = slow.live.as_mut().unwrap();
        assert_eq!(summary(&drain(live)), [("Added".into(), 1), ("Modified".into(), 2)]);
        assert!(live.is_closed(), "the response ends after what was queued");
        assert_eq!(hub.list(&server_filter()).0, 5);
    }

    #[test]
    fn a_vanished_client_is_forgotten_at_the_next_event() {
        let hub = Hub::new(Store::new("default", 0, 100), 16);
        drop(hub.watch(server_filter(), Start::Now, true));
        assert_eq!(hub.watch_count(), 1);
        hub.bookmark();
        assert_eq!(hub.watch_count(), 0);
    }

    #[test]
    fn other_namespaces_are_empty_and_all_namespaces_see_everything() {
        let hub = Hub::new(Store::new("default", 0, 100), 16);
        hub.put(slice("server-sandbox", "server", 1));
        let elsewhere = Filter { namespace: Some("kube-system".into()), ..Filter::default() };
        assert_eq!(hub.list(&elsewhere), (1, vec![]));
        assert!(hub.watch(elsewhere, Start::After(0), false).replay.is_empty());
        assert_eq!(hub.list(&Filter::default()).1.len(), 1);
        let changes = hub.watch(Filter::default(), Start::After(0), false).replay;
        assert!(matches!(&changes[..], [Event::Change(c)] if c.kind == ChangeKind::Added));
    }

    #[test]
    fn close_ends_watches_and_refuses_new_ones() {
        let hub = Hub::new(Store::new("default", 0, 100), 16);
        let mut open = hub.watch(server_filter(), Start::Now, true);
        hub.close();
        assert!(open.live.as_mut().unwrap().is_closed());
        assert!(hub.watch(server_filter(), Start::Now, true).live.is_none());
    }
}
