//! Summaries: latency percentiles, calls per replica and node, plain-text tables.

use std::{collections::BTreeMap, fmt::Write, time::Duration};

/// Latencies of successful calls, in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        self.0.push(d.as_micros() as u64);
    }

    /// How many took longer than `limit`.
    pub fn over(&self, limit: Duration) -> usize {
        let limit = limit.as_micros() as u64;
        self.0.iter().filter(|&&us| us > limit).count()
    }

    /// The `q` quantile (0.0..=1.0) by nearest rank, in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1] as f64 / 1000.0
    }
}

/// A replica as seen in replies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Replica {
    pub server: String,
    pub node: String,
}

/// A plain-text table, two spaces between columns; columns of numbers align right.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    let mut numeric = vec![!rows.is_empty(); header.len()];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(header.len()) {
            widths[i] = widths[i].max(cell.chars().count());
            numeric[i] &= cell.starts_with(|c: char| c.is_ascii_digit() || c == '-');
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        for (i, cell) in cells.enumerate() {
            let (w, sep) = (widths[i], if i == 0 { "" } else { "  " });
            let _ = if numeric[i] { write!(out, "{sep}{cell:>w$}") } else { write!(out, "{sep}{cell:<w$}") };
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &mut rule.iter().map(String::as_str));
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 { "-".to_owned() } else { format!("{:.1}%", 100.0 * part as f64 / whole as f64) }
}

/// Calls per node, from calls per replica.
pub fn per_node(per_replica: &BTreeMap<Replica, u64>) -> BTreeMap<String, u64> {
    let mut nodes = BTreeMap::new();
    for (r, n) in per_replica {
        *nodes.entry(r.node.clone()).or_default() += n;
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.quantile_ms(0.5), 50.0);
        assert_eq!(l.quantile_ms(0.99), 99.0);
        assert_eq!(l.quantile_ms(1.0), 100.0);
        assert_eq!(Latencies::default().quantile_ms(0.5), 0.0);
    }

    #[test]
    fn tables_align() {
        let t = table(&["replica", "calls"], &[vec!["server1".into(), "5".into()], vec!["s2".into(), "100".into()]]);
        assert_eq!(t, "replica  calls\n-------  -----\nserver1      5\ns2         100\n");
        let t = table(&["a", "node"], &[vec!["x".into(), "node-a".into()]]);
        assert_eq!(t, "a  node\n-  ------\nx  node-a\n");
    }
}
