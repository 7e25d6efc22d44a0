//! `top`: a live terminal view of the proxies, from their admin APIs. A task per proxy
//! polls `/admin/endpoints` and another follows `/admin/events`; a thread reads the
//! keys; all of it arrives as [`Msg`]s that update a pure [`Model`], redrawn by
//! [`view::render`] after each batch.
//!
//! # Layout
//! - [`model`]: the parsed JSON and the screen's state, updated by pure functions.
//! - [`view`]: `render(frame, &Model)`, tested on ratatui's `TestBackend`.
//! - [`admin`]: the HTTP/1.1 GET and the event stream, the only network IO.

mod admin;
mod model;
mod view;

use std::{
    io::IsTerminal,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use balancer::{HostPort, duration};
use clap::Args;
use http_body_util::BodyExt;
use ratatui::crossterm::event::{self, Event as Input, KeyCode, KeyEventKind, KeyModifiers};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::{UnboundedSender, unbounded_channel},
};

use self::model::{Event, Model, Snapshot, clock};

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// The proxies' admin APIs, HOST:PORT, comma-separated.
    #[arg(
        long,
        env = "CLIENT_ADMIN",
        value_delimiter = ',',
        default_value = "localhost:9901,localhost:9902",
        value_name = "HOST:PORT,..."
    )]
    pub admin: Vec<HostPort>,
    /// How often to poll each proxy's /admin/endpoints.
    #[arg(long, env = "CLIENT_TOP_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match duration::parse(s)? {
        Duration::ZERO => Err("must be more than 0".to_owned()),
        d => Ok(d),
    }
}

/// What the screen learns, from the pollers, the event streams and the keyboard.
enum Msg {
    Polled(usize, Result<Snapshot, String>),
    Streaming(usize, bool),
    Event(Event),
    Input(Input),
}

/// Leaves raw mode and the alternate screen however `run` ends; ratatui's panic hook
/// does the same on a panic.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub async fn run(a: TopArgs) -> anyhow::Result<ExitCode> {
    if !std::io::stdout().is_terminal() {
        bail!("client top needs a terminal; for JSON use curl {}/admin/endpoints", a.admin[0]);
    }
    let (tx, mut rx) = unbounded_channel();
    // A hung proxy reads as unreachable after a poll interval, and at least a second.
    let timeout = a.interval.max(Duration::from_secs(1));
    for (i, admin) in a.admin.iter().enumerate() {
        tokio::spawn(poll(i, admin.clone(), a.interval, timeout, tx.clone()));
        tokio::spawn(follow_events(i, admin.clone(), timeout, tx.clone()));
    }
    let mut model = Model::new(a.admin.iter().map(ToString::to_string), a.interval);
    let _restore = Restore;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    std::thread::spawn(move || read_input(tx));
    // Raw mode turns Ctrl-C into a key; these are `kill`s, which restore too.
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    loop {
        terminal.draw(|f| view::render(f, &model)).context("drawing")?;
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = term.recv() => None,
            _ = int.recv() => None,
        };
        let Some(msg) = msg else { break };
        // Draw once for everything that arrived together.
        let batch = std::iter::once(msg).chain(std::iter::from_fn(|| rx.try_recv().ok()));
        let mut quit = false;
        for msg in batch.collect::<Vec<_>>() {
            quit |= apply(&mut model, msg, SystemTime::now());
        }
        if quit {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Applies `msg` to the model; true when it asks to quit.
fn apply(model: &mut Model, msg: Msg, now: SystemTime) -> bool {
    match msg {
        Msg::Polled(i, polled) => model.update(i, polled, now),
        Msg::Streaming(i, open) => model.streaming(i, open),
        Msg::Event(e) => model.event(e),
        Msg::Input(input) => return quits(&input),
    }
    false
}

/// `q`, Esc or Ctrl-C (raw mode delivers it as a key, not a signal).
fn quits(input: &Input) -> bool {
    let Input::Key(k) = input else { return false };
    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
    k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
}

/// Polls `/admin/endpoints` every `interval`; a slow answer delays the next poll
/// rather than stacking them.
async fn poll(i: usize, admin: HostPort, interval: Duration, timeout: Duration, tx: UnboundedSender<Msg>) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let polled = admin::get(&admin, "/admin/endpoints", timeout).await.and_then(|b| Snapshot::parse(&b));
        if tx.send(Msg::Polled(i, polled)).is_err() {
            return;
        }
    }
}

/// Follows `/admin/events`, opening it again a second after it ends or fails.
async fn follow_events(i: usize, admin: HostPort, timeout: Duration, tx: UnboundedSender<Msg>) {
    while !tx.is_closed() {
        if let Ok(mut body) = admin::events(&admin, timeout).await {
            let _ = tx.send(Msg::Streaming(i, true));
            let mut sse = admin::Sse::default();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                for m in sse.feed(&data) {
                    if let Some(e) = event(i, m, SystemTime::now()) {
                        let _ = tx.send(Msg::Event(e));
                    }
                }
            }
            let _ = tx.send(Msg::Streaming(i, false));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The list's line for one message of proxy `i`'s stream: its events, and the notice
/// of events missed by a slow reader.
fn event(i: usize, m: admin::Message, now: SystemTime) -> Option<Event> {
    match m {
        admin::Message::Event { data, .. } => Event::parse(i, &data).ok(),
        admin::Message::Comment(c) if c.starts_with("missed") => {
            Some(Event { proxy: i, at: clock(now), kind: "missed".to_owned(), endpoint: None, detail: c })
        }
        admin::Message::Comment(_) => None,
    }
}

/// Hands the terminal's input to the screen, until the screen is gone.
fn read_input(tx: UnboundedSender<Msg>) {
    while !tx.is_closed() {
        match event::poll(Duration::from_millis(200)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let Ok(input) = event::read() else { return };
        if tx.send(Msg::Input(input)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use ratatui::crossterm::event::{KeyEvent, KeyEventState};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        top: TopArgs,
    }

    fn parse(args: &[&str]) -> Result<TopArgs, String> {
        let argv = std::iter::once("top").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.top).map_err(|e| e.to_string())
    }

    #[test]
    fn watches_both_sandbox_proxies_every_second_by_default() {
        let a = parse(&[]).unwrap();
        let admin: Vec<_> = a.admin.iter().map(ToString::to_string).collect();
        assert_eq!(admin, ["localhost:9901", "localhost:9902"]);
        assert_eq!(a.interval, Duration::from_secs(1));
        let a = parse(&["--admin", "127.0.0.1:19901", "--interval", "250ms"]).unwrap();
        assert_eq!((a.admin[0].to_string(), a.interval), ("127.0.0.1:19901".to_owned(), Duration::from_millis(250)));
    }

    #[test]
    fn a_bad_admin_address_or_interval_is_named() {
        let e = parse(&["--admin", "localhost:9901,node-b"]).unwrap_err();
        assert!(e.lines().next().unwrap().contains("invalid value 'node-b' for '--admin"), "{e}");
        let e = parse(&["--admin", "localhost:99999"]).unwrap_err();
        assert!(e.contains("'localhost:99999'") && e.contains("bad port"), "{e}");
        let e = parse(&["--interval", "0s"]).unwrap_err();
        assert!(e.contains("'0s' for '--interval") && e.contains("must be more than 0"), "{e}");
    }

    fn key(code: KeyCode, modifiers: KeyModifiers) -> Input {
        Input::Key(KeyEvent { code, modifiers, kind: KeyEventKind::Press, state: KeyEventState::NONE })
    }

    #[test]
    fn q_esc_and_ctrl_c_quit() {
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        assert!(!quits(&Input::Resize(80, 24)));
        let mut model = Model::new(["a:1".to_owned()], Duration::from_secs(1));
        assert!(apply(&mut model, Msg::Input(key(KeyCode::Char('q'), KeyModifiers::NONE)), SystemTime::UNIX_EPOCH));
    }

    #[test]
    fn a_slow_reader_is_told_what_it_missed() {
        let missed = event(1, admin::Message::Comment("missed 12 events".into()), SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!((missed.proxy, missed.kind.as_str(), missed.detail.as_str()), (1, "missed", "missed 12 events"));
        assert_eq!(event(0, admin::Message::Comment("events as they happen".into()), SystemTime::UNIX_EPOCH), None);
        let data =
            r#"{"at":"2026-11-23T07:25:00.123Z","kind":"failover","endpoint":null,"detail":"no local replica ready"}"#;
        let e = event(0, admin::Message::Event { name: "failover".into(), data: data.into() }, SystemTime::UNIX_EPOCH);
        assert_eq!(e.map(|e| e.kind), Some("failover".to_owned()));
    }
}
