//! `client top` as a user runs it: the real binary in a tmux pane against an admin API
//! that serves canned `/admin/endpoints` answers and one event on `/admin/events`.
//! The tests that need tmux fail when it is missing, saying how to install it.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_client");

/// The proxy's answer on its `n`th poll: .3 gains 100 calls with 10 failures a poll.
fn endpoints(n: u64) -> String {
    let ep = |address: &str, locality: &str, calls: u64, failures: u64| {
        format!(
            r#"{{"address": "{address}", "locality": "{locality}", "state": "ready", "protocol": "h2",
            "since": "2026-11-23T07:25:00.000Z", "for_seconds": 75.0, "last_error": null, "in_flight": 2,
            "rps": {rps}, "p50_ms": 0.8, "p99_ms": 2.1, "calls": {calls}, "failures": {failures}, "ejections": 0}}"#,
            rps = if locality == "local" { 10.0 } else { 0.0 }
        )
    };
    let list = [
        ep("10.1.2.5:50051", "remote", 0, 0),
        ep("10.1.2.3:50051", "local", 100 * n, 10 * n),
        ep("10.1.2.4:50051", "local", 100 * n, 0),
    ];
    format!(
        r#"{{"node": "node-t", "target": "server:50051", "resolved_at": null, "dns_error": null, "endpoints": [{}]}}"#,
        list.join(",")
    )
}

const EVENT: &str = concat!(
    "event: ejected\n",
    r#"data: {"at":"2026-11-23T07:25:03.000Z","kind":"ejected","endpoint":"10.1.2.5:50051","detail":"5 failures in a row"}"#,
    "\n\n"
);

/// An admin API on 127.0.0.1: `/admin/endpoints` answers [`endpoints`], counting the
/// polls; `/admin/events` sends [`EVENT`] and stays open.
async fn admin_api() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let polls = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(answer(tcp, polls.clone()));
        }
    });
    port
}

async fn answer(mut tcp: TcpStream, polls: Arc<AtomicU64>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"GET /admin/events ") {
        let start = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
        let _ = tcp.write_all(format!("{start}: events as they happen\n\n{EVENT}").as_bytes()).await;
        // Held open like the proxy's stream, until the client goes.
        let _ = tcp.read(&mut [0; 1]).await;
        return;
    }
    let body = endpoints(polls.fetch_add(1, Ordering::Relaxed) + 1);
    let resp =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = tcp.write_all(resp.as_bytes()).await;
}

/// A tmux server of this test's own, killed with it.
struct Tmux(String);

impl Tmux {
    fn start(name: &str) -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(found.is_ok(), "these tests run client top in tmux: apt-get install tmux");
        Tmux(format!("client-{name}-{}", std::process::id()))
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux").args(["-f", "/dev/null", "-L", &self.0]).args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn screen(&self) -> String {
        String::from_utf8(self.run(&["capture-pane", "-p"]).stdout).unwrap()
    }

    /// The screen once it shows every one of `wanted`, or a panic with the screen
    /// after 10 s.
    async fn wait_for(&self, wanted: &[&str]) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.screen();
            if wanted.iter().all(|w| screen.contains(w)) {
                return screen;
            }
            let missing: Vec<_> = wanted.iter().filter(|w| !screen.contains(**w)).collect();
            assert!(Instant::now() < until, "{missing:?} not on the screen after 10 s:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.0, "kill-server"]).output();
    }
}

/// Waits up to 5 s for `file` to hold the exit code the pane's shell wrote.
async fn exit_code(file: &PathBuf) -> Option<String> {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(code) = std::fs::read_to_string(file)
            && code.ends_with('\n')
        {
            return Some(code.trim().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn line<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle:?}:\n{screen}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shows_each_endpoint_and_the_events_and_quits_on_q() {
    let tmux = Tmux::start("top");
    let port = admin_api().await;
    let exited = std::env::temp_dir().join(format!("client-top-exit-{}", std::process::id()));
    let _ = std::fs::remove_file(&exited);
    let cmd = format!("'{CLIENT}' top --admin 127.0.0.1:{port} --interval 200ms; echo $? > '{}'", exited.display());
    tmux.run(&["new-session", "-d", "-x", "160", "-y", "40", &cmd]);

    let screen = tmux.wait_for(&["node-t 127.0.0.1:", "90.0%", "5 failures in a row", "node-t: live"]).await;
    assert!(line(&screen, "node-t 127.0.0.1:").contains("→ server:50051"), "{screen}");
    let local = line(&screen, "10.1.2.3:50051");
    for cell in ["local", "ready", "h2", " 50%", "10.0", "90.0%", "0.8ms", "2.1ms", "1m15s"] {
        assert!(local.contains(cell), "{cell:?} not in {local:?}");
    }
    let other = line(&screen, "10.1.2.4:50051");
    assert!(other.contains(" 50%") && other.contains("100.0%"), "{other:?}");
    let remote = line(&screen, "10.1.2.5:50051");
    assert!(remote.contains("remote") && remote.contains("  0%"), "{remote:?}");
    let rows: Vec<_> = ["10.1.2.3:50051", "10.1.2.4:50051", "10.1.2.5:50051"]
        .map(|a| screen.lines().position(|l| l.contains(a)).unwrap())
        .into();
    assert!(rows.is_sorted(), "local first: {screen}");
    assert!(line(&screen, "5 failures in a row").contains("07:25:03 node-t ejected"), "{screen}");
    assert!(screen.contains(" q quit   refresh 200ms   updated "), "{screen}");

    tmux.run(&["send-keys", "q"]);
    let code = exit_code(&exited).await;
    let _ = std::fs::remove_file(&exited);
    assert_eq!(code.as_deref(), Some("0"), "client top did not exit on q");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_does_not_answer_is_shown_unreachable() {
    let tmux = Tmux::start("top-down");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cmd = format!("'{CLIENT}' top --admin 127.0.0.1:{port}");
    tmux.run(&["new-session", "-d", "-x", "160", "-y", "40", &cmd]);
    let screen = tmux.wait_for(&["unreachable: connecting: Connection refused", "no answer yet"]).await;
    assert!(line(&screen, "unreachable").contains(&format!("127.0.0.1:{port}")), "{screen}");
}

#[test]
fn without_a_terminal_it_says_how_to_get_the_json() {
    let out = Command::new(CLIENT).args(["top", "--admin", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err, "error: client top needs a terminal; for JSON use curl 127.0.0.1:1/admin/endpoints\n");
}

#[test]
fn a_bad_admin_address_is_named() {
    let out = Command::new(CLIENT).args(["top", "--admin", "localhost:9901,node-b"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    let first = err.lines().next().unwrap();
    assert_eq!(
        first,
        r#"error: invalid value 'node-b' for '--admin <HOST:PORT,...>': expected HOST:PORT, got "node-b""#
    );
}
