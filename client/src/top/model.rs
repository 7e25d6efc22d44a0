//! What `client top` shows, and the pure functions that change it: a poll's answer or
//! its error, an event from a proxy's stream. No IO and no clock: the driver passes the
//! time in, so tests feed snapshots and assert the screen they lead to.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

/// Events the list keeps, across proxies; more than any screen shows.
pub const EVENTS: usize = 200;

/// `GET /admin/endpoints`: one proxy's view of its target. Fields the proxy leaves out
/// (an older build) read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// The node the proxy runs on (`--node`), when it was told.
    pub node: Option<String>,
    /// The DNS name and port it balances over.
    pub target: String,
    /// Why the last resolution failed (the proxy keeps the addresses it knew).
    pub dns_error: Option<String>,
    pub endpoints: Vec<Endpoint>,
}

/// One replica as a proxy sees it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Endpoint {
    pub address: String,
    /// `local` or `remote`: local endpoints are listed first.
    pub locality: String,
    pub state: String,
    /// `h2` or `h3` while a connection is open.
    pub protocol: Option<String>,
    /// Seconds in the current state.
    pub for_seconds: f64,
    pub last_error: Option<String>,
    pub in_flight: u64,
    /// Attempts ended per second over the last 10 s: the traffic share is taken from it.
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Attempts ended, since the endpoint appeared: the success rate is the change
    /// of these two between polls.
    pub calls: u64,
    pub failures: u64,
    pub ejections: u64,
}

impl Snapshot {
    pub fn parse(json: &str) -> Result<Snapshot, String> {
        serde_json::from_str(json).map_err(|e| format!("not /admin/endpoints JSON: {e}"))
    }
}

/// One line of the event list.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Index of the proxy it came from, in `--admin` order.
    pub proxy: usize,
    /// `HH:MM:SS`, UTC.
    pub at: String,
    /// `added`, `state`, `ejected`, ... as on `/admin/events`, or `unreachable` and
    /// `reachable` for the polls themselves.
    pub kind: String,
    pub endpoint: Option<String>,
    pub detail: String,
}

/// An event's `data:` on `/admin/events`.
#[derive(Deserialize)]
struct EventData {
    at: String,
    kind: String,
    endpoint: Option<String>,
    detail: Option<String>,
}

impl Event {
    /// The `data:` JSON of one event from `proxy`'s `/admin/events`.
    pub fn parse(proxy: usize, data: &str) -> Result<Event, String> {
        let d: EventData = serde_json::from_str(data).map_err(|e| format!("not an event's JSON: {e}"))?;
        // RFC 3339 in UTC: the time of day is characters 11 to 19.
        let at = d.at.get(11..19).unwrap_or(&d.at).to_owned();
        Ok(Event { proxy, at, kind: d.kind, endpoint: d.endpoint, detail: d.detail.unwrap_or_default() })
    }
}

/// Everything on the screen.
#[derive(Debug, Clone)]
pub struct Model {
    /// One per `--admin` address, in the order given.
    pub proxies: Vec<Proxy>,
    /// Recent events across proxies, newest first, at most [`EVENTS`].
    pub events: VecDeque<Event>,
    /// The poll interval, for the footer.
    pub interval: Duration,
    /// When the last poll ended, for the footer.
    pub updated: Option<SystemTime>,
}

/// One proxy's block.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    /// HOST:PORT of its admin API: the block's title until the proxy names its node.
    pub admin: String,
    /// The last answer; kept, greyed, while the proxy does not answer.
    pub snapshot: Option<Snapshot>,
    /// Success rate per address between the last two answers; absent when no attempt
    /// ended on that address in between.
    pub success: HashMap<String, f64>,
    /// Why the last poll failed; `None` once it answers.
    pub error: Option<String>,
    /// Whether its `/admin/events` stream is open. While it is not, changes seen
    /// between two polls stand in for the events.
    pub streaming: bool,
}

impl Proxy {
    /// Its node name, or its admin address until it tells one.
    pub fn label(&self) -> &str {
        self.snapshot.as_ref().and_then(|s| s.node.as_deref()).unwrap_or(&self.admin)
    }
}

impl Model {
    pub fn new(admins: impl IntoIterator<Item = String>, interval: Duration) -> Model {
        let proxies = admins.into_iter().map(|admin| Proxy { admin, ..Proxy::default() }).collect();
        Model { proxies, events: VecDeque::new(), interval, updated: None }
    }

    /// A poll of proxy `proxy` ended at `now`, with its snapshot or why it failed.
    pub fn update(&mut self, proxy: usize, polled: Result<Snapshot, String>, now: SystemTime) {
        self.updated = Some(now);
        let at = clock(now);
        let p = &mut self.proxies[proxy];
        let mut news = Vec::new();
        match polled {
            Ok(snap) => {
                if let Some(error) = p.error.take() {
                    news.push(("reachable".to_owned(), None, format!("answering again after: {error}")));
                }
                let previous = p.snapshot.take();
                p.success = success_rates(previous.as_ref(), &snap);
                if let (Some(previous), false) = (&previous, p.streaming) {
                    news.extend(changes(previous, &snap).into_iter().map(|(k, a, d)| (k.to_owned(), Some(a), d)));
                }
                p.snapshot = Some(snap);
            }
            Err(error) => {
                if p.error.is_none() {
                    news.push(("unreachable".to_owned(), None, error.clone()));
                }
                p.error = Some(error);
            }
        }
        for (kind, endpoint, detail) in news {
            self.event(Event { proxy, at: at.clone(), kind, endpoint, detail });
        }
    }

    /// An event, newest first; the oldest beyond [`EVENTS`] fall off.
    pub fn event(&mut self, e: Event) {
        self.events.push_front(e);
        self.events.truncate(EVENTS);
    }

    /// Proxy `proxy`'s event stream opened or ended.
    pub fn streaming(&mut self, proxy: usize, open: bool) {
        self.proxies[proxy].streaming = open;
    }
}

/// The share of attempts that succeeded on each address between two snapshots. An
/// address new in `now`, one whose counters went back (a restarted proxy), or one
/// without attempts in between has none.
fn success_rates(previous: Option<&Snapshot>, now: &Snapshot) -> HashMap<String, f64> {
    let Some(previous) = previous else { return HashMap::new() };
    let before: HashMap<&str, &Endpoint> = previous.endpoints.iter().map(|e| (e.address.as_str(), e)).collect();
    let rate = |ep: &Endpoint| {
        let b = before.get(ep.address.as_str())?;
        let calls = ep.calls.checked_sub(b.calls).filter(|&c| c > 0)?;
        let failures = ep.failures.checked_sub(b.failures)?.min(calls);
        Some((calls - failures) as f64 / calls as f64)
    };
    now.endpoints.iter().filter_map(|ep| Some((ep.address.clone(), rate(ep)?))).collect()
}

/// What changed between two snapshots, as `(kind, address, detail)`: endpoints added,
/// removed, and changed state. Changes that came and went between the polls are missed:
/// the event stream has those.
fn changes(previous: &Snapshot, now: &Snapshot) -> Vec<(&'static str, String, String)> {
    let before: HashMap<&str, &Endpoint> = previous.endpoints.iter().map(|e| (e.address.as_str(), e)).collect();
    let mut out = Vec::new();
    for ep in &now.endpoints {
        match before.get(ep.address.as_str()) {
            None => out.push(("added", ep.address.clone(), format!("{}, {}", ep.locality, ep.state))),
            Some(b) if b.state != ep.state => {
                let why = ep.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
                out.push(("state", ep.address.clone(), format!("{} -> {}{why}", b.state, ep.state)));
            }
            Some(_) => {}
        }
    }
    for b in &previous.endpoints {
        if !now.endpoints.iter().any(|e| e.address == b.address) {
            out.push(("removed", b.address.clone(), format!("was {}", b.state)));
        }
    }
    out
}

/// `HH:MM:SS` in UTC.
pub fn clock(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// An endpoint with the counts that matter to a test.
    pub fn ep(address: &str, locality: &str, state: &str, rps: f64, calls: u64, failures: u64) -> Endpoint {
        Endpoint {
            address: address.into(),
            locality: locality.into(),
            state: state.into(),
            protocol: Some("h2".into()),
            rps,
            calls,
            failures,
            ..Endpoint::default()
        }
    }

    pub fn snap(node: &str, endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot { node: Some(node.into()), target: "server:50051".into(), dns_error: None, endpoints }
    }

    pub fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_418_700 + secs)
    }

    #[test]
    fn parses_the_proxys_json() {
        let json = r#"{"dns_error": null, "node": "node-a", "resolved_at": "2026-11-23T07:57:28.760Z",
            "target": "server:50051", "endpoints": [{"address": "172.28.0.2:50051", "calls": 10,
            "ejections": 1, "failures": 2, "for_seconds": 5.8, "in_flight": 3, "last_error": null,
            "locality": "local", "p50_ms": 1.279, "p99_ms": null, "protocol": "h2", "rps": 1.0,
            "since": "2026-11-23T07:57:23.752Z", "state": "ready"}]}"#;
        let s = Snapshot::parse(json).unwrap();
        assert_eq!(s.node.as_deref(), Some("node-a"));
        assert_eq!(s.target, "server:50051");
        let e = &s.endpoints[0];
        assert_eq!((e.address.as_str(), e.locality.as_str(), e.state.as_str()), ("172.28.0.2:50051", "local", "ready"));
        assert_eq!((e.calls, e.failures, e.ejections, e.in_flight), (10, 2, 1, 3));
        assert_eq!((e.p50_ms, e.p99_ms, e.rps, e.protocol.as_deref()), (Some(1.279), None, 1.0, Some("h2")));
        assert!(Snapshot::parse("<html>").unwrap_err().starts_with("not /admin/endpoints JSON"));
    }

    #[test]
    fn success_rate_is_taken_from_the_change_between_polls() {
        let mut m = Model::new(["a:1".to_owned()], Duration::from_secs(1));
        m.update(0, Ok(snap("n", vec![ep("10.0.0.1:1", "local", "ready", 1.0, 100, 90)])), at(0));
        assert!(m.proxies[0].success.is_empty(), "one poll has no change to measure");
        m.update(0, Ok(snap("n", vec![ep("10.0.0.1:1", "local", "ready", 1.0, 200, 115)])), at(1));
        assert_eq!(m.proxies[0].success["10.0.0.1:1"], 0.75);
        m.update(0, Ok(snap("n", vec![ep("10.0.0.1:1", "local", "ready", 1.0, 200, 115)])), at(2));
        assert!(m.proxies[0].success.is_empty(), "no attempts in between");
        m.update(0, Ok(snap("n", vec![ep("10.0.0.1:1", "local", "ready", 1.0, 5, 0)])), at(3));
        assert!(m.proxies[0].success.is_empty(), "counters that went back (a restarted proxy)");
    }

    #[test]
    fn changes_between_polls_stand_in_for_events_until_the_stream_opens() {
        let mut m = Model::new(["a:1".to_owned()], Duration::from_secs(1));
        let one = ep("10.0.0.1:1", "local", "ready", 0.0, 0, 0);
        m.update(0, Ok(snap("n", vec![one.clone(), ep("10.0.0.2:1", "local", "ready", 0.0, 0, 0)])), at(0));
        assert!(m.events.is_empty(), "the first answer is the baseline");
        let mut failed = ep("10.0.0.2:1", "local", "failed", 0.0, 0, 0);
        failed.last_error = Some("connection refused".into());
        m.update(0, Ok(snap("n", vec![failed, ep("10.0.0.3:1", "remote", "connecting", 0.0, 0, 0)])), at(1));
        let seen: Vec<_> =
            m.events.iter().map(|e| (e.kind.as_str(), e.endpoint.as_deref(), e.detail.as_str())).collect();
        assert_eq!(
            seen,
            [
                ("removed", Some("10.0.0.1:1"), "was ready"),
                ("added", Some("10.0.0.3:1"), "remote, connecting"),
                ("state", Some("10.0.0.2:1"), "ready -> failed: connection refused"),
            ]
        );
        assert_eq!(m.events[0].at, "07:25:01");
        m.streaming(0, true);
        m.update(0, Ok(snap("n", vec![one])), at(2));
        assert_eq!(m.events.len(), 3, "the stream reports those itself");
    }

    #[test]
    fn a_failing_poll_keeps_the_last_answer_and_reports_the_change_once() {
        let mut m = Model::new(["a:1".to_owned(), "b:2".to_owned()], Duration::from_secs(1));
        m.update(1, Ok(snap("node-b", vec![ep("10.0.0.1:1", "local", "ready", 0.0, 0, 0)])), at(0));
        m.update(1, Err("connection refused".into()), at(1));
        m.update(1, Err("timed out".into()), at(2));
        let p = &m.proxies[1];
        assert_eq!(p.error.as_deref(), Some("timed out"));
        assert_eq!(p.snapshot.as_ref().unwrap().endpoints.len(), 1);
        assert_eq!(m.events.len(), 1);
        assert_eq!((m.events[0].proxy, m.events[0].kind.as_str()), (1, "unreachable"));
        m.update(1, Ok(snap("node-b", vec![ep("10.0.0.1:1", "local", "ready", 0.0, 0, 0)])), at(3));
        assert_eq!(m.proxies[1].error, None);
        assert_eq!(
            (m.events[0].kind.as_str(), m.events[0].detail.as_str()),
            ("reachable", "answering again after: timed out")
        );
        assert_eq!(m.updated, Some(at(3)));
    }

    #[test]
    fn events_from_the_stream_keep_their_time_of_day() {
        let e = Event::parse(
            1,
            r#"{"at":"2026-11-23T07:25:00.123Z","kind":"ejected","endpoint":"10.0.0.1:50051","detail":"5 failures in a row"}"#,
        )
        .unwrap();
        let want = Event {
            proxy: 1,
            at: "07:25:00".into(),
            kind: "ejected".into(),
            endpoint: Some("10.0.0.1:50051".into()),
            detail: "5 failures in a row".into(),
        };
        assert_eq!(e, want);
        let failover = Event::parse(0, r#"{"at":"x","kind":"failover","endpoint":null,"detail":null}"#).unwrap();
        assert_eq!((failover.at.as_str(), failover.endpoint, failover.detail.as_str()), ("x", None, ""));
    }

    #[test]
    fn the_event_list_is_bounded() {
        let mut m = Model::new(["a:1".to_owned()], Duration::from_secs(1));
        for i in 0..EVENTS + 5 {
            m.event(Event { proxy: 0, at: String::new(), kind: i.to_string(), endpoint: None, detail: String::new() });
        }
        assert_eq!(m.events.len(), EVENTS);
        assert_eq!(m.events[0].kind, (EVENTS + 4).to_string());
    }
}
