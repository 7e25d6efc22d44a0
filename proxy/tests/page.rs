//! The live page on the admin API's `/`, in a real headless chromium: replica rows, their
//! states and shares, and the event log through a failover.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use support::{Cluster, Protocol, hello, tally};
use tokio::{sync::mpsc, time::Instant};

const LAYOUT: &[(&str, &str)] = &[("s1", "node-a"), ("s2", "node-a"), ("s3", "node-b")];
const CHROMIUM: &str = "/usr/bin/chromium";
const PAGE: &str = include_str!("../src/page.html");

/// Headless chromium driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: commands in on fd 3, replies out on fd 4, each ending
/// in NUL). One page stays open, so its event stream sees everything from its load on;
/// `--dump-dom` and `--virtual-time-budget` cannot wait on a page whose stream never
/// ends.
struct Browser {
    chromium: Child,
    commands: ChildStdin,
    replies: mpsc::UnboundedReceiver<Value>,
    /// The page's DevTools session, once attached.
    session: Option<String>,
    last_id: u64,
    profile: PathBuf,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "no {CHROMIUM}: the page test runs a real headless browser; `apt-get install chromium`"
        );
        let name = format!("lb-page-test-{}-{url}", std::process::id()).replace(['/', ':'], "_");
        let profile = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
        let mut chromium = Command::new("sh")
            .args(["-c", r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#, CHROMIUM])
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let out = BufReader::new(chromium.stdout.take().unwrap());
        let (tx, replies) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for msg in out.split(0) {
                let Ok(v) = serde_json::from_slice(&msg.unwrap_or_default()) else { break };
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let commands = chromium.stdin.take().unwrap();
        let mut b = Browser { chromium, commands, replies, session: None, last_id: 0, profile };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"})).await["targetId"].clone();
        let attached = b.call("Target.attachToTarget", json!({"targetId": target, "flatten": true})).await;
        b.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        b.call("Page.navigate", json!({"url": url})).await;
        b
    }

    /// Sends one command and returns its result, skipping the events in between.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.last_id += 1;
        let mut msg = json!({"id": self.last_id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.as_str().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("chromium reads its pipe");
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(10), self.replies.recv()).await;
            let Ok(Some(mut reply)) = reply else { panic!("no answer to {method} from chromium: {}", self.log()) };
            if reply["id"] == self.last_id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].take();
            }
        }
    }

    /// What the page shows, read through its test hooks.
    async fn view(&mut self) -> View {
        const READ: &str = r#"({
            rows: [...document.querySelectorAll('tr[data-endpoint]')].map((tr) => ({
                endpoint: tr.dataset.endpoint,
                state: tr.dataset.state,
                group: tr.closest('tbody').id,
                share: tr.querySelector('.share').textContent,
            })),
            groups: [...document.querySelectorAll('tbody')].filter((b) => b.rows.length > 0).map((b) => b.rows[0].textContent),
            events: [...document.querySelectorAll('ol#events > li')].map((li) => ({
                kind: li.dataset.kind,
                endpoint: li.querySelector('code').textContent,
            })),
            status: document.getElementById('status').textContent,
        })"#;
        let r = self.call("Runtime.evaluate", json!({"expression": READ, "returnByValue": true})).await;
        let v = &r["result"]["value"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        View {
            rows: rows
                .iter()
                .map(|r| {
                    let share = r["share"].as_str().and_then(|s| s.strip_suffix('%')?.parse().ok());
                    let row = Row { state: text(&r["state"]), group: text(&r["group"]), share };
                    (text(&r["endpoint"]), row)
                })
                .collect(),
            groups: v["groups"].as_array().into_iter().flatten().map(text).collect(),
            events: v["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (text(&e["kind"]), text(&e["endpoint"])))
                .collect(),
            status: text(&v["status"]),
        }
    }

    /// Reads the page until `ok` holds, or panics after 20 s with what it showed.
    async fn wait_until(&mut self, what: &str, ok: impl Fn(&View) -> bool) -> View {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.view().await;
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < until, "the page never showed {what} in 20 s; it shows {v:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.chromium.kill();
        let _ = self.chromium.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[derive(Debug)]
struct View {
    /// By address.
    rows: BTreeMap<String, Row>,
    /// The first line of each group: its title.
    groups: Vec<String>,
    /// Kind and endpoint, as listed: newest first.
    events: Vec<(String, String)>,
    status: String,
}

#[derive(Debug)]
struct Row {
    state: String,
    /// `local` or `remote`: the group the row is in.
    group: String,
    /// The share of traffic shown, in percent.
    share: Option<u32>,
}

impl View {
    fn row(&self, addr: &str) -> &Row {
        &self.rows[addr]
    }

    fn has_rows(&self, addrs: &[String]) -> bool {
        addrs.iter().all(|a| self.rows.contains_key(a))
    }

    /// Where the newest event of `kind` (for `endpoint`, or any) is in the log.
    fn event(&self, kind: &str, endpoint: &str) -> Option<usize> {
        self.events.iter().position(|(k, e)| k == kind && (endpoint.is_empty() || e == endpoint))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shows_each_replica_its_share_and_a_failover() {
    let mut c = Cluster::start(Protocol::H2, LAYOUT, &["--node", "node-a"]).await;
    c.wait_for(&["s1", "s2"]).await;
    let (counts, failures) = tally(&mut c.client().await, 40).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.values().collect::<Vec<_>>(), [&20, &20], "{counts:?}");
    let all = ["s1", "s2", "s3"].map(|n| c.addr_of(n).to_string());
    let [s1, s2, s3] = all.clone();

    let mut page = Browser::open(&format!("http://{}/", c.admin())).await;
    let ready = |v: &View| v.has_rows(&all) && all.iter().all(|a| v.row(a).state == "ready");
    let v = page.wait_until("three ready replicas", ready).await;
    assert_eq!(v.status, "live");
    assert_eq!(v.groups.len(), 2);
    assert!(v.groups[0].starts_with("node-a (this node)") && v.groups[1].starts_with("other nodes"), "{v:?}");
    // The last ten seconds hold these calls and the few of `wait_for`, alternating.
    for a in [&s1, &s2] {
        assert_eq!(v.row(a).group, "local", "{v:?}");
        assert!(v.row(a).share.is_some_and(|s| s.abs_diff(50) <= 2), "{a} takes half: {v:?}");
    }
    assert_eq!((v.row(&s3).group.as_str(), v.row(&s3).share), ("remote", Some(0)), "{v:?}");

    c.kill("s1");
    c.kill("s2");
    let client = c.client().await;
    let traffic = tokio::spawn(async move {
        let mut client = client;
        loop {
            let _ = client.say_hello(hello()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // s3 takes every call once s1's and s2's calls have left the ten-second window.
    let v = page
        .wait_until("the failover and s3 taking every call", |v| {
            v.event("failover", "").is_some() && v.row(&s3).share == Some(100)
        })
        .await;
    traffic.abort();
    for a in [&s1, &s2] {
        let row = v.row(a);
        assert!(matches!(row.state.as_str(), "failed" | "connecting"), "{a} down: {v:?}");
        assert_eq!((row.group.as_str(), row.share), ("local", Some(0)), "{v:?}");
        let left = v.event("state", a).expect("s1 and s2 leaving ready are logged");
        assert!(v.event("failover", "") < Some(left), "newest first: {v:?}");
    }
    assert_eq!((v.row(&s3).state.as_str(), v.row(&s3).group.as_str()), ("ready", "remote"));
}

#[test]
fn the_page_fetches_nothing_elsewhere_and_never_parses_data_as_html() {
    for word in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "<link", "src=", "@import"]
    {
        assert!(!PAGE.contains(word), "the page uses {word}");
    }
    let urls = PAGE.matches("://").count();
    assert!(urls == 1 && PAGE.contains("'http://www.w3.org/2000/svg'"), "the only URL is the SVG namespace");
    assert!(PAGE.contains("new EventSource('/admin/events?snapshots=1')"));
}

/// Not a check: a PNG of the page under steady traffic through kills and a restart, for the
/// README (`cargo test -p proxy --test page -- --ignored`; the path is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn screenshot_for_the_readme() {
    let mut c = Cluster::start(Protocol::H2, LAYOUT, &["--node", "node-a"]).await;
    c.wait_for(&["s1", "s2"]).await;
    let client = c.client().await;
    let traffic = tokio::spawn(async move {
        let mut client = client;
        loop {
            let _ = client.say_hello(hello()).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let out = std::env::temp_dir().join("proxy-page.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/page_screenshot.sh");
    let shot = Command::new(script).arg(format!("http://{}/", c.admin())).arg(&out).arg("24").spawn().unwrap();
    // Taken while s1 is still down: a failed row with its error, the failover and back.
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.kill("s2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.kill("s1");
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.restart("s2");
    let status = tokio::task::spawn_blocking(move || shot.wait_with_output()).await.unwrap().unwrap().status;
    traffic.abort();
    assert!(status.success());
    eprintln!("screenshot: {}", out.display());
}
