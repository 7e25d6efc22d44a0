//! The IO around the pure picker: the endpoints' connections (kept up by
//! [`crate::connect`]) and the discovery loop that feeds membership in. Discovery and
//! connection events change the [`EndpointSet`] under a mutex and publish an immutable
//! [`Snapshot`]; calls pick from the latest snapshot without any lock. Connection tasks
//! hold only a `Weak` to the pool, so dropping the last [`crate::Balancer`] stops
//! everything.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    sync::{Notify, watch},
    task::AbortHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    connect::{Connector, connect_loop},
    discover::{Discovery, Lookup},
    pick::{Cursors, EndpointSet, Pick, Snapshot, Tier},
    transport::Upstream,
};

pub(crate) struct Pool<B> {
    pub(crate) target: String,
    /// The target as an HTTP authority, for requests that come without one.
    pub(crate) authority: http::uri::Authority,
    pub(crate) connector: Arc<Connector>,
    /// Written by discovery and connection events only, never by calls.
    state: Mutex<State<B>>,
    /// The ready endpoints as of the last change: what calls pick from.
    snapshot: ArcSwap<Snapshot<Upstream<B>>>,
    /// Round-robin positions per method, kept across snapshots.
    cursors: Cursors,
    /// Bumped whenever an endpoint comes or goes, for calls waiting for one.
    changed: watch::Sender<()>,
    /// Number of ready endpoints, for health reporting.
    ready: watch::Sender<usize>,
    /// Asks discovery to resolve now.
    pub(crate) refresh: Arc<Notify>,
}

/// An endpoint picked for an attempt.
pub(crate) struct Picked<B> {
    pub addr: SocketAddr,
    pub tier: Tier,
    pub upstream: Upstream<B>,
}

struct State<B> {
    set: EndpointSet,
    conns: HashMap<SocketAddr, Conn<B>>,
    /// The last DNS failure, for error messages; cleared by the next answer.
    dns_error: Option<String>,
    /// Discovery has answered at least once.
    resolved_once: bool,
}

struct Conn<B> {
    send: Option<Upstream<B>>,
    last_error: Option<String>,
    task: AbortHandle,
}

impl<B> Drop for State<B> {
    fn drop(&mut self) {
        for conn in self.conns.values() {
            conn.task.abort();
        }
    }
}

impl<B> Pool<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    /// Starts discovery; connections open as endpoints appear.
    pub(crate) fn spawn(discovery: Discovery, interval: Duration, connector: Connector) -> Arc<Self> {
        let target = discovery.target().to_string();
        let pool = Arc::new(Pool {
            authority: target.parse().unwrap_or_else(|_| http::uri::Authority::from_static("localhost")),
            target,
            connector: Arc::new(connector),
            state: Mutex::new(State {
                set: EndpointSet::default(),
                conns: HashMap::new(),
                dns_error: None,
                resolved_once: false,
            }),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            cursors: Cursors::new(),
            changed: watch::Sender::new(()),
            ready: watch::Sender::new(0),
            refresh: Arc::new(Notify::new()),
        });
        tokio::spawn(discover(Arc::downgrade(&pool), pool.refresh.clone(), discovery, interval));
        pool
    }

    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks a ready endpoint for `method` now: local first, round-robin per method,
    /// endpoints in `avoid` only when no other is ready, those in `exclude` never.
    /// Otherwise says until when a new local endpoint is being waited for, if one is.
    pub(crate) fn pick(
        &self,
        method: &str,
        avoid: &[SocketAddr],
        exclude: &[SocketAddr],
    ) -> Result<Picked<B>, Option<Instant>> {
        let snapshot = self.snapshot.load();
        let now = Instant::now().into_std();
        let skip: Vec<SocketAddr>;
        let avoid = if exclude.is_empty() {
            avoid
        } else {
            skip = avoid.iter().chain(exclude).copied().collect();
            &skip
        };
        match snapshot.pick(&self.cursors, method, avoid, now) {
            Pick::Endpoint { addr, .. } if exclude.contains(&addr) => Err(None),
            Pick::Endpoint { addr, tier, handle } => Ok(Picked { addr, tier, upstream: handle.clone() }),
            Pick::WaitUntil(t) => Err(Some(Instant::from_std(t))),
            Pick::NoneReady => Err(None),
        }
    }

    /// Like [`Pool::pick`], waiting until an endpoint is ready or `until` passes.
    pub(crate) async fn wait_pick(
        &self,
        method: &str,
        avoid: &[SocketAddr],
        exclude: &[SocketAddr],
        until: Instant,
    ) -> Option<Picked<B>> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let grace = match self.pick(method, avoid, exclude) {
                Ok(p) => return Some(p),
                Err(grace) => grace,
            };
            // Wake when something changes, or when a new local endpoint's grace ends.
            let wake = grace.map_or(until, |g| g.min(until));
            match tokio::time::timeout_at(wake, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return None,
                Err(_) if wake >= until => return None,
                Err(_) => {}
            }
        }
    }

    pub(crate) fn ready_count(&self) -> watch::Receiver<usize> {
        self.ready.subscribe()
    }

    /// What the pool knows, for an error message: each endpoint and why it is not ready.
    pub(crate) fn describe(&self) -> String {
        let st = self.lock();
        let mut parts = Vec::new();
        if let Some(e) = &st.dns_error {
            parts.push(e.clone());
        } else if st.set.is_empty() {
            parts.push(if st.resolved_once { "the name has no addresses" } else { "not resolved yet" }.to_owned());
        }
        for (addr, local) in st.set.addrs() {
            let place = if local { "local" } else { "remote" };
            let why = st.conns.get(&addr).and_then(|c| c.last_error.as_deref()).unwrap_or("connecting");
            parts.push(format!("{addr} ({place}): {why}"));
        }
        parts.join("; ")
    }

    fn apply(self: &Arc<Self>, lookup: Lookup) {
        let mut st = self.lock();
        let resolved = match lookup {
            Lookup::Found(r) => r,
            Lookup::Failed(e) => {
                if st.dns_error.as_ref() != Some(&e) {
                    warn!(target = %self.target, error = %e, "DNS lookup failed; keeping known endpoints");
                }
                st.dns_error = Some(e);
                return;
            }
        };
        st.dns_error = None;
        if !st.resolved_once && resolved.all.is_empty() {
            warn!(target = %self.target, "Target has no addresses yet");
        }
        st.resolved_once = true;
        let changes = st.set.apply(&resolved, Instant::now().into_std());
        for addr in changes.removed {
            info!(%addr, "Removing endpoint");
            if let Some(conn) = st.conns.remove(&addr) {
                conn.task.abort(); // in-flight calls keep their streams
            }
        }
        for addr in changes.added {
            let local = resolved.local.contains(&addr);
            info!(%addr, local, "Adding endpoint");
            let task = tokio::spawn(connect_loop(Arc::downgrade(self), addr)).abort_handle();
            st.conns.insert(addr, Conn { send: None, last_error: None, task });
        }
        debug!(endpoints = st.set.len(), local = resolved.local.len(), "Membership updated");
        self.publish(&st);
    }

    pub(crate) fn set_conn(&self, addr: SocketAddr, send: Option<Upstream<B>>, why: Option<String>) {
        let mut st = self.lock();
        let Some(conn) = st.conns.get_mut(&addr) else { return };
        let ready = send.is_some();
        conn.send = send;
        if why.is_some() || ready {
            conn.last_error = why;
        }
        st.set.set_ready(addr, ready);
        self.publish(&st);
    }

    fn publish(&self, st: &State<B>) {
        let snapshot = st.set.snapshot(|addr| st.conns.get(&addr).and_then(|c| c.send.clone()));
        self.snapshot.store(Arc::new(snapshot));
        self.ready.send_if_modified(|n| std::mem::replace(n, st.set.ready_count()) != *n);
        self.changed.send_replace(());
    }
}

async fn discover<B>(pool: Weak<Pool<B>>, refresh: Arc<Notify>, discovery: Discovery, interval: Duration)
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    loop {
        let lookup = discovery.lookup().await;
        let Some(p) = pool.upgrade() else { return };
        p.apply(lookup);
        drop(p);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = refresh.notified() => {}
        }
    }
}
