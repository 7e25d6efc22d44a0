//! The EndpointSlices of one namespace with the API server's versioning: one
//! resourceVersion counter, and a bounded history of changes so that a watch from a
//! version replays what came after it, or learns that it is too old and must relist.
//! Pure: no IO, no clock; the hub calls it under its lock.

use std::collections::{BTreeMap, VecDeque};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::selector::Selector;

/// The slices and their history.
#[derive(Debug)]
pub struct Store {
    /// Every slice lives in this one namespace.
    namespace: String,
    /// The current slices by name, each carrying the resourceVersion of its last change.
    slices: BTreeMap<String, EndpointSlice>,
    /// The version of the latest change, or the starting version before any.
    version: u64,
    /// The latest changes, oldest first, at most `capacity` of them.
    history: VecDeque<Change>,
    /// How many changes a watch can be behind and still resume.
    capacity: usize,
    /// A watch can resume from this version or any later one: every change after it is
    /// still in the history.
    oldest: u64,
}

/// What a watch event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One change, with the slice as it is afterwards (as it was, for a deletion); the
/// slice's resourceVersion is the change's.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub slice: EndpointSlice,
}

/// A resourceVersion a watch cannot resume from; the client must list again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Changes after it have left the history.
    #[error("too old resource version: {requested} ({oldest})")]
    TooOld { requested: u64, oldest: u64 },
    /// This store never issued it: the client saw an earlier run of this server (which
    /// started from a lower version) or made it up.
    #[error("too large resource version: {requested}, current: {current}")]
    TooLarge { requested: u64, current: u64 },
}

impl Change {
    /// The resourceVersion this change created.
    pub fn version(&self) -> u64 {
        version_of(&self.slice)
    }
}

impl Store {
    /// An empty store whose first change gets `start + 1`; keeps the last `capacity`
    /// changes (at least one).
    pub fn new(namespace: impl Into<String>, start: u64, capacity: usize) -> Store {
        Store {
            namespace: namespace.into(),
            slices: BTreeMap::new(),
            version: start,
            history: VecDeque::new(),
            capacity: capacity.max(1),
            oldest: start,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The version of the latest change: what a list answers as its resourceVersion.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Creates or replaces the slice named in its metadata. Returns the change, or
    /// `None` when the slice is unchanged (no new version, no event).
    pub fn put(&mut self, mut slice: EndpointSlice) -> Option<Change> {
        let name = slice.metadata.name.clone().unwrap_or_default();
        slice.metadata.namespace = Some(self.namespace.clone());
        let previous = self.slices.get(&name);
        slice.metadata.resource_version = previous.and_then(|p| p.metadata.resource_version.clone());
        if previous == Some(&slice) {
            return None;
        }
        let kind = if previous.is_some() { ChangeKind::Modified } else { ChangeKind::Added };
        self.version += 1;
        slice.metadata.resource_version = Some(self.version.to_string());
        self.slices.insert(name, slice.clone());
        Some(self.record(Change { kind, slice }))
    }

    /// Deletes a slice; `None` when there is none by that name.
    pub fn delete(&mut self, name: &str) -> Option<Change> {
        let mut slice = self.slices.remove(name)?;
        self.version += 1;
        slice.metadata.resource_version = Some(self.version.to_string());
        Some(self.record(Change { kind: ChangeKind::Deleted, slice }))
    }

    /// The current slices the selector picks, by name.
    pub fn list(&self, selector: &Selector) -> Vec<EndpointSlice> {
        self.slices.values().filter(|s| selector.matches(s.metadata.labels.as_ref())).cloned().collect()
    }

    /// The changes after version `from` that the selector picks, oldest first.
    ///
    /// A deletion is picked by the labels the slice had. Slices here never change their
    /// labels (the service name is in the name), so a watch never has to be told that a
    /// slice left its selection.
    pub fn changes_after(&self, from: u64, selector: &Selector) -> Result<Vec<Change>, VersionError> {
        if from < self.oldest {
            return Err(VersionError::TooOld { requested: from, oldest: self.oldest });
        }
        if from > self.version {
            return Err(VersionError::TooLarge { requested: from, current: self.version });
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.version() > from && selector.matches(c.slice.metadata.labels.as_ref()))
            .cloned()
            .collect())
    }

    fn record(&mut self, change: Change) -> Change {
        self.history.push_back(change.clone());
        while self.history.len() > self.capacity {
            if let Some(evicted) = self.history.pop_front() {
                self.oldest = evicted.version();
            }
        }
        change
    }
}

/// A stored slice's resourceVersion as a number (the store only writes numbers).
pub fn version_of(slice: &EndpointSlice) -> u64 {
    slice.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/service-name".to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint { addresses: vec![ip.to_string()], ..Endpoint::default() })
                .collect(),
            ports: None,
        }
    }

    fn all() -> Selector {
        Selector::default()
    }

    /// (kind, name, version) of each change, for exact comparisons.
    fn summary(changes: &[Change]) -> Vec<(ChangeKind, String, u64)> {
        changes.iter().map(|c| (c.kind, c.slice.metadata.name.clone().unwrap(), c.version())).collect()
    }

    #[test]
    fn put_adds_then_modifies_and_unchanged_is_no_change() {
        let mut store = Store::new("default", 100, 10);
        let added = store.put(slice("server-a", "server", &["10.0.0.1"])).unwrap();
        assert_eq!((added.kind, added.version()), (ChangeKind::Added, 101));
        assert_eq!(added.slice.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(store.put(slice("server-a", "server", &["10.0.0.1"])), None);
        let modified = store.put(slice("server-a", "server", &["10.0.0.1", "10.0.0.2"])).unwrap();
        assert_eq!((modified.kind, modified.version()), (ChangeKind::Modified, 102));
        assert_eq!(store.version(), 102);
        assert_eq!(store.list(&all()), vec![modified.slice]);
    }

    #[test]
    fn delete_takes_a_new_version_and_unknown_names_are_no_change() {
        let mut store = Store::new("default", 0, 10);
        store.put(slice("server-a", "server", &["10.0.0.1"]));
        let deleted = store.delete("server-a").unwrap();
        assert_eq!((deleted.kind, deleted.version()), (ChangeKind::Deleted, 2));
        assert_eq!(deleted.slice.endpoints.len(), 1, "a deletion carries the last state");
        assert_eq!(store.delete("server-a"), None);
        assert_eq!(store.version(), 2);
        assert!(store.list(&all()).is_empty());
    }

    #[test]
    fn changes_after_replays_exactly_what_came_later() {
        let mut store = Store::new("default", 0, 10);
        store.put(slice("server-a", "server", &["10.0.0.1"]));
        store.put(slice("other-a", "other", &["10.0.1.1"]));
        store.put(slice("server-a", "server", &[]));
        store.delete("other-a");
        store.delete("server-a");
        use ChangeKind::*;
        assert_eq!(
            summary(&store.changes_after(1, &all()).unwrap()),
            vec![
                (Added, "other-a".into(), 2),
                (Modified, "server-a".into(), 3),
                (Deleted, "other-a".into(), 4),
                (Deleted, "server-a".into(), 5),
            ]
        );
        let server = Selector::parse("kubernetes.io/service-name=server").unwrap();
        assert_eq!(
            summary(&store.changes_after(0, &server).unwrap()),
            vec![(Added, "server-a".into(), 1), (Modified, "server-a".into(), 3), (Deleted, "server-a".into(), 5)]
        );
        assert_eq!(store.changes_after(5, &all()).unwrap(), vec![]);
    }

    #[test]
    fn a_version_older_than_the_history_is_too_old() {
        let mut store = Store::new("default", 10, 2);
        for n in 1..=4 {
            store.put(slice("server-a", "server", &[&format!("10.0.0.{n}")]));
        }
        // Versions 11..=14; the history keeps 13 and 14, so a watch can resume from 12.
        assert_eq!(store.changes_after(11, &all()), Err(VersionError::TooOld { requested: 11, oldest: 12 }));
        assert_eq!(
            summary(&store.changes_after(12, &all()).unwrap()),
            vec![(ChangeKind::Modified, "server-a".into(), 13), (ChangeKind::Modified, "server-a".into(), 14)]
        );
        assert_eq!(store.changes_after(11, &all()).unwrap_err().to_string(), "too old resource version: 11 (12)");
    }

    #[test]
    fn a_version_from_before_the_start_or_never_issued_is_refused() {
        let mut store = Store::new("default", 1000, 10);
        store.put(slice("server-a", "server", &["10.0.0.1"]));
        // An earlier run of the server issued lower versions: relist.
        assert_eq!(store.changes_after(999, &all()), Err(VersionError::TooOld { requested: 999, oldest: 1000 }));
        assert_eq!(store.changes_after(1000, &all()).unwrap().len(), 1);
        assert_eq!(store.changes_after(1002, &all()), Err(VersionError::TooLarge { requested: 1002, current: 1001 }));
    }
}
