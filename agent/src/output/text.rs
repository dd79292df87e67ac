//! Human output: one line per drop (plus evidence and fix the first time), a ranked summary.
use std::io::Write;

use owo_colors::OwoColorize;

use super::{top, AttachInfo, ChangeRecord, Clock, DropRecord, Sink, Summary};

pub struct TextSink<W: Write> {
    out: W,
    clock: Clock,
    color: bool,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W, clock: Clock, color: bool) -> Self {
        TextSink { out, clock, color }
    }

    fn paint(&self, s: &str, style: fn(&str) -> String) -> String {
        if self.color {
            style(s)
        } else {
            s.to_string()
        }
    }
}

fn bold(s: &str) -> String {
    s.bold().to_string()
}
fn red(s: &str) -> String {
    s.red().bold().to_string()
}
fn dim(s: &str) -> String {
    s.dimmed().to_string()
}
fn green(s: &str) -> String {
    s.green().to_string()
}

/// How the probes attached, probes with the same mode and note named together:
/// "kfree_skb, icmp_send via tp_btf; nf_hook_slow, ip_forward unavailable (fentry: ...)".
pub fn probe_summary(probes: &[crate::kernel::attach::Attached]) -> String {
    let mut groups: Vec<(&str, Option<&str>, Vec<&str>)> = Vec::new();
    for p in probes {
        let note = p.note.as_deref();
        match groups
            .iter_mut()
            .find(|(m, n, _)| *m == p.mode && *n == note)
        {
            Some((_, _, names)) => names.push(p.probe),
            None => groups.push((p.mode, note, vec![p.probe])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(mode, note, names)| {
            let how = if *mode == "unavailable" {
                "unavailable".to_string()
            } else {
                format!("via {mode}")
            };
            match note {
                Some(n) => format!("{} {how} ({n})", names.join(", ")),
                None => format!("{} {how}", names.join(", ")),
            }
        })
        .collect();
    parts.join("; ")
}

/// The single line describing a drop (without evidence), shared by stream and tests.
pub fn drop_line(r: &DropRecord, clock: &Clock) -> String {
    let d = &r.drop;
    let time = clock
        .wall(d.ts_ns)
        .with_timezone(&chrono::Local)
        .format("%H:%M:%S");
    let flow = d
        .flow
        .map_or_else(|| format!("{} len {}", d.reason, d.len), |f| f.to_string());
    let dev = match (d.ingress(), d.out) {
        (Some(i), Some(o)) if i.ifindex != o.ifindex => format!("in {} out {}", i.name(), o.name()),
        (Some(i), _) => format!("in {}", i.name()),
        (None, Some(o)) => format!("out {}", o.name()),
        (None, None) => "no device".to_string(),
    };
    let ns = match &r.netns_name {
        Some(name) => format!("netns {name}"),
        None => format!("netns {}", d.netns),
    };
    let count = match (r.first, r.unsent) {
        (true, _) => format!("x{}", r.count),
        (false, Some("sampled")) => {
            format!("... and {} more like this (sampled in the kernel)", r.count)
        }
        (false, Some(_)) => format!(
            "... and {} more like this (events lost, counted in the kernel)",
            r.count
        ),
        (false, None) => format!("+{} more", r.count),
    };
    let pod = d
        .pod
        .as_ref()
        .map(|p| format!("pod {p}  "))
        .unwrap_or_default();
    format!(
        "{time}  {}  {flow}  {dev} ({ns})  {pod}{count}",
        r.verdict.cause
    )
}

/// The line describing a configuration change.
pub fn change_line(r: &ChangeRecord, clock: &Clock) -> String {
    let c = &r.change;
    let ns = match &r.netns_name {
        Some(name) => format!("netns {name}"),
        None => format!("netns {}", c.netns),
    };
    let by = match &c.process {
        Some(p) => format!("  by {p}"),
        None => String::new(),
    };
    format!(
        "{}  change  {}  ({ns}){by}",
        clock.local_time(c.ts_ns),
        c.what()
    )
}

impl<W: Write> Sink for TextSink<W> {
    fn attach(&mut self, info: &AttachInfo) {
        let probes = probe_summary(&info.probes);
        let reasons = if info.reasons == 0 {
            "no drop reasons".to_string()
        } else {
            format!("{} drop reasons", info.reasons)
        };
        let _ = writeln!(
            self.out,
            "{} attached in {} ms on {} ({reasons}): {}. Ctrl-C for the summary.",
            self.paint("dropscope", bold),
            info.attach_ms,
            info.kernel,
            probes
        );
        for limit in &info.limits {
            let _ = writeln!(self.out, "{} {limit}", self.paint("note:", bold));
        }
        if let Some((expression, exact)) = &info.expression {
            let _ = writeln!(
                self.out,
                "filter: {expression} ({})",
                if *exact {
                    "applied in the kernel"
                } else {
                    "partly checked in userspace only: drops sampled away in the kernel cannot be checked"
                }
            );
        }
        if let Some((target, snaplen)) = &info.packets {
            let target = if target == "-" {
                "standard output"
            } else {
                target
            };
            let _ = writeln!(
                self.out,
                "writing each reported drop's packet (first {snaplen} bytes) to {target}"
            );
        }
        let _ = self.out.flush();
    }

    fn drop(&mut self, r: &DropRecord) {
        let line = drop_line(r, &self.clock);
        let cause = &r.verdict.cause;
        let line = line.replacen(cause.as_str(), &self.paint(cause, red), 1);
        let _ = writeln!(self.out, "{line}");
        // Evidence and fix once per distinct drop; repeats are one line.
        if r.first {
            let a = &r.verdict.attribution;
            let ruleset = match (&a.nf_table, &a.nf_chain) {
                (Some(t), Some(c)) => format!(" [table {t}, chain {c}]"),
                (Some(t), None) => format!(" [table {t}]"),
                _ => String::new(),
            };
            let _ = writeln!(
                self.out,
                "          {} {}{ruleset}",
                self.paint("evidence:", dim),
                r.verdict.evidence
            );
            let _ = writeln!(
                self.out,
                "          {} {}",
                self.paint("fix:", dim),
                self.paint(&r.verdict.fix, green)
            );
            if let Some(stack) = &a.stack {
                let _ = writeln!(self.out, "          {} {stack}", self.paint("stack:", dim));
            }
        }
        let _ = self.out.flush();
    }

    fn change(&mut self, r: &ChangeRecord) {
        let line = change_line(r, &self.clock);
        let _ = writeln!(
            self.out,
            "{}",
            line.replacen("change", &self.paint("change", bold), 1)
        );
        let _ = self.out.flush();
    }

    fn summary(&mut self, s: &Summary) {
        let o = &mut Vec::new();
        let _ = writeln!(
            o,
            "\n{}",
            self.paint(
                &format!("── dropscope summary: {:.1} s ──", s.seconds),
                bold
            )
        );
        if s.causes.is_empty() {
            let _ = writeln!(o, "no drops matched");
        }
        for (rank, (id, t)) in s.causes.iter().enumerate() {
            let _ = writeln!(
                o,
                "{:>2}. {}  {}  x{}",
                rank + 1,
                self.paint(id, red),
                t.title,
                t.count
            );
            let reasons = top(t.reasons.iter().map(|(k, v)| (k, *v)), 3);
            let locs = top(t.locations.iter().map(|(k, v)| (k, *v)), 3);
            let ifaces = top(t.ifaces.iter().map(|(k, v)| (k, *v)), 3);
            let list = |v: &[(String, u64)]| {
                v.iter()
                    .map(|(k, c)| format!("{k} ({c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                o,
                "    kernel: {} at {}; iface {}",
                list(&reasons),
                list(&locs),
                list(&ifaces)
            );
            let flows = top(t.flows.iter().map(|(k, v)| (k, *v)), 3);
            if !flows.is_empty() {
                let _ = writeln!(o, "    top flows: {}", list(&flows));
            }
            let pods = top(t.pod_counts(), 3);
            if !pods.is_empty() {
                let _ = writeln!(o, "    pods: {}", list(&pods));
            }
            for c in &t.changes {
                let _ = writeln!(o, "    changed: {c}");
            }
            if let Some((v, share)) = t.representative() {
                let which = if share < 0.999 {
                    format!(" (most frequent, {:.0}% of these drops)", share * 100.0)
                } else {
                    String::new()
                };
                let _ = writeln!(o, "    evidence{which}: {}", v.evidence);
                let _ = writeln!(o, "    fix: {}", self.paint(&v.fix, green));
            }
        }
        let hidden = if s.hidden.is_empty() {
            "0".to_string()
        } else {
            let parts: Vec<String> = s.hidden.iter().map(|(c, n)| format!("{c} {n}")).collect();
            format!("{} ({})", s.suppressed, parts.join(", "))
        };
        let _ = writeln!(
            o,
            "kernel saw {} drops; reported {}, hidden {hidden} (--all shows them), filtered out {}, lost {}",
            s.seen,
            s.causes.iter().map(|(_, t)| t.count).sum::<u64>(),
            s.filtered,
            s.lost
        );
        if let Some(p) = &s.packets {
            let target = if p.target == "-" {
                "standard output"
            } else {
                &p.target
            };
            let _ = writeln!(
                o,
                "packets: {} written to {target}; per cause, written of dropped: {}",
                p.written,
                p.text()
            );
        }
        if s.unchecked > 0 {
            let _ = writeln!(
                o,
                "{} drops counted in the kernel but not sent (sampling) could not be checked against the filter expression: counts are not exact (--sample 0 sends every drop)",
                s.unchecked
            );
        }
        if s.lost > 0 && s.counts_exact {
            // The kernel counted the drops whose events were lost: only their details are
            // missing (each kind keeps the cause of its latest event).
            let per_cause: Vec<String> = s
                .lost_by_cause
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let _ = writeln!(
                o,
                "{} events did not fit the ring buffer ({}); the kernel counted their drops, so the counts above are exact",
                s.lost,
                if per_cause.is_empty() {
                    "no reported drops among them".to_string()
                } else {
                    format!("drops: {}", per_cause.join(", "))
                }
            );
        } else if s.lost > 0 {
            let _ = writeln!(
                o,
                "{}",
                self.paint(
                    "events were lost: counts above are lower bounds (narrow the filters)",
                    red
                )
            );
        }
        if s.agg_full > 0 {
            let _ = writeln!(
                o,
                "{}",
                self.paint(
                    &format!(
                        "the kernel's aggregation table was full: {} drops of new kinds were reported without an exact count (their totals may be low)",
                        s.agg_full
                    ),
                    red
                )
            );
        }
        if s.evidence_skipped > 0 {
            let _ = writeln!(
                o,
                "{} drops were classified from the kernel's report alone (too many new kinds at once for the evidence worker)",
                s.evidence_skipped
            );
        }
        if s.stalls.long > 0 {
            let _ = writeln!(
                o,
                "the event loop was busy for up to {} ms at a time ({} turns over 100 ms): drops waited in the ring buffer meanwhile",
                s.stalls.max.as_millis(),
                s.stalls.long
            );
        }
        let _ = self.out.write_all(o);
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::probe_summary;
    use crate::kernel::attach::Attached;

    #[test]
    fn probes_with_the_same_outcome_are_named_together() {
        let p = |probe, mode, note: Option<&str>| Attached {
            probe,
            mode,
            note: note.map(str::to_string),
        };
        let refused = Some("fentry: refused by the kernel (EPERM)");
        let line = probe_summary(&[
            p("kfree_skb", "tp_btf", None),
            p("icmp_send", "tp_btf", None),
            p("nf_hook_slow", "unavailable", refused),
            p("ip_forward", "unavailable", refused),
            p("nft_do_chain", "kprobe", Some("fentry: in a module")),
        ]);
        assert_eq!(
            line,
            "kfree_skb, icmp_send via tp_btf; nf_hook_slow, ip_forward unavailable \
             (fentry: refused by the kernel (EPERM)); nft_do_chain via kprobe (fentry: in a module)"
        );
    }
}
