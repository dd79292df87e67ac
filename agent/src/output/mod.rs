//! Where reports go: human text or one JSON object per line.
pub mod digest;
pub mod json;
pub mod text;
pub mod top;

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};

use crate::{
    causes::Verdict,
    events::{Answer, DropEvent},
    kernel::attach::Attached,
    pipeline::CauseTotals,
};

/// One reported drop, standing for `count` identical packets.
#[derive(Debug, Clone)]
pub struct DropRecord {
    pub verdict: Arc<Verdict>,
    pub drop: DropEvent,
    /// How the kernel answered the packet (ICMP error or TCP reset), when it did.
    pub answer: Option<Answer>,
    pub count: u64,
    /// Bytes of those drops: exact for drops the kernel sent; for "sampled" and "lost" records
    /// `count` times the length of the latest sent drop of the same kind.
    pub bytes: u64,
    /// False for the periodic records that report repeats of an already shown drop.
    pub first: bool,
    /// For drops the kernel counted but did not send: "sampled" (over the per-key budget) or
    /// "lost" (no room in the ring buffer). The record stands for them with the cause of the
    /// latest drop of the same key.
    pub unsent: Option<&'static str>,
    pub netns_name: Option<String>,
}

/// A configuration change, as reported.
#[derive(Debug, Clone)]
pub struct ChangeRecord {
    pub change: Arc<crate::changes::Change>,
    pub netns_name: Option<String>,
}

/// What was attached, printed first.
#[derive(Debug, Clone, Default)]
pub struct AttachInfo {
    pub probes: Vec<Attached>,
    pub attach_ms: u128,
    pub kernel: String,
    pub reasons: usize,
    /// What this kernel does not give that dropscope would use (e.g. drop reasons), in words.
    pub limits: Vec<String>,
    /// Where the dropped packets are written (`--pcap` file, `-`, or the flight recorder)
    /// and the bytes kept of each.
    pub packets: Option<(String, u32)>,
    /// The filter expression, and whether the kernel applies all of it (else part of it is
    /// checked in userspace only).
    pub expression: Option<(String, bool)>,
}

/// Totals at exit.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Causes ranked by count.
    pub causes: Vec<(String, CauseTotals)>,
    /// Hidden drops (benign, or frees that are not drops) by cause, largest first.
    pub hidden: Vec<(String, u64)>,
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Benign drops not reported (see `--all`).
    pub suppressed: u64,
    /// Drops outside the filters (in the kernel and in userspace).
    pub filtered: u64,
    /// Of those, drops the kernel-side filters left out before any event was produced.
    pub filtered_in_kernel: u64,
    /// Drop records received from the kernel.
    pub decoded: u64,
    /// Drops the kernel probe saw (delivered or not).
    pub seen: u64,
    /// Drops the ring buffer had no room for.
    pub lost: u64,
    /// Of those, the drops of each reported cause (filled in by [`LostByCause`]).
    pub lost_by_cause: std::collections::BTreeMap<String, u64>,
    pub seconds: f64,
    /// Whether the kernel's exact per-key counts equal what was reported.
    pub counts_exact: bool,
    /// Drops classified from the kernel's report alone: the evidence worker was busy.
    pub evidence_skipped: u64,
    /// Drops whose key did not fit the kernel's aggregation table: delivered, but not in
    /// the exact per-key counts.
    pub agg_full: u64,
    /// How long the event loop was kept busy at most.
    pub stalls: crate::session::Stalls,
    /// Packets written per cause (`--pcap`, the flight recorder).
    pub packets: Option<crate::capture::Totals>,
    /// Drops the kernel counted but did not send (sampling, full ring) while part of the
    /// filter expression could only be checked in userspace: whether they match is unknown.
    pub unchecked: u64,
}

/// Running totals, handed to the sinks once per `--interval` after the repeats are flushed.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Per-cause totals so far.
    pub causes: &'a HashMap<String, CauseTotals>,
    /// Seconds since the previous tick.
    pub seconds: f64,
    /// Events the ring buffer had no room for, so far (the kernel's counter).
    pub lost: u64,
    /// Benign drops counted but not reported, so far.
    pub suppressed: u64,
    /// The event loop's longest turns so far.
    pub stalls: crate::session::Stalls,
}

/// A destination for reports.
pub trait Sink {
    /// The probes are attached and the first drop can be reported.
    fn attach(&mut self, info: &AttachInfo);
    /// One record, standing for `record.count` drops.
    fn drop(&mut self, record: &DropRecord);
    /// A configuration change in a watched namespace.
    fn change(&mut self, _record: &ChangeRecord) {}
    /// Once per interval, after that interval's records.
    fn tick(&mut self, _progress: &Progress) {}
    /// The probes are detached; nothing follows.
    fn summary(&mut self, summary: &Summary);
}

/// Hands every report to each of several sinks, in order.
pub struct Fanout(pub Vec<Box<dyn Sink>>);

impl Sink for Fanout {
    fn attach(&mut self, info: &AttachInfo) {
        self.0.iter_mut().for_each(|s| s.attach(info));
    }
    fn drop(&mut self, record: &DropRecord) {
        self.0
            .iter_mut()
            .for_each(|s| Sink::drop(s.as_mut(), record));
    }
    fn change(&mut self, record: &ChangeRecord) {
        self.0.iter_mut().for_each(|s| s.change(record));
    }
    fn tick(&mut self, progress: &Progress) {
        self.0.iter_mut().for_each(|s| s.tick(progress));
    }
    fn summary(&mut self, summary: &Summary) {
        self.0.iter_mut().for_each(|s| s.summary(summary));
    }
}

/// Counts, per cause, the drops whose events found no room in the ring buffer (the records
/// that stand for them say `unsent: lost`), and adds the counts to the summary it passes on.
pub struct LostByCause<'a> {
    inner: &'a mut dyn Sink,
    lost: std::collections::BTreeMap<String, u64>,
}

impl<'a> LostByCause<'a> {
    pub fn new(inner: &'a mut dyn Sink) -> Self {
        LostByCause {
            inner,
            lost: Default::default(),
        }
    }
}

impl Sink for LostByCause<'_> {
    fn attach(&mut self, info: &AttachInfo) {
        self.inner.attach(info);
    }
    fn drop(&mut self, record: &DropRecord) {
        if record.unsent == Some("lost") {
            *self.lost.entry(record.verdict.cause.clone()).or_default() += record.count;
        }
        self.inner.drop(record);
    }
    fn change(&mut self, record: &ChangeRecord) {
        self.inner.change(record);
    }
    fn tick(&mut self, progress: &Progress) {
        self.inner.tick(progress);
    }
    fn summary(&mut self, summary: &Summary) {
        let mut summary = summary.clone();
        summary.lost_by_cause = std::mem::take(&mut self.lost);
        self.inner.summary(&summary);
    }
}

#[cfg(test)]
impl DropRecord {
    /// A record of `count` drops like `DropEvent::example`, of cause `cause`.
    pub fn example(cause: &str, count: u64, unsent: Option<&'static str>) -> DropRecord {
        let verdict = Verdict {
            cause: cause.into(),
            title: "title".into(),
            evidence: "evidence".into(),
            fix: "fix".into(),
            benign: false,
            rule: 0,
            attribution: Default::default(),
        };
        let drop = DropEvent::example("NETFILTER_DROP", "nft_do_chain");
        let bytes = count * u64::from(drop.len);
        DropRecord {
            verdict: Arc::new(verdict),
            drop,
            answer: None,
            count,
            bytes,
            first: unsent.is_none(),
            unsent,
            netns_name: None,
        }
    }
}

/// Converts the kernel's monotonic timestamps (bpf_ktime_get_ns) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128);
        let wall = Utc::now().timestamp_nanos_opt().unwrap_or(0) as i128;
        Clock {
            offset_ns: wall - mono.unwrap_or(0),
        }
    }

    pub fn wall(&self, ktime_ns: u64) -> DateTime<Utc> {
        let ns = (ktime_ns as i128 + self.offset_ns) as i64;
        DateTime::from_timestamp_nanos(ns)
    }

    /// The kernel's monotonic clock now (what bpf_ktime_get_ns reads).
    pub fn now_ns(&self) -> u64 {
        monotonic_ns()
    }

    /// A kernel timestamp as local time of day ("03:12:44").
    pub fn local_time(&self, ktime_ns: u64) -> String {
        self.wall(ktime_ns)
            .with_timezone(&chrono::Local)
            .format("%H:%M:%S")
            .to_string()
    }
}

/// The kernel's monotonic clock (what bpf_ktime_get_ns reads), in ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Clock {
}

/// Top `n` entries of a count map, largest first (ties by name, for stable output).
pub fn top<K: ToString, M: IntoIterator<Item = (K, u64)>>(map: M, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = map.into_iter().map(|(k, c)| (k.to_string(), c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::PodRef;

    /// A drop with no device, no flow and no name for its namespace.
    fn record(pod: Option<PodRef>) -> DropRecord {
        let mut r = DropRecord::example("no_listener", 1, None);
        let d = &mut r.drop;
        (d.netns, d.dev, d.flow, d.pod) = (4026532315, None, None, pod.map(Arc::new));
        r
    }

    #[test]
    fn lost_drops_are_counted_per_cause_in_the_summary() {
        #[derive(Default)]
        struct Last(Option<Summary>, u64);
        impl Sink for Last {
            fn attach(&mut self, _: &AttachInfo) {}
            fn drop(&mut self, r: &DropRecord) {
                self.1 += r.count;
            }
            fn summary(&mut self, s: &Summary) {
                self.0 = Some(s.clone());
            }
        }
        let mut last = Last::default();
        let mut sink = LostByCause::new(&mut last);
        sink.drop(&DropRecord::example("netfilter_drop", 5, None));
        sink.drop(&DropRecord::example("netfilter_drop", 7, Some("lost")));
        sink.drop(&DropRecord::example("netfilter_drop", 9, Some("sampled")));
        sink.drop(&DropRecord::example("no_listener", 2, Some("lost")));
        sink.drop(&DropRecord::example("netfilter_drop", 1, Some("lost")));
        sink.summary(&Summary {
            lost: 12,
            ..Default::default()
        });
        assert_eq!(last.1, 24, "every record is passed on");
        let s = last.0.unwrap();
        assert_eq!(s.lost, 12);
        assert_eq!(
            s.lost_by_cause.into_iter().collect::<Vec<_>>(),
            [
                ("netfilter_drop".to_string(), 8),
                ("no_listener".to_string(), 2)
            ]
        );
    }

    #[test]
    fn pods_are_shown_when_known_and_absent_otherwise() {
        let clock = Clock::new();
        let pod = PodRef {
            namespace: "shop".into(),
            name: "db".into(),
            uid: "u-1".into(),
            container: Some("postgres".into()),
        };
        let r = record(Some(pod));
        assert!(text::drop_line(&r, &clock)
            .ends_with("no device (netns 4026532315)  pod shop/db (postgres)  x1"));
        let v = json::drop_json(&r, &clock);
        assert_eq!(
            (
                &v["pod_namespace"],
                &v["pod"],
                &v["pod_uid"],
                &v["container"]
            ),
            (
                &"shop".into(),
                &"db".into(),
                &"u-1".into(),
                &"postgres".into()
            )
        );

        let r = record(None);
        assert!(text::drop_line(&r, &clock).ends_with("no device (netns 4026532315)  x1"));
        let v = json::drop_json(&r, &clock);
        for key in ["pod_namespace", "pod", "pod_uid", "container"] {
            assert!(v.get(key).is_none(), "{key} present: {v}");
        }
        assert_eq!(
            v["netns"], 4026532315u32,
            "an unknown namespace keeps its inode"
        );
    }
}
