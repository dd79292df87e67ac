//! events -> correlate -> filter -> classify -> fold -> sinks.
//!
//! Identical drops are folded: the first is reported at once, repeats are counted and reported
//! as one record per flush interval. Classification runs once per distinct drop, not per packet.
use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{AggKey, AggVal};

use crate::{
    causes::{facts, Attribution, Engine, Facts, Verdict},
    changes::{feed::Feed, Change, ChangeKind, ChangeLog},
    events::{Answer, Device, Drop, Flow, Record, Reply, Sysctls},
    evidence::investigator::Investigator,
    filter::Filter,
    output::{ChangeRecord, Clock, DropRecord, Sink, Summary},
    pods::{self, PodRef},
};

pub use crate::causes::facts::Traced;

/// How long a dropped "fragmentation needed" explains later too-big drops of its flow (ns).
const FRAG_NEEDED_WINDOW_NS: u64 = 2_000_000_000;
/// How long an answer (ICMP error, TCP reset) waits for the drop of the same packet (ns).
const REPLY_PAIR_WINDOW_NS: u64 = 100_000_000;
/// Distinct drops remembered for folding before the table is flushed and restarted.
const MAX_FOLDS: usize = 65_536;
/// Distinct flows (and pods) remembered per cause for the summary.
const MAX_FLOWS_PER_CAUSE: usize = 1024;
/// Distinct explanations (evidence texts) remembered per cause for the summary.
const MAX_VERDICTS_PER_CAUSE: usize = 256;

/// Reads a captured kernel stack by id, symbolized, innermost frame first.
pub type StackReader = Box<dyn FnMut(u32) -> Vec<Arc<str>>>;

/// What makes two drops "the same" for folding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FoldKey {
    reason: Arc<str>,
    location: Arc<str>,
    netns: u32,
    dev: Option<Device>,
    out: Option<Device>,
    iif: Option<u32>,
    flow: Option<Flow>,
    sysctls: Sysctls,
    answer: Option<Answer>,
    frag_needed_dropped: bool,
}

struct Fold {
    verdict: Arc<Verdict>,
    sample: Drop,
    answer: Option<Answer>,
    pending: u64,
    /// Bytes of the pending repeats.
    pending_bytes: u64,
}

/// What userspace knows about one kernel aggregation key: the cause of its latest sampled
/// drop, and how many of its unsent drops have been reported already.
struct KeyState {
    verdict: Arc<Verdict>,
    sample: Drop,
    answer: Option<Answer>,
    events: u64,
    reported_suppressed: u64,
    reported_lost: u64,
}

/// Per-cause totals for the summary.
#[derive(Debug, Clone, Default)]
pub struct CauseTotals {
    pub count: u64,
    pub title: String,
    pub reasons: HashMap<Arc<str>, u64>,
    pub locations: HashMap<Arc<str>, u64>,
    pub ifaces: HashMap<Device, u64>,
    pub flows: HashMap<Flow, u64>,
    pub pods: HashMap<Arc<PodRef>, u64>,
    /// Drops per distinct explanation (keyed by evidence text).
    pub verdicts: HashMap<String, (Arc<Verdict>, u64)>,
    /// Configuration changes named in the evidence of this cause's drops.
    pub changes: Vec<Arc<Change>>,
}

/// How long a drop waits for the change watcher to read what preceded it. The watcher's pass
/// takes well under a millisecond; this bounds the stall when it is busy.
const CATCH_UP_PATIENCE: std::time::Duration = std::time::Duration::from_millis(50);

/// Changes named per cause in the summary, at most.
const MAX_CHANGES_PER_CAUSE: usize = 5;

/// Which change sources are watched, so that "unchanged since dropscope started" is only
/// said of settings a source would have seen change.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watched {
    /// Writes to any `net.*` sysctl (the cgroup/sysctl program).
    pub sysctl: bool,
    /// iptables-legacy table replacements.
    pub xt_replace: bool,
    /// Netlink: device forwarding and rp_filter, links, routes, addresses, nftables.
    pub netlink: bool,
}

impl Watched {
    /// Whether a change to `key` would have been seen.
    pub fn covers(&self, key: &str) -> bool {
        if key.starts_with("iptables-legacy.") {
            self.xt_replace
        } else if key.starts_with("net.") {
            self.sysctl
                || (self.netlink
                    && key.contains(".conf.")
                    && (key.ends_with(".forwarding") || key.ends_with(".rp_filter")))
        } else {
            self.netlink
        }
    }
}

impl CauseTotals {
    /// Drops per pod, as `namespace/name`.
    pub fn pod_counts(&self) -> HashMap<String, u64> {
        let mut by_name = HashMap::new();
        for (pod, n) in &self.pods {
            *by_name
                .entry(format!("{}/{}", pod.namespace, pod.name))
                .or_default() += n;
        }
        by_name
    }

    /// The explanation of the most drops, and the share of the cause's drops it covers.
    pub fn representative(&self) -> Option<(&Verdict, f64)> {
        let (v, n) = self
            .verdicts
            .values()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.evidence.cmp(&a.0.evidence)))?;
        Some((v, *n as f64 / self.count.max(1) as f64))
    }
}

pub struct Pipeline {
    engine: Engine,
    filter: Filter,
    show_benign: bool,
    investigator: Box<dyn Investigator>,
    /// Which answers (ICMP, ICMPv6, TCP reset) the attached probes can see.
    traced: Traced,
    pods: pods::Resolver,
    replies: HashMap<u64, Reply>,
    folds: HashMap<FoldKey, Fold>,
    /// Where an ICMP "fragmentation needed" was just dropped: (netns, its destination) -> time.
    frag_needed_drops: HashMap<(u32, std::net::IpAddr), u64>,
    stacks: StackReader,
    keys: HashMap<AggKey, KeyState>,
    /// Whether every kernel count so far was matched by events plus reported unsent drops.
    pub counts_exact: bool,
    pub causes: HashMap<String, CauseTotals>,
    pub reasons: HashMap<Arc<str>, u64>,
    /// Hidden drops (benign, or frees that are not drops), by cause.
    pub hidden: HashMap<String, u64>,
    /// Configuration changes seen since the start, per namespace.
    changes: ChangeLog,
    watched: Watched,
    feed: Option<Arc<Feed>>,
    clock: Clock,
    pub suppressed: u64,
    pub filtered: u64,
    pub drops: u64,
}

impl Pipeline {
    pub fn new(
        engine: Engine,
        filter: Filter,
        show_benign: bool,
        investigator: Box<dyn Investigator>,
        traced: Traced,
        stacks: StackReader,
        pods: pods::Resolver,
    ) -> Self {
        let clock = Clock::new();
        Pipeline {
            changes: ChangeLog::new(clock.now_ns()),
            watched: Watched::default(),
            feed: None,
            clock,
            pods,
            investigator,
            traced,
            stacks,
            keys: HashMap::new(),
            counts_exact: true,
            engine,
            filter,
            show_benign,
            replies: HashMap::new(),
            folds: HashMap::new(),
            frag_needed_drops: HashMap::new(),
            causes: HashMap::new(),
            reasons: HashMap::new(),
            hidden: HashMap::new(),
            suppressed: 0,
            filtered: 0,
            drops: 0,
        }
    }

    /// Says which change sources run (see [`Watched`]) and where their changes arrive.
    pub fn watching(&mut self, watched: Watched, feed: Arc<Feed>) {
        self.watched = watched;
        self.feed = Some(feed);
    }

    /// Feeds the changes queued so far.
    pub fn take_changes(&mut self, sink: &mut dyn Sink) {
        if let Some(feed) = self.feed.clone() {
            for c in feed.take() {
                self.on_change(c, sink);
            }
        }
    }

    /// Feeds every change made before `ts_ns`, waiting briefly for the watcher to read them,
    /// so that a drop's evidence names the change that preceded it.
    fn catch_up(&mut self, ts_ns: u64, sink: &mut dyn Sink) {
        let Some(feed) = self.feed.clone() else { return };
        if feed.behind(ts_ns) {
            for c in feed.up_to(ts_ns, CATCH_UP_PATIENCE) {
                self.on_change(c, sink);
            }
        }
    }

    /// Feeds one configuration change: it is reported, remembered for the evidence of later
    /// drops, and the drops of its namespace are classified afresh.
    pub fn on_change(&mut self, mut c: Change, sink: &mut dyn Sink) {
        if let Some(p) = &mut c.process {
            if let Some(cgroup) = &p.cgroup {
                let (pod, container) = self.pods.for_cgroup(cgroup);
                p.pod = pod;
                p.container = container;
            }
        }
        if !self.filter.netns.is_empty() && !self.filter.netns.contains(&c.netns) {
            return;
        }
        if !self.filter.pods.is_empty() {
            let netns_pod = self.pods.for_drop(c.netns, None);
            let by_pod = |p: &Option<Arc<PodRef>>| {
                p.as_ref()
                    .is_some_and(|p| self.filter.pods.iter().any(|w| p.is(w)))
            };
            let process_pod = c.process.as_ref().and_then(|p| p.pod.clone());
            if !by_pod(&netns_pod) && !by_pod(&process_pod) {
                return;
            }
        }
        let c = Arc::new(c);
        // Drops already folded in this namespace may now have a change to name.
        self.flush(sink);
        self.folds.retain(|k, _| k.netns != c.netns);
        self.changes.push(c.clone());
        sink.change(&ChangeRecord {
            netns_name: self.investigator.netns_name(c.netns),
            change: c,
        });
    }

    /// Feeds one decoded record.
    pub fn push(&mut self, record: Record, sink: &mut dyn Sink) {
        match record {
            Record::Reply(r) => self.remember_reply(r),
            Record::Drop(d) => self.on_drop(d, sink),
        }
    }

    fn remember_reply(&mut self, r: Reply) {
        if self.replies.len() >= 4096 {
            let newest = r.ts_ns;
            self.replies
                .retain(|_, v| newest.saturating_sub(v.ts_ns) < REPLY_PAIR_WINDOW_NS);
        }
        self.replies.insert(r.skb, r);
    }

    /// How the kernel answered this very packet, if an answer was seen just before its drop:
    /// same skb, same addresses (an skb address is reused as soon as the packet is freed).
    fn answer_for(&mut self, d: &Drop) -> Option<Answer> {
        let r = self.replies.remove(&d.skb)?;
        let same = |a: Option<Flow>, b: Option<Flow>| {
            a.map(|f| (f.src, f.dst)) == b.map(|f| (f.src, f.dst))
        };
        (d.ts_ns.saturating_sub(r.ts_ns) < REPLY_PAIR_WINDOW_NS && same(r.flow, d.flow))
            .then_some(r.answer)
    }

    fn on_drop(&mut self, mut d: Drop, sink: &mut dyn Sink) {
        self.drops += 1;
        let answer = self.answer_for(&d);
        d.pod = self.pods.for_drop(d.netns, d.flow.as_ref());
        self.name_arrival(&mut d);
        if !self.filter.matches(&d) {
            self.filtered += 1;
            return;
        }
        let frag_needed_dropped = self.track_frag_needed(&d);
        let key = FoldKey {
            reason: d.reason.clone(),
            location: d.location.clone(),
            netns: d.netns,
            dev: d.dev,
            out: d.out,
            iif: d.iif,
            flow: d.flow,
            sysctls: d.sysctls,
            answer,
            frag_needed_dropped,
        };
        if let Some(fold) = self.folds.get_mut(&key) {
            let benign = fold.verdict.benign;
            let verdict = fold.verdict.clone();
            if self.show_benign || !benign {
                fold.pending += 1;
                fold.pending_bytes += u64::from(d.len);
            }
            fold.sample.ts_ns = d.ts_ns;
            self.count(&verdict, &d);
            if let Some(k) = self.keys.get_mut(&d.agg) {
                k.events += 1;
            }
            return;
        }
        let verdict = Arc::new(self.classify(&d, answer, frag_needed_dropped, sink));
        self.count(&verdict, &d);
        let k = self.keys.entry(d.agg).or_insert_with(|| KeyState {
            verdict: verdict.clone(),
            sample: d.clone(),
            answer,
            events: 0,
            reported_suppressed: 0,
            reported_lost: 0,
        });
        k.events += 1;
        (k.verdict, k.sample, k.answer) = (verdict.clone(), d.clone(), answer);
        if self.folds.len() >= MAX_FOLDS {
            self.flush(sink);
            self.folds.clear();
        }
        if self.show_benign || !verdict.benign {
            sink.drop(&self.record(&verdict, &d, answer, 1, true));
        }
        self.folds.insert(
            key,
            Fold {
                verdict,
                sample: d,
                answer,
                pending: 0,
                pending_bytes: 0,
            },
        );
    }

    /// Remembers netfilter drops of ICMP "fragmentation needed"; for a too-big drop, says
    /// whether the ICMP that should have told its sender was just dropped (a PMTU black hole).
    fn track_frag_needed(&mut self, d: &Drop) -> bool {
        let Some(flow) = d.flow else { return false };
        if &*d.reason == "NETFILTER_DROP" && facts::is_frag_needed(d) {
            if self.frag_needed_drops.len() > 4096 {
                self.frag_needed_drops.clear();
            }
            self.frag_needed_drops.insert((d.netns, flow.dst), d.ts_ns);
            return false;
        }
        &*d.reason == "PKT_TOO_BIG"
            && self
                .frag_needed_drops
                .get(&(d.netns, flow.src))
                .is_some_and(|&t| d.ts_ns.saturating_sub(t) < FRAG_NEEDED_WINDOW_NS)
    }

    /// Names the device a forwarded or bridged packet arrived on (`skb_iif`), in its
    /// namespace. The kernel's ip6_forward moves a too-big packet to its egress device before
    /// freeing it; its arrival device is then the one it came in on, as for IPv4.
    fn name_arrival(&mut self, d: &mut Drop) {
        let Some(iif) = d.iif else { return };
        let Some(name) = self.investigator.ifname(d.netns, iif) else {
            return;
        };
        let mut bytes = [0u8; 16];
        let n = name.len().min(15);
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        let arrived = Device::new(iif, bytes, 0);
        d.arrived_on = Some(arrived);
        if &*d.location == "ip6_forward" && &*d.reason == "PKT_TOO_BIG" {
            d.out = d.out.or(d.dev);
            d.dev = Some(arrived);
        }
    }

    fn classify(
        &mut self,
        d: &Drop,
        answer: Option<Answer>,
        frag_needed_dropped: bool,
        sink: &mut dyn Sink,
    ) -> Verdict {
        let stack = d.stack_id.map(|id| (self.stacks)(id)).unwrap_or_default();
        // A drop that stands for kernel counts without an event of its own was never paired
        // with an answer: whether one was sent is unknown.
        let traced = if d.skb == 0 {
            Traced::NONE
        } else {
            self.traced
        };
        let mut facts = Facts::new(d, answer, traced, &stack, self.investigator.as_mut());
        facts.frag_needed_dropped = frag_needed_dropped;
        let mut verdict = self.engine.classify(&facts);
        verdict.attribution = attribution(d, &facts, &verdict);
        let patterns: Vec<String> = self
            .engine
            .change_patterns(&verdict.cause)
            .iter()
            .filter_map(|p| fill_devices(p, &facts))
            .collect();
        drop(facts);
        if !patterns.is_empty() && !verdict.benign {
            self.catch_up(d.ts_ns, sink);
            // The watcher did not catch up in time (busy, or starved of CPU): a change just
            // before the drop may still be unread.
            let behind = self.feed.as_ref().is_some_and(|f| f.behind(d.ts_ns));
            match self.changes.latest(d.netns, &patterns, d.ts_ns) {
                Some(c) => {
                    verdict.evidence.push_str(&format!("; {}", self.describe(&c, d.ts_ns)));
                    verdict.attribution.change = Some(c);
                }
                None if behind => verdict.evidence.push_str(
                    "; changes just before this drop not read yet (the change watcher is behind)",
                ),
                None => verdict.evidence.push_str(&self.unchanged(&patterns)),
            }
        }
        verdict
    }

    /// "net.ipv4.conf.all.forwarding changed 1 -> 0 at 03:12:44 by sysctl (pid 812) <- bash
    /// (pid 800), 11 s before this drop".
    fn describe(&self, c: &Change, drop_ns: u64) -> String {
        let at = self.clock.local_time(c.ts_ns);
        let mut s = match (&c.old, &c.new) {
            (Some(o), Some(n)) => format!("{} changed {o} -> {n} at {at}", c.key),
            _ => format!(
                "{} changed at {at}{}",
                c.key,
                c.detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
            ),
        };
        match &c.process {
            Some(p) => s.push_str(&format!(" by {p}")),
            None if c.kind != ChangeKind::Sysctl => {
                s.push_str(" (the kernel does not say by which process)")
            }
            None => {}
        }
        let ago = drop_ns.saturating_sub(c.ts_ns) as f64 / 1e9;
        s.push_str(&format!(", {} before this drop", human_secs(ago)));
        s
    }

    /// What to say when no change to the cause's settings was seen.
    fn unchanged(&self, patterns: &[String]) -> String {
        let since = self.clock.local_time(self.changes.since_ns);
        if patterns.iter().all(|p| self.watched.covers(p)) {
            format!("; unchanged since dropscope started at {since}")
        } else if patterns.iter().any(|p| self.watched.covers(p)) {
            format!("; no change seen since dropscope started at {since} (not every source of change is watched on this host)")
        } else {
            "; changes to it are not watched on this host".to_string()
        }
    }

    fn count(&mut self, v: &Arc<Verdict>, d: &Drop) {
        self.count_n(v, d, 1);
    }

    /// Adds `n` drops like `d` to the totals.
    fn count_n(&mut self, v: &Arc<Verdict>, d: &Drop, n: u64) {
        if v.benign && !self.show_benign {
            self.suppressed += n;
            match self.hidden.get_mut(v.cause.as_str()) {
                Some(c) => *c += n,
                None => {
                    self.hidden.insert(v.cause.clone(), n);
                }
            }
            return;
        }
        *self.reasons.entry(d.reason.clone()).or_default() += n;
        // Hot path: no allocation once a cause, flow and device have been seen.
        if !self.causes.contains_key(v.cause.as_str()) {
            let fresh = CauseTotals {
                title: v.title.clone(),
                ..Default::default()
            };
            self.causes.insert(v.cause.clone(), fresh);
        }
        let t = self
            .causes
            .get_mut(v.cause.as_str())
            .expect("inserted above");
        t.count += n;
        if let Some(c) = &v.attribution.change {
            if t.changes.len() < MAX_CHANGES_PER_CAUSE && !t.changes.iter().any(|x| Arc::ptr_eq(x, c))
            {
                t.changes.push(c.clone());
            }
        }
        let room = t.verdicts.len() < MAX_VERDICTS_PER_CAUSE;
        match t.verdicts.get_mut(v.evidence.as_str()) {
            Some(e) => e.1 += n,
            None if room => {
                t.verdicts.insert(v.evidence.clone(), (v.clone(), n));
            }
            None => {}
        }
        *t.reasons.entry(d.reason.clone()).or_default() += n;
        *t.locations.entry(d.location.clone()).or_default() += n;
        if let Some(dev) = d.dev {
            *t.ifaces.entry(dev).or_default() += n;
        }
        if let Some(flow) = d.flow {
            if t.flows.len() < MAX_FLOWS_PER_CAUSE || t.flows.contains_key(&flow) {
                *t.flows.entry(flow).or_default() += n;
            }
        }
        if let Some(pod) = &d.pod {
            if t.pods.len() < MAX_FLOWS_PER_CAUSE || t.pods.contains_key(pod) {
                *t.pods.entry(pod.clone()).or_default() += n;
            }
        }
    }

    fn record(
        &mut self,
        v: &Arc<Verdict>,
        d: &Drop,
        answer: Option<Answer>,
        count: u64,
        first: bool,
    ) -> DropRecord {
        DropRecord {
            verdict: v.clone(),
            drop: d.clone(),
            answer,
            count,
            // Exact for one drop; the caller corrects it when it knows better.
            bytes: count * u64::from(d.len),
            first,
            unsent: None,
            netns_name: self.investigator.netns_name(d.netns),
        }
    }

    /// Reports the drops the kernel counted but did not send (over the sampling budget, or no
    /// room in the ring buffer), per key, as records standing for them. `kernel` holds the
    /// kernel's per-key counts summed over CPUs; `synthetic` builds a drop for a key no event
    /// of which ever arrived.
    pub fn reconcile(
        &mut self,
        kernel: &[(AggKey, AggVal)],
        mut synthetic: impl FnMut(&AggKey) -> Drop,
        sink: &mut dyn Sink,
        final_pass: bool,
    ) {
        for (key, val) in kernel {
            if !self.keys.contains_key(key) {
                if val.suppressed + val.lost == 0 {
                    continue;
                }
                let mut d = synthetic(key);
                d.pod = self.pods.for_drop(d.netns, d.flow.as_ref());
                if !self.filter.matches(&d) {
                    continue;
                }
                let verdict = Arc::new(self.classify(&d, None, false, sink));
                let st = KeyState {
                    verdict,
                    sample: d,
                    answer: None,
                    events: 0,
                    reported_suppressed: 0,
                    reported_lost: 0,
                };
                self.keys.insert(*key, st);
            }
            let st = self.keys.get_mut(key).expect("inserted above");
            let sampled = val.suppressed.saturating_sub(std::mem::replace(
                &mut st.reported_suppressed,
                val.suppressed,
            ));
            let lost = val
                .lost
                .saturating_sub(std::mem::replace(&mut st.reported_lost, val.lost));
            let (verdict, sample, answer, events) =
                (st.verdict.clone(), st.sample.clone(), st.answer, st.events);
            if final_pass && events + val.suppressed + val.lost != val.packets {
                self.counts_exact = false;
            }
            for (n, kind) in [(sampled, "sampled"), (lost, "lost")] {
                if n == 0 {
                    continue;
                }
                self.count_n(&verdict, &sample, n);
                if self.show_benign || !verdict.benign {
                    let mut rec = self.record(&verdict, &sample, answer, n, false);
                    rec.unsent = Some(kind);
                    sink.drop(&rec);
                }
            }
        }
        if self.keys.len() > 2 * agent_ebpf::AGG_ENTRIES as usize {
            // Keys the kernel evicted can never report again.
            let live: std::collections::HashSet<&AggKey> = kernel.iter().map(|(k, _)| k).collect();
            self.keys.retain(|k, _| live.contains(k));
        }
    }

    /// Reports the repeats counted since the last flush.
    pub fn flush(&mut self, sink: &mut dyn Sink) {
        let pending: Vec<PendingRepeat> = self
            .folds
            .values_mut()
            .filter(|f| f.pending > 0)
            .map(|f| {
                let (count, bytes) = (
                    std::mem::take(&mut f.pending),
                    std::mem::take(&mut f.pending_bytes),
                );
                (f.verdict.clone(), f.sample.clone(), f.answer, count, bytes)
            })
            .collect();
        for (v, d, answer, count, bytes) in pending {
            let mut rec = self.record(&v, &d, answer, count, false);
            rec.bytes = bytes;
            sink.drop(&rec);
        }
    }

    /// Final totals, ranked by count. `seen`/`lost` come from the kernel's own counters.
    pub fn summary(&self, seen: u64, lost: u64, seconds: f64) -> Summary {
        let mut causes: Vec<(String, CauseTotals)> = self
            .causes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        causes.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        let mut hidden: Vec<(String, u64)> =
            self.hidden.iter().map(|(k, v)| (k.clone(), *v)).collect();
        hidden.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Summary {
            causes,
            hidden,
            reasons: self
                .reasons
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            suppressed: self.suppressed,
            filtered: self.filtered,
            filtered_in_kernel: 0,
            decoded: self.drops,
            seen,
            lost,
            seconds,
            counts_exact: self.counts_exact,
            ..Default::default()
        }
    }
}

/// A change key pattern with the drop's devices filled in: the first alternative (`a|b`)
/// whose placeholders the drop can fill; `None` when none can.
fn fill_devices(pattern: &str, facts: &Facts) -> Option<String> {
    pattern
        .split('|')
        .find_map(|alternative| fill_one(alternative, facts))
}

fn fill_one(pattern: &str, facts: &Facts) -> Option<String> {
    let mut out = pattern.to_string();
    for name in crate::causes::table::CHANGE_PLACEHOLDERS {
        let slot = format!("{{{name}}}");
        if out.contains(&slot) {
            let value = match facts.get(name) {
                Some(facts::Value::Str(v)) if !v.starts_with('<') => v.into_owned(),
                _ => return None,
            };
            out = out.replace(&slot, &value);
        }
    }
    Some(out)
}

/// "11 s", "3 min 20 s", "2 h 5 min".
fn human_secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 10.0 {
        return format!("{s:.1} s");
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Repeats of one fold waiting for the next flush: verdict, sample drop, answer, packets, bytes.
type PendingRepeat = (Arc<Verdict>, Drop, Option<Answer>, u64, u64);

/// The attribution of a classified drop: netfilter facts from the probes or the stack, and
/// what the rules fetched while classifying it (nothing more is fetched here).
fn attribution(d: &Drop, facts: &Facts, verdict: &Verdict) -> Attribution {
    let fetched = facts.fetched();
    let mut a = Attribution {
        route: fetched.route.as_ref().map(|r| r.text.clone()),
        // The MTU the kernel compared with, when the route was looked up for it.
        path_mtu: fetched
            .route
            .as_ref()
            .and_then(|_| match facts.get("path_mtu") {
                Some(facts::Value::Int(m)) => u32::try_from(m).ok(),
                _ => None,
            }),
        tunnel: fetched.tunnel.map(|t| t.name),
        counters: fetched.counters,
        ..Default::default()
    };
    if &*d.reason == "NETFILTER_DROP" {
        a.hook = facts.nf_hook();
        a.hook_from = a.hook.map(|_| {
            if d.context.netfilter.and_then(|n| n.hook).is_some() {
                "probe"
            } else {
                "stack"
            }
        });
        a.engine = facts.get("nf_engine").map(|v| v.to_string());
        a.rule = fetched
            .rule
            .map(|m| format!("[{}] (+{} packets)", m.rule, m.packets));
        a.nf_family = facts.nf_family();
        a.nf_bridged = matches!(facts.get("nf_bridged"), Some(facts::Value::Bool(true)));
        if let Some(r) = &d.context.ruleset {
            a.nf_table = Some(r.table.clone());
            a.nf_chain = r.chain.clone();
        }
    }
    if verdict.cause == "unclassified" {
        if let Some(facts::Value::Str(frames)) = facts.get("frames") {
            if frames != "no stack" {
                a.stack = Some(frames.into_owned());
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        events::Answer,
        evidence::{counters::Counters, investigator::NfState, routes::Route, tunnels::Tunnel},
        output::{AttachInfo, DropRecord, Summary},
    };

    /// A namespace that answers nothing: every fact from live state is unknown.
    struct Silent;

    impl Investigator for Silent {
        fn exec_prefix(&mut self, _: u32) -> String {
            String::new()
        }
        fn netns_name(&mut self, _: u32) -> Option<String> {
            Some("dr-r".into())
        }
        fn netfilter(&mut self, _: &Drop, _: Option<Answer>) -> NfState {
            NfState::default()
        }
        fn route(&mut self, _: &Drop) -> Option<Route> {
            None
        }
        fn interfaces(&mut self, _: u32) -> Option<usize> {
            Some(2)
        }
        fn neighbours(&mut self, _: &Drop) -> Vec<String> {
            Vec::new()
        }
        fn sysctl(&mut self, _: u32, _: &str) -> Option<String> {
            None
        }
        fn counters(&mut self, _: u32) -> Counters {
            Counters::default()
        }
        fn tunnel(&mut self, _: u32, _: Option<String>, _: IpAddr, _: IpAddr) -> Option<Tunnel> {
            None
        }
        fn route_to(&mut self, _: u32, _: IpAddr) -> Option<Route> {
            None
        }
        fn ifname(&mut self, _: u32, ifindex: u32) -> Option<String> {
            Some(format!("if{ifindex}"))
        }
    }

    /// Keeps what the pipeline hands over.
    #[derive(Default)]
    struct Collect {
        records: Vec<DropRecord>,
    }

    impl Sink for Collect {
        fn attach(&mut self, _: &AttachInfo) {}
        fn drop(&mut self, r: &DropRecord) {
            self.records.push(r.clone());
        }
        fn summary(&mut self, _: &Summary) {}
    }

    fn pipeline(show_benign: bool) -> Pipeline {
        Pipeline::new(
            Engine::builtin(),
            Filter::default(),
            show_benign,
            Box::new(Silent),
            Traced {
                icmp: true,
                icmp6: false,
                rst: true,
            },
            Box::new(|_| Vec::new()),
            pods::Resolver::new(std::path::Path::new("/nonexistent-pods-root"), Vec::new()),
        )
    }

    fn drop_at(reason: &str, location: &str, skb: u64, dport: u16) -> Drop {
        let mut d = Drop::example(reason, location);
        d.skb = skb;
        d.ts_ns = skb * 1000;
        d.flow.as_mut().unwrap().ports = Some((40000, dport));
        d
    }

    #[test]
    fn the_summary_explains_a_cause_by_its_most_frequent_kind() {
        let mut p = pipeline(false);
        let mut sink = Collect::default();
        // One drop for port 53, three for port 80: the same cause, two explanations.
        p.push(
            Record::Drop(drop_at("NO_SOCKET", "__udp4_lib_rcv", 1, 53)),
            &mut sink,
        );
        for skb in 2..5 {
            p.push(
                Record::Drop(drop_at("NO_SOCKET", "__udp4_lib_rcv", skb, 80)),
                &mut sink,
            );
        }
        p.flush(&mut sink);
        let s = p.summary(4, 0, 1.0);
        let (cause, totals) = &s.causes[0];
        assert_eq!((cause.as_str(), totals.count), ("no_listener", 4));
        let (v, share) = totals.representative().unwrap();
        assert!(v.evidence.contains("port 80"), "{}", v.evidence);
        assert!((share - 0.75).abs() < 1e-9);
    }

    #[test]
    fn a_drop_is_not_called_unchanged_while_the_change_watcher_is_behind() {
        let mut p = pipeline(false);
        let (feed, publisher) = crate::changes::feed::feed().unwrap();
        p.watching(
            Watched {
                sysctl: true,
                xt_replace: true,
                netlink: true,
            },
            Arc::new(feed),
        );
        let mut sink = Collect::default();
        // The watcher has read nothing yet: after a short wait the drop is explained without
        // a claim about the settings it depends on.
        p.push(
            Record::Drop(drop_at("IP_INADDRERRORS", "ip_error", 1, 53)),
            &mut sink,
        );
        let ev = &sink.records[0].verdict.evidence;
        assert!(!ev.contains("unchanged"), "{ev}");
        assert!(ev.contains("not read yet"), "{ev}");
        // Once it has read past the drop, "unchanged" is true.
        publisher.publish(Vec::new(), u64::MAX);
        p.push(
            Record::Drop(drop_at("IP_INADDRERRORS", "ip_error", 2, 54)),
            &mut sink,
        );
        let ev = &sink.records[1].verdict.evidence;
        assert!(ev.contains("unchanged since dropscope started"), "{ev}");
    }

    #[test]
    fn hidden_drops_are_counted_not_reported() {
        let mut p = pipeline(false);
        let mut sink = Collect::default();
        p.push(
            Record::Drop(drop_at("NOT_SPECIFIED", "skb_release_data", 1, 80)),
            &mut sink,
        );
        p.push(
            Record::Drop(drop_at("NO_SOCKET", "ping_rcv", 2, 80)),
            &mut sink,
        );
        p.flush(&mut sink);
        assert!(sink.records.is_empty(), "{:?}", sink.records);
        let s = p.summary(2, 0, 1.0);
        assert!(s.causes.is_empty());
        let mut hidden = s.hidden.clone();
        hidden.sort();
        assert_eq!(
            hidden,
            vec![("benign".to_string(), 1), ("not_a_drop".to_string(), 1)]
        );
        // With --all they are reported, marked benign.
        let mut p = pipeline(true);
        p.push(
            Record::Drop(drop_at("NOT_SPECIFIED", "skb_release_data", 1, 80)),
            &mut sink,
        );
        assert_eq!(sink.records.len(), 1);
        assert!(sink.records[0].verdict.benign);
    }

    #[test]
    fn an_answer_pairs_with_the_drop_of_its_packet_only() {
        let mut p = pipeline(false);
        let mut sink = Collect::default();
        let d = drop_at("NO_SOCKET", "__udp4_lib_rcv", 7, 9999);
        p.push(
            Record::Reply(Reply {
                ts_ns: d.ts_ns - 10,
                skb: 7,
                answer: Answer::Icmp(3, 3),
                flow: d.flow,
            }),
            &mut sink,
        );
        p.push(Record::Drop(d), &mut sink);
        // Another packet at another address: no answer of its own.
        p.push(
            Record::Drop(drop_at("NO_SOCKET", "__udp4_lib_rcv", 8, 9998)),
            &mut sink,
        );
        assert_eq!(sink.records[0].answer, Some(Answer::Icmp(3, 3)));
        assert!(sink.records[0]
            .verdict
            .evidence
            .contains("ICMP sent: port unreachable"));
        assert!(sink.records[1].verdict.evidence.contains("ICMP sent: none"));
        // IPv6: this pipeline cannot see ICMPv6 errors, so "none" would be a false claim.
        let mut v6 = drop_at("NO_SOCKET", "__udp6_lib_rcv", 9, 9997);
        let f = v6.flow.as_mut().unwrap();
        f.family = crate::events::Family::Ipv6;
        (f.src, f.dst) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        p.push(Record::Drop(v6), &mut sink);
        let ev = &sink.records[2].verdict.evidence;
        assert!(ev.contains("ICMP sent: unknown"), "{ev}");
    }

    #[test]
    fn counts_the_kernel_kept_but_did_not_send_are_reported_and_reconciled() {
        let mut p = pipeline(false);
        let mut sink = Collect::default();
        let d = drop_at("QDISC_DROP", "__dev_queue_xmit", 1, 80);
        let key = d.agg;
        p.push(Record::Drop(d), &mut sink);
        let val = AggVal {
            packets: 10,
            bytes: 600,
            suppressed: 9,
            ..Default::default()
        };
        p.reconcile(
            &[(key, val)],
            |_| unreachable!("the key has events"),
            &mut sink,
            true,
        );
        let sampled: Vec<&DropRecord> =
            sink.records.iter().filter(|r| r.unsent.is_some()).collect();
        assert_eq!((sampled.len(), sampled[0].count), (1, 9));
        assert!(p.counts_exact);
        let s = p.summary(10, 0, 1.0);
        assert_eq!(s.causes[0].1.count, 10);
    }
}
