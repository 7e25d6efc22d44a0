//! Draws a [`Model`]: a block per proxy with a row per endpoint, the recent events,
//! a footer. Pure: the same model draws the same screen, which the tests read back
//! from ratatui's `TestBackend`.

use std::time::Duration;

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table},
};

use super::model::{Endpoint, Model, Proxy, clock};

/// Columns of the share bar, before its percentage.
const BAR: usize = 10;
/// The longest last error drawn; the column clips it further on a narrow screen.
const ERROR_CHARS: usize = 80;

pub fn render(frame: &mut Frame, model: &Model) {
    let heights = model.proxies.iter().map(|p| Constraint::Length(height(p)));
    let constraints: Vec<_> = heights.chain([Constraint::Min(3), Constraint::Length(1)]).collect();
    let areas = Layout::vertical(constraints).split(frame.area());
    let n = model.proxies.len();
    for (p, area) in model.proxies.iter().zip(areas.iter()) {
        render_proxy(frame, *area, p);
    }
    render_events(frame, areas[n], model);
    frame.render_widget(Paragraph::new(footer(model)), areas[n + 1]);
}

/// Borders, then the header and a line per endpoint, or a line saying why there are none.
fn height(p: &Proxy) -> u16 {
    match p.snapshot.as_ref().map_or(0, |s| s.endpoints.len()) {
        0 => 3,
        rows => 3 + rows as u16,
    }
}

fn render_proxy(frame: &mut Frame, area: Rect, p: &Proxy) {
    let block = Block::bordered().title(title(p));
    let grey = p.error.is_some();
    let Some(snap) = p.snapshot.as_ref().filter(|s| !s.endpoints.is_empty()) else {
        let text = match (&p.snapshot, grey) {
            (Some(s), _) => format!("no endpoints for {}", s.target),
            (None, true) => "no answer yet".to_owned(),
            (None, false) => "waiting for the first answer".to_owned(),
        };
        frame.render_widget(Paragraph::new(text).style(Style::new().fg(Color::DarkGray)).block(block), area);
        return;
    };
    let mut endpoints: Vec<&Endpoint> = snap.endpoints.iter().collect();
    // This node's first, then this zone's, then the rest.
    endpoints.sort_by_key(|e| match e.locality.as_str() {
        "local" => 0,
        "zone" => 1,
        _ => 2,
    });
    let total: f64 = endpoints.iter().map(|e| e.rps).sum();
    let rows = endpoints.iter().map(|e| {
        let share = if total > 0.0 { e.rps / total } else { 0.0 };
        row(e, share, p.success.get(&e.address).copied(), grey)
    });
    let address = endpoints.iter().map(|e| e.address.len()).max().unwrap_or(0).max(7) as u16;
    let widths = [address, 8, 10, 5, BAR as u16 + 5, 7, 6, 7, 7, 4, 3, 8].map(Constraint::Length);
    let header = [
        "ADDRESS",
        "LOCALITY",
        "STATE",
        "PROTO",
        "SHARE",
        "RPS",
        "OK",
        "P50",
        "P99",
        "INFL",
        "EJ",
        "IN STATE",
        "LAST ERROR",
    ];
    let header = Row::new(header).style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows, widths.into_iter().chain([Constraint::Fill(1)]))
        .header(header)
        .column_spacing(1)
        .block(block)
        .style(if grey { Style::new().fg(Color::DarkGray) } else { Style::new() });
    frame.render_widget(table, area);
}

/// `node-a  localhost:9901 → server:50051`, then the DNS error and the poll's error.
fn title(p: &Proxy) -> Line<'static> {
    let mut spans = vec![Span::styled(format!(" {} ", p.label()), Style::new().add_modifier(Modifier::BOLD))];
    if let Some(s) = &p.snapshot {
        if s.node.is_some() {
            spans.push(Span::raw(format!("{} ", p.admin)));
        }
        spans.push(Span::raw(format!("→ {} ", s.target)));
        if let Some(e) = &s.dns_error {
            spans.push(Span::styled(format!(" dns: {} ", one_line(e, ERROR_CHARS)), Style::new().fg(Color::Yellow)));
        }
    }
    if let Some(e) = &p.error {
        let style = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
        spans.push(Span::styled(format!(" unreachable: {} ", one_line(e, ERROR_CHARS)), style));
    }
    Line::from(spans)
}

fn row(e: &Endpoint, share: f64, success: Option<f64>, grey: bool) -> Row<'static> {
    // Greyed rows take the table's grey: no colour of their own.
    let colour = |c: Color| if grey { Style::new() } else { Style::new().fg(c) };
    let share = Line::from(vec![
        Span::styled(bar(share, BAR), colour(Color::Cyan)),
        Span::raw(format!(" {:>3.0}%", share * 100.0)),
    ]);
    let success = success.map_or_else(|| "-".to_owned(), |s| format!("{:.1}%", s * 100.0));
    let error = e.last_error.as_deref().map_or_else(String::new, |s| one_line(s, ERROR_CHARS));
    Row::new([
        Cell::from(e.address.clone()),
        Cell::from(e.locality.clone()),
        Cell::from(e.state.clone()).style(colour(state_colour(&e.state))),
        Cell::from(e.protocol.clone().unwrap_or_else(|| "-".to_owned())),
        Cell::from(share),
        Cell::from(format!("{:.1}", e.rps)),
        Cell::from(success),
        Cell::from(millis(e.p50_ms)),
        Cell::from(millis(e.p99_ms)),
        Cell::from(e.in_flight.to_string()),
        Cell::from(e.ejections.to_string()),
        Cell::from(span(e.for_seconds)),
        Cell::from(error).style(colour(Color::LightRed)),
    ])
}

fn state_colour(state: &str) -> Color {
    match state {
        "ready" => Color::Green,
        "connecting" => Color::Yellow,
        "draining" => Color::Blue,
        "ejected" => Color::Magenta,
        "failed" | "unhealthy" => Color::Red,
        _ => Color::Reset,
    }
}

fn render_events(frame: &mut Frame, area: Rect, model: &Model) {
    let sources: Vec<String> = model
        .proxies
        .iter()
        .map(|p| format!("{}: {}", p.label(), if p.streaming { "live" } else { "from polls" }))
        .collect();
    let title = format!(" events, newest first ({}) ", sources.join(", "));
    let label = model.proxies.iter().map(|p| p.label().len()).max().unwrap_or(0);
    if model.events.is_empty() {
        let none = Paragraph::new("none yet: changes show here as they happen").style(Style::new().fg(Color::DarkGray));
        frame.render_widget(none.block(Block::bordered().title(title)), area);
        return;
    }
    let lines: Vec<Line> = model
        .events
        .iter()
        .take(usize::from(area.height.saturating_sub(2)))
        .map(|e| {
            let proxy = model.proxies.get(e.proxy).map_or("?", Proxy::label);
            Line::from(vec![
                Span::styled(format!("{} ", e.at), Style::new().fg(Color::DarkGray)),
                Span::raw(format!("{proxy:<label$} ")),
                Span::styled(format!("{:<11} ", e.kind), Style::new().fg(event_colour(&e.kind))),
                Span::raw(format!("{:<21} ", e.endpoint.as_deref().unwrap_or(""))),
                Span::raw(one_line(&e.detail, 200)),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(title)), area);
}

fn event_colour(kind: &str) -> Color {
    match kind {
        "added" | "returned" | "failback" | "reachable" => Color::Green,
        "removed" | "goaway" | "terminating" | "state" => Color::Yellow,
        "ejected" | "failover" | "throttle" | "unreachable" | "missed" => Color::Red,
        _ => Color::Reset,
    }
}

fn footer(model: &Model) -> Line<'static> {
    let updated = model.updated.map_or_else(|| "never".to_owned(), |t| format!("{} UTC", clock(t)));
    Line::from(vec![
        Span::styled(" q", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(" quit   refresh {}   updated {updated}", interval(model.interval))),
    ])
}

/// A bar `width` columns wide filled to `share` (0 to 1), in eighths of a column.
pub fn bar(share: f64, width: usize) -> String {
    const PARTS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (share.clamp(0.0, 1.0) * (width * 8) as f64).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    if let part @ 1.. = eighths % 8 {
        s.push(PARTS[part]);
    }
    let used = s.chars().count();
    s + &" ".repeat(width - used)
}

fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

/// `42s`, `3m07s`, `2h05m`, `4d03h`.
fn span(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn interval(d: Duration) -> String {
    match (d.as_secs(), d.subsec_millis()) {
        (s, 0) => format!("{s}s"),
        (0, ms) => format!("{ms}ms"),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// `s` on one line, cut to `max` characters with an ellipsis.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        return flat;
    }
    flat.chars().take(max - 1).chain(['…']).collect()
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::top::model::{
        Event,
        tests::{at, ep, snap},
    };

    fn draw(model: &Model) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(160, 30)).unwrap();
        terminal.draw(|f| render(f, model)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn lines(buf: &Buffer) -> Vec<String> {
        let width = buf.area.width as usize;
        let symbols: Vec<&str> = buf.content.iter().map(|c| c.symbol()).collect();
        symbols.chunks(width).map(|l| l.concat()).collect()
    }

    /// The screen line showing `needle`, and its row number.
    fn line_with(buf: &Buffer, needle: &str) -> (usize, String) {
        let lines = lines(buf);
        let found = lines.iter().position(|l| l.contains(needle));
        let y = found.unwrap_or_else(|| panic!("{needle:?} not on the screen:\n{}", lines.join("\n")));
        (y, lines[y].clone())
    }

    /// The style of the first cell of `needle` on the screen.
    fn style_of(buf: &Buffer, needle: &str) -> Style {
        let (y, line) = line_with(buf, needle);
        let x = line[..line.find(needle).unwrap()].chars().count();
        buf[(x as u16, y as u16)].style()
    }

    /// node-a after two polls a second apart: .1 remote, .2 and .3 local; .2 had 100
    /// attempts with 25 failures in between, .3 had 50 with none.
    fn two_polls() -> Model {
        let mut m = Model::new(["localhost:9901".to_owned(), "localhost:9902".to_owned()], Duration::from_secs(1));
        let first = vec![
            ep("10.0.0.1:50051", "remote", "ready", 0.0, 0, 0),
            ep("10.0.0.2:50051", "local", "ready", 10.0, 100, 0),
            ep("10.0.0.3:50051", "local", "connecting", 10.0, 100, 0),
        ];
        m.update(0, Ok(snap("node-a", first)), at(0));
        let mut second = vec![
            ep("10.0.0.1:50051", "remote", "ready", 0.0, 0, 0),
            ep("10.0.0.2:50051", "local", "ready", 30.0, 200, 25),
            ep("10.0.0.3:50051", "local", "draining", 10.0, 150, 0),
        ];
        second[2].last_error = Some("GOAWAY from the replica".into());
        second[1].p50_ms = Some(0.84);
        second[1].p99_ms = Some(21.2);
        m.update(0, Ok(snap("node-a", second)), at(1));
        m
    }

    #[test]
    fn each_endpoint_shows_its_state_share_and_success_since_the_last_poll() {
        let buf = draw(&two_polls());
        let (_, a) = line_with(&buf, "10.0.0.2:50051");
        for cell in ["local", "ready", "h2", "███████▌ ", "75%", "30.0", "75.0%", "0.8ms", "21ms"] {
            assert!(a.contains(cell), "{cell:?} missing from {a:?}");
        }
        let (_, b) = line_with(&buf, "10.0.0.3:50051");
        for cell in ["draining", "██▌ ", "25%", "10.0", "100.0%", "GOAWAY from the replica"] {
            assert!(b.contains(cell), "{cell:?} missing from {b:?}");
        }
        let (_, c) = line_with(&buf, "10.0.0.1:50051");
        assert!(c.contains("remote") && c.contains("  0%") && c.contains(" - "), "{c:?}");
    }

    #[test]
    fn local_endpoints_come_first() {
        let buf = draw(&two_polls());
        let y = |a| line_with(&buf, a).0;
        assert!(y("10.0.0.2:50051") < y("10.0.0.1:50051") && y("10.0.0.3:50051") < y("10.0.0.1:50051"));
    }

    #[test]
    fn states_are_coloured() {
        let buf = draw(&two_polls());
        assert_eq!(style_of(&buf, "ready").fg, Some(Color::Green));
        assert_eq!(style_of(&buf, "draining").fg, Some(Color::Blue));
    }

    #[test]
    fn the_title_names_the_node_its_admin_address_and_target() {
        let (_, title) = line_with(&draw(&two_polls()), "node-a");
        assert!(title.contains("node-a localhost:9901 → server:50051"), "{title:?}");
        let (_, waiting) = line_with(&draw(&two_polls()), "localhost:9902");
        assert!(!waiting.contains('→'), "{waiting:?}");
        line_with(&draw(&two_polls()), "waiting for the first answer");
    }

    #[test]
    fn an_unreachable_proxy_shows_its_error_and_greys_its_last_answer() {
        let mut m = two_polls();
        m.update(0, Err("connecting to localhost:9901: Connection refused (os error 111)".into()), at(2));
        m.update(1, Err("timed out after 1s".into()), at(2));
        let buf = draw(&m);
        let (_, title) = line_with(&buf, "node-a");
        assert!(title.contains("unreachable: connecting to localhost:9901: Connection refused"), "{title:?}");
        assert_eq!(style_of(&buf, "unreachable: connecting").fg, Some(Color::Red));
        assert_eq!(style_of(&buf, "10.0.0.2:50051").fg, Some(Color::DarkGray));
        assert_eq!(style_of(&buf, "ready").fg, Some(Color::DarkGray), "no colour of its own while greyed");
        line_with(&buf, "75.0%");
        let (_, b) = line_with(&buf, "localhost:9902");
        assert!(b.contains("unreachable: timed out after 1s"), "{b:?}");
        line_with(&buf, "no answer yet");
    }

    #[test]
    fn events_are_listed_newest_first_with_their_proxy() {
        let mut m = two_polls();
        m.update(1, Ok(snap("node-b", vec![ep("10.0.0.9:50051", "local", "ready", 0.0, 0, 0)])), at(1));
        m.streaming(1, true);
        let event = |kind: &str, detail: &str| Event {
            proxy: 1,
            at: "07:25:03".into(),
            kind: kind.into(),
            endpoint: Some("10.0.0.9:50051".into()),
            detail: detail.into(),
        };
        m.event(event("ejected", "5 failures in a row"));
        m.event(event("returned", "ejection over"));
        let buf = draw(&m);
        let (title, _) = line_with(&buf, "events, newest first (node-a: from polls, node-b: live)");
        let (returned, line) = line_with(&buf, "returned");
        assert!(line.contains("07:25:03 node-b returned    10.0.0.9:50051        ejection over"), "{line:?}");
        let (ejected, _) = line_with(&buf, "5 failures in a row");
        let (state, line) = line_with(&buf, "connecting -> draining");
        assert!(line.contains("07:25:01 node-a state"), "{line:?}");
        assert!(title < returned && returned < ejected && ejected < state);
    }

    #[test]
    fn before_any_answer_a_proxy_takes_three_lines_and_no_events_are_listed() {
        let m = Model::new(["localhost:9901".to_owned()], Duration::from_secs(1));
        let buf = draw(&m);
        assert_eq!(line_with(&buf, "localhost:9901").0, 0);
        assert_eq!(line_with(&buf, "waiting for the first answer").0, 1);
        assert_eq!(line_with(&buf, "events, newest first").0, 3);
        assert_eq!(line_with(&buf, "none yet: changes show here as they happen").0, 4);
    }

    #[test]
    fn the_footer_shows_how_to_quit_the_interval_and_the_last_update() {
        let (y, line) = line_with(&draw(&two_polls()), " q quit");
        assert_eq!(y, 29, "the last line");
        assert!(line.contains("refresh 1s") && line.contains("updated 07:25:01 UTC"), "{line:?}");
    }

    #[test]
    fn bars_fill_in_eighths() {
        assert_eq!(bar(0.0, 4), "    ");
        assert_eq!(bar(0.5, 4), "██  ");
        assert_eq!(bar(1.0, 4), "████");
        assert_eq!(bar(1.0 / 32.0, 4), "▏   ");
        assert_eq!(bar(0.3, 4), "█▎  ");
        assert_eq!(bar(2.0, 4), "████");
    }

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(
            [span(0.4), span(59.9), span(187.0), span(7500.0), span(270_000.0)],
            ["0s", "59s", "3m07s", "2h05m", "3d03h"]
        );
        assert_eq!([millis(None), millis(Some(0.84)), millis(Some(21.2))], ["-", "0.8ms", "21ms"]);
        let ms = Duration::from_millis;
        assert_eq!([interval(ms(1000)), interval(ms(250)), interval(ms(1500))], ["1s", "250ms", "1.5s"]);
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
