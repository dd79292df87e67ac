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
    /// Screen header: what runs where, and how the probes attached (condensed as on the
    /// start-up line).
    header: Vec<String>,
    /// Columns and rows, when fixed (tests); otherwise the terminal's, read for every frame.
    screen: Option<(usize, usize)>,
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
            header: Vec::new(),
            screen: None,
            changes: Vec::new(),
        }
    }

    /// Columns and rows to draw in.
    fn screen(&self) -> (usize, usize) {
        self.screen.or_else(terminal_size).unwrap_or((80, 24))
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
        let now_ns = super::monotonic_ns();
        let lines_of = |(id, t, rate): &(&String, &CauseTotals, f64)| {
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
            (id, *rate, t.count, what)
        };
        let mut o = Vec::new();
        if !self.tty {
            for row in &rows {
                let (id, rate, count, what) = lines_of(row);
                let _ = writeln!(o, "{now} {id} rate={rate:.1}/s total={count} {what}");
            }
        } else {
            // One screen: the header, the table and the latest changes, every line cut to the
            // width, as many rows as fit (the last line says how many did not).
            let (columns, height) = self.screen();
            let mut screen: Vec<String> = self.header.clone();
            screen.push(format!("{now}  lost events: {lost}"));
            screen.push(String::new());
            screen.push(format!(
                "{:>10}  {:>10}  {:<22} top reason @ location, interface",
                "drops/s", "total", "cause"
            ));
            let mut tail = Vec::new();
            if !self.changes.is_empty() {
                tail.push(String::new());
                tail.push(
                    "latest changes (* marks a cause whose evidence names one of the last 30 s):"
                        .to_string(),
                );
                tail.extend(self.changes.iter().map(|c| format!("  {c}")));
            }
            let room = height.saturating_sub(screen.len() + tail.len()).max(2);
            let shown = if rows.len() > room {
                room - 1
            } else {
                rows.len()
            };
            for row in rows.iter().take(shown) {
                let (id, rate, count, what) = lines_of(row);
                screen.push(format!("{rate:>10.1}  {count:>10}  {id:<22} {what}"));
            }
            if rows.is_empty() {
                screen.push(format!("{:>10}  {:>10}  no drops yet", "-", "-"));
            }
            if shown < rows.len() {
                screen.push(format!(
                    "{:>10}  {:>10}  ... and {} more causes (Ctrl-C for the summary)",
                    "",
                    "",
                    rows.len() - shown
                ));
            }
            screen.extend(tail);
            let fitted: Vec<String> = screen.iter().map(|l| fit(l, columns)).collect();
            let _ = write!(o, "\x1b[H\x1b[2J{}", fitted.join("\n"));
        }
        let _ = self.out.write_all(&o);
        let _ = self.out.flush();
        self.last = causes.iter().map(|(k, t)| (k.clone(), t.count)).collect();
    }
}

impl<W: Write> Sink for TopView<W> {
    fn attach(&mut self, info: &AttachInfo) {
        self.header = vec![
            format!("dropscope top on {} - Ctrl-C for the summary", info.kernel),
            format!("probes: {}", super::text::probe_summary(&info.probes)),
        ];
        if !self.tty {
            let _ = writeln!(self.out, "{}", self.header.join("; "));
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

/// `line` cut to `columns` characters, an ellipsis marking the cut.
fn fit(line: &str, columns: usize) -> String {
    if line.chars().count() <= columns {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(columns.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The terminal's columns and rows (stdout's), if it is one.
fn terminal_size() -> Option<(usize, usize)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct it is given.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then(|| (ws.ws_col.into(), ws.ws_row.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::attach::Attached;

    /// The probes of a kernel with lockdown and no kprobes: every context probe refused.
    fn lockdown_probes() -> Vec<Attached> {
        let note = "fentry: refused by the kernel (EPERM); kprobe: this kernel has no kprobes \
                    (CONFIG_KPROBES off)";
        let mut probes: Vec<Attached> = ["kfree_skb", "icmp_send", "tcp_send_reset"]
            .into_iter()
            .map(|probe| Attached {
                probe,
                mode: "tp_btf",
                note: None,
            })
            .collect();
        for probe in [
            "nf_hook_slow",
            "ip_forward",
            "ip_error",
            "nft_do_chain",
            "ipt_do_table",
            "icmp6_send",
        ] {
            probes.push(Attached {
                probe,
                mode: "unavailable",
                note: Some(note.into()),
            });
        }
        probes
    }

    #[test]
    fn the_frame_fits_one_screen_whatever_the_probes_and_causes() {
        let mut buf = Vec::new();
        let mut view = TopView::new(&mut buf, true);
        view.screen = Some((140, 12));
        view.attach(&AttachInfo {
            probes: lockdown_probes(),
            attach_ms: 240,
            kernel: "6.18.44".into(),
            reasons: 128,
            limits: Vec::new(),
            packets: None,
            expression: None,
        });
        let causes: HashMap<String, CauseTotals> = (0..30)
            .map(|i| {
                let t = CauseTotals {
                    count: 100 + i,
                    ..Default::default()
                };
                (format!("cause_{i:02}"), t)
            })
            .collect();
        view.frame(&causes, 1.0, 0);
        let text = String::from_utf8(buf).unwrap();
        let screen = text.trim_start_matches("\x1b[H\x1b[2J");
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(lines.len(), 12, "{screen}");
        assert!(
            lines.iter().all(|l| l.chars().count() <= 140),
            "a line wider than the screen:\n{screen}"
        );
        assert!(lines[1].starts_with("probes: kfree_skb, icmp_send, tcp_send_reset via tp_btf; "));
        assert!(
            lines.iter().filter(|l| l.contains("kprobe")).count() <= 1,
            "{screen}"
        );
        assert!(lines.last().unwrap().contains("more causes"), "{screen}");
        assert!(
            screen.contains("cause_29"),
            "the fastest cause first: {screen}"
        );

        // The latest changes take their lines from the table, not from the screen's height.
        let mut buf = Vec::new();
        let mut view = TopView::new(&mut buf, true);
        view.screen = Some((140, 12));
        view.changes = (0..SHOWN_CHANGES)
            .map(|i| format!("10:07:3{i}  change  net.ipv4.ip_forward 1 -> 0  (netns gw)"))
            .collect();
        view.frame(&causes, 1.0, 0);
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 12, "{text}");
        assert!(lines.last().unwrap().contains("change"), "{text}");
        assert!(text.contains("more causes"), "{text}");
    }

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
