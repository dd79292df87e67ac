//! `--top`: causes ranked by current drop rate, redrawn every interval. On a terminal the
//! screen is redrawn in place; otherwise one line per cause per interval.
use std::{collections::HashMap, io::Write};

use super::{top, AttachInfo, ChangeRecord, DropRecord, Progress, Sink, Summary};
use crate::pipeline::CauseTotals;

/// Renders the live view; drop records themselves are not printed.
pub struct TopView<W: Write> {
    out: W,
    tty: bool,
    last: HashMap<String, u64>,
    /// Attach line, kept for the screen header.
    header: String,
    /// The latest configuration changes, shown under the table.
    changes: Vec<String>,
}

/// Changes listed under the table, at most.
const SHOWN_CHANGES: usize = 3;
/// A cause whose linked change is this recent is marked (its rate may have moved with it).
const RECENT_CHANGE_NS: u64 = 30_000_000_000;

impl<W: Write> TopView<W> {
    pub fn new(out: W, tty: bool) -> Self {
        TopView {
            out,
            tty,
            last: HashMap::new(),
            header: String::new(),
            changes: Vec::new(),
        }
    }

    /// Draws one frame from the pipeline's totals; `seconds` is the time since the last frame.
    pub fn frame(&mut self, causes: &HashMap<String, CauseTotals>, seconds: f64, lost: u64) {
        let mut rows: Vec<(&String, &CauseTotals, f64)> = causes
            .iter()
            .map(|(id, t)| {
                let before = self.last.get(id).copied().unwrap_or(0);
                (id, t, (t.count - before) as f64 / seconds.max(0.001))
            })
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.1.count.cmp(&a.1.count)));
        let now = chrono::Local::now().format("%H:%M:%S");
        let mut o = Vec::new();
        if self.tty {
            let _ = write!(
                o,
                "\x1b[H\x1b[2J{}\n{now}  lost events: {lost}\n\n",
                self.header
            );
            let _ = writeln!(
                o,
                "{:>10}  {:>10}  {:<22} top reason @ location, interface",
                "drops/s", "total", "cause"
            );
        }
        let now_ns = super::monotonic_ns();
        for (id, t, rate) in &rows {
            // A cause whose evidence names a recent change: its rate may have moved with it.
            let changed = t
                .changes
                .iter()
                .any(|c| now_ns.saturating_sub(c.ts_ns) < RECENT_CHANGE_NS);
            let id = if changed {
                format!("{id} *")
            } else {
                id.to_string()
            };
            let reason = top(t.reasons.iter().map(|(k, v)| (k, *v)), 1);
            let loc = top(t.locations.iter().map(|(k, v)| (k, *v)), 1);
            let iface = top(t.ifaces.iter().map(|(k, v)| (k, *v)), 1);
            let first = |v: &[(String, u64)]| v.first().map(|x| x.0.clone()).unwrap_or_default();
            let what = format!("{} @ {}, {}", first(&reason), first(&loc), first(&iface));
            if self.tty {
                let _ = writeln!(o, "{rate:>10.1}  {:>10}  {id:<22} {what}", t.count);
            } else {
                let _ = writeln!(o, "{now} {id} rate={rate:.1}/s total={} {what}", t.count);
            }
        }
        if rows.is_empty() && self.tty {
            let _ = writeln!(o, "{:>10}  {:>10}  no drops yet", "-", "-");
        }
        if self.tty && !self.changes.is_empty() {
            let _ = writeln!(o, "\nlatest changes (* marks a cause whose evidence names one of the last 30 s):");
            for c in &self.changes {
                let _ = writeln!(o, "  {c}");
            }
        }
        let _ = self.out.write_all(&o);
        let _ = self.out.flush();
        self.last = causes.iter().map(|(k, t)| (k.clone(), t.count)).collect();
    }
}

impl<W: Write> Sink for TopView<W> {
    fn attach(&mut self, info: &AttachInfo) {
        let probes: Vec<String> = info.probes.iter().map(ToString::to_string).collect();
        self.header = format!(
            "dropscope top on {} ({}) - Ctrl-C for the summary",
            info.kernel,
            probes.join(", ")
        );
        if !self.tty {
            let _ = writeln!(self.out, "{}", self.header);
        }
    }

    fn drop(&mut self, _record: &DropRecord) {}

    fn change(&mut self, record: &ChangeRecord) {
        let line = super::text::change_line(record, &super::Clock::new());
        if !self.tty {
            let _ = writeln!(self.out, "{line}");
        }
        if self.changes.len() >= SHOWN_CHANGES {
            self.changes.remove(0);
        }
        self.changes.push(line);
    }

    fn tick(&mut self, progress: &Progress) {
        self.frame(progress.causes, progress.seconds, progress.lost);
    }

    fn summary(&mut self, summary: &Summary) {
        // The final ranking, as the text stream prints it.
        let mut text = super::text::TextSink::new(&mut self.out, super::Clock::new(), false);
        text.summary(summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_frames_redraw_in_place_with_rates() {
        let mut causes = HashMap::new();
        causes.insert(
            "rp_filter".to_string(),
            CauseTotals {
                count: 10,
                ..Default::default()
            },
        );
        let mut buf = Vec::new();
        let mut view = TopView::new(&mut buf, true);
        view.frame(&causes, 1.0, 0);
        causes.get_mut("rp_filter").unwrap().count = 40;
        view.frame(&causes, 2.0, 0);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text.matches("\x1b[H\x1b[2J").count(),
            2,
            "one clear per frame: {text:?}"
        );
        assert!(text.contains("      10.0          10  rp_filter"), "{text}");
        assert!(
            text.contains("      15.0          40  rp_filter"),
            "rate over the last interval: {text}"
        );
    }
}
