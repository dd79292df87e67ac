//! events -> correlate -> filter -> classify -> fold -> sinks.
//!
//! Identical drops are folded: the first is reported at once, repeats are counted and reported
//! as one record per flush interval. Classification runs once per distinct drop, not per packet.
use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{AggKey, AggVal};

use crate::{
    capture::{Packet, PacketTap},
    causes::{facts, Verdict},
    changes::{feed::Feed, Change, ChangeKind, ChangeLog},
    classify::{Classifier, Done, Job, Runner},
    events::{Answer, Device, Drop, Flow, Record, Reply, Sysctls},
    filter::Filter,
    output::{ChangeRecord, Clock, DropRecord, Sink, Summary},
    pods::{self, PodRef},
};

pub use crate::causes::facts::Traced;

/// How long the end of a session waits for the evidence of drops still being classified.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a dropped "fragmentation needed" explains later too-big drops of its flow (ns).
const FRAG_NEEDED_WINDOW_NS: u64 = 2_000_000_000;
/// How long an answer (ICMP error, TCP reset) waits for the drop of the same packet (ns).
const REPLY_PAIR_WINDOW_NS: u64 = 100_000_000;
/// Distinct drops remembered for folding before the table is flushed and restarted.
const MAX_FOLDS: usize = 8192;
/// A fold with no drop for this long is forgotten (ns): a storm of ever-new flows must not
/// keep every one of them. A flow that comes back later is reported afresh.
const FOLD_IDLE_NS: u64 = 10_000_000_000;
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
    /// `None` while the evidence worker classifies its first drop.
    verdict: Option<Arc<Verdict>>,
    sample: Drop,
    answer: Option<Answer>,
    /// Repeats since the last flush (while waiting for the verdict: every drop after the
    /// first, hidden ones included).
    pending: u64,
    /// Bytes of the pending repeats.
    pending_bytes: u64,
    /// While waiting for the verdict: the first drops with their packets, for the tap.
    waiting: Vec<(Drop, Option<Arc<Packet>>)>,
}

/// Drops (with packets) a fold keeps for the tap while its verdict is awaited, at most; a
/// burst on one flow usually comes before its evidence does.
const WAITING_PACKETS: usize = 1024;
/// Drops (with packets) all folds keep for the tap while their verdicts are awaited, at most.
const WAITING_TOTAL: usize = 8192;

/// What a job's verdict is for.
enum Origin {
    /// The first drop of a fold.
    Fold(FoldKey),
    /// A kernel aggregation key that had no event of its own.
    Key(AggKey),
}

/// What userspace knows about one kernel aggregation key: the cause of its latest sampled
/// drop, and how many of its unsent drops have been reported already.
struct KeyState {
    /// `None` while its drop is being classified.
    verdict: Option<Arc<Verdict>>,
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
    filter: Filter,
    show_benign: bool,
    /// Classifies with evidence (on a worker thread in a session).
    runner: Runner,
    /// Classifies from what the kernel reported alone, when the runner's queue is full; its
    /// investigator answers namespace and interface names for the loop.
    blind: Classifier,
    /// Jobs given to the runner, by id.
    jobs: HashMap<u64, Origin>,
    next_job: u64,
    /// Drops classified without evidence because the runner's queue was full.
    pub evidence_skipped: u64,
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
    /// The latest drop's time (kernel clock, ns).
    newest_ns: u64,
    /// Receives every reported drop with its packet bytes (`--pcap`, the flight recorder).
    tap: Option<Box<dyn PacketTap>>,
    /// Drops held in all folds' `waiting` lists.
    waiting_total: usize,
    /// Unsent drops whose match with the filter expression is unknown (see `Summary`).
    pub unchecked: u64,
    /// Events userspace filtered out, per kernel key: they are part of the key's count.
    rejected: HashMap<AggKey, u64>,
}

impl Pipeline {
    /// `runner` classifies with evidence; `blind` without (see [`Pipeline::blind`]).
    pub fn new(
        filter: Filter,
        show_benign: bool,
        runner: Runner,
        blind: Classifier,
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
            runner,
            blind,
            jobs: HashMap::new(),
            next_job: 0,
            evidence_skipped: 0,
            stacks,
            keys: HashMap::new(),
            counts_exact: true,
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
            newest_ns: 0,
            tap: None,
            waiting_total: 0,
            unchecked: 0,
            rejected: HashMap::new(),
        }
    }

    /// Hands every reported drop, with its packet, to `tap` as well.
    pub fn set_tap(&mut self, tap: Box<dyn PacketTap>) {
        self.tap = Some(tap);
    }

    pub fn tap_mut(&mut self) -> Option<&mut (dyn PacketTap + 'static)> {
        self.tap.as_deref_mut()
    }

    fn tap_packet(
        &mut self,
        d: &Drop,
        packet: Option<&Arc<Packet>>,
        v: &Verdict,
        answer: Option<Answer>,
    ) {
        if let Some(tap) = self.tap.as_mut() {
            let names = self.blind.investigator();
            tap.packet(d, packet, v, answer, &mut |ns| names.netns_name(ns));
        }
    }

    /// Notified when the evidence worker has verdicts to hand over ([`Pipeline::take_verdicts`]).
    pub fn verdicts_ready(&self) -> Arc<tokio::sync::Notify> {
        self.runner.notifier()
    }

    /// Reports the drops whose verdicts arrived.
    pub fn take_verdicts(&mut self, sink: &mut dyn Sink) {
        for done in self.runner.take() {
            self.resolved(done, sink);
        }
    }

    /// Waits (at most [`SETTLE`]) for the drops still being classified; what is still
    /// waiting then is classified without evidence.
    pub fn settle(&mut self, sink: &mut dyn Sink) {
        let deadline = std::time::Instant::now() + SETTLE;
        while !self.jobs.is_empty() && std::time::Instant::now() < deadline {
            match self.runner.wait(deadline) {
                Some(done) => self.resolved(done, sink),
                None => break,
            }
        }
        let late: Vec<u64> = self.jobs.keys().copied().collect();
        for id in late {
            if let Some(job) = self.job_again(id) {
                let done = self.blind.classify(&job);
                self.evidence_skipped += 1;
                self.resolved(without_evidence(done, "it took too long"), sink);
            }
        }
    }

    /// A waiting job rebuilt from what its origin kept (to classify it here instead).
    fn job_again(&mut self, id: u64) -> Option<Job> {
        let (drop, answer, frag_needed_dropped) = match self.jobs.get(&id)? {
            Origin::Fold(key) => {
                let f = self.folds.get(key)?;
                (f.sample.clone(), f.answer, key.frag_needed_dropped)
            }
            Origin::Key(agg) => {
                let k = self.keys.get(agg)?;
                (k.sample.clone(), k.answer, false)
            }
        };
        let stack = drop.stack_id.map(|sid| (self.stacks)(sid)).unwrap_or_default();
        Some(Job {
            id,
            drop,
            answer,
            frag_needed_dropped,
            stack,
        })
    }

    /// Hands a drop to the runner; when its queue is full, classifies it here without
    /// evidence. Returns the verdict when it is known at once.
    fn classify(&mut self, job: Job, origin: Origin, sink: &mut dyn Sink) -> Option<Arc<Verdict>> {
        let id = job.id;
        match self.runner.submit(job) {
            Ok(()) => {
                self.jobs.insert(id, origin);
                // An inline runner has answered already.
                for done in self.runner.take() {
                    self.resolved(done, sink);
                }
                None
            }
            Err(job) => {
                let done = self.blind.classify(&job);
                self.evidence_skipped += 1;
                let done = without_evidence(done, "too many new kinds of drop at once");
                Some(Arc::new(self.join_change(done, &job.drop, sink)))
            }
        }
    }

    fn new_job(&mut self, d: &Drop, answer: Option<Answer>, frag_needed_dropped: bool) -> Job {
        self.next_job += 1;
        Job {
            id: self.next_job,
            drop: d.clone(),
            answer,
            frag_needed_dropped,
            stack: d.stack_id.map(|id| (self.stacks)(id)).unwrap_or_default(),
        }
    }

    /// A verdict arrived: the first drop of its fold is reported, with the repeats that
    /// arrived meanwhile counted.
    fn resolved(&mut self, done: Done, sink: &mut dyn Sink) {
        let Some(origin) = self.jobs.remove(&done.id) else {
            return;
        };
        match origin {
            Origin::Key(agg) => {
                let Some(sample) = self.keys.get(&agg).map(|k| k.sample.clone()) else {
                    return;
                };
                let verdict = Arc::new(self.join_change(done, &sample, sink));
                if let Some(k) = self.keys.get_mut(&agg) {
                    k.verdict = Some(verdict);
                }
            }
            Origin::Fold(key) => {
                let Some((d, answer)) = self.folds.get(&key).map(|f| (f.sample.clone(), f.answer))
                else {
                    return;
                };
                let verdict = Arc::new(self.join_change(done, &d, sink));
                let Some(fold) = self.folds.get_mut(&key) else {
                    return;
                };
                fold.verdict = Some(verdict.clone());
                let waiting = std::mem::take(&mut fold.waiting);
                self.waiting_total -= waiting.len();
                let repeats = fold.pending;
                let shown = self.show_benign || !verdict.benign;
                if !shown {
                    fold.pending = 0;
                    fold.pending_bytes = 0;
                }
                self.count_n(&verdict, &d, 1 + repeats);
                if let Some(k) = self.keys.get_mut(&d.agg) {
                    if k.verdict.is_none() {
                        k.verdict = Some(verdict.clone());
                    }
                }
                if shown {
                    sink.drop(&self.record(&verdict, &d, answer, 1, true));
                    for (d, packet) in waiting {
                        self.tap_packet(&d, packet.as_ref(), &verdict, answer);
                    }
                }
            }
        }
    }

    /// Names the latest change of the settings the cause depends on, or says there was none.
    /// The evidence worker waited for the changes made before the drop to be read (see
    /// [`Feed::wait_for`]); they are taken here.
    fn join_change(&mut self, done: Done, d: &Drop, sink: &mut dyn Sink) -> Verdict {
        let mut verdict = done.verdict;
        if done.patterns.is_empty() || verdict.benign {
            return verdict;
        }
        self.take_changes(sink);
        match self.changes.latest(d.netns, &done.patterns, d.ts_ns) {
            Some(c) => {
                verdict
                    .evidence
                    .push_str(&format!("; {}", self.describe(&c, d.ts_ns)));
                verdict.attribution.change = Some(c);
            }
            None if !done.changes_read => verdict.evidence.push_str(
                "; changes just before this drop not read yet (the change watcher is behind)",
            ),
            None => verdict.evidence.push_str(&self.unchanged(&done.patterns)),
        }
        verdict
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
        self.folds
            .retain(|k, f| k.netns != c.netns || f.verdict.is_none());
        self.changes.push(c.clone());
        sink.change(&ChangeRecord {
            netns_name: self.blind.investigator().netns_name(c.netns),
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
        self.newest_ns = self.newest_ns.max(d.ts_ns);
        // The bytes go to the tap only; the drop is kept without them.
        let packet = d.packet.take();
        let answer = self.answer_for(&d);
        d.pod = self.pods.for_drop(d.netns, d.flow.as_ref());
        self.name_arrival(&mut d);
        if !self.filter.matches(&d) {
            self.filtered += 1;
            if self.rejected.len() < 2 * agent_ebpf::AGG_ENTRIES as usize {
                *self.rejected.entry(d.agg).or_default() += 1;
            }
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
            if let Some(k) = self.keys.get_mut(&d.agg) {
                k.events += 1;
            }
            let Some(verdict) = fold.verdict.clone() else {
                // Still being classified: counted when the verdict arrives.
                fold.pending += 1;
                fold.pending_bytes += u64::from(d.len);
                if self.tap.is_some()
                    && fold.waiting.len() < WAITING_PACKETS
                    && self.waiting_total < WAITING_TOTAL
                {
                    fold.waiting.push((d, packet));
                    self.waiting_total += 1;
                }
                return;
            };
            if self.show_benign || !verdict.benign {
                fold.pending += 1;
                fold.pending_bytes += u64::from(d.len);
            }
            fold.sample.ts_ns = d.ts_ns;
            self.count(&verdict, &d);
            if self.show_benign || !verdict.benign {
                self.tap_packet(&d, packet.as_ref(), &verdict, answer);
            }
            return;
        }
        if self.folds.len() >= MAX_FOLDS {
            self.flush(sink);
            // Folds still waiting for their verdict hold counts: they stay.
            self.folds.retain(|_, f| f.verdict.is_none());
        }
        let k = self.keys.entry(d.agg).or_insert_with(|| KeyState {
            verdict: None,
            sample: d.clone(),
            answer,
            events: 0,
            reported_suppressed: 0,
            reported_lost: 0,
        });
        k.events += 1;
        (k.sample, k.answer) = (d.clone(), answer);
        self.folds.insert(
            key.clone(),
            Fold {
                verdict: None,
                sample: d.clone(),
                answer,
                pending: 0,
                pending_bytes: 0,
                waiting: if self.tap.is_some() {
                    self.waiting_total += 1;
                    vec![(d.clone(), packet)]
                } else {
                    Vec::new()
                },
            },
        );
        let job = self.new_job(&d, answer, frag_needed_dropped);
        if let Some(verdict) = self.classify(job, Origin::Fold(key.clone()), sink) {
            // Classified here at once, without evidence.
            self.count(&verdict, &d);
            if let Some(k) = self.keys.get_mut(&d.agg) {
                k.verdict = Some(verdict.clone());
            }
            let waiting = match self.folds.get_mut(&key) {
                Some(f) => {
                    f.verdict = Some(verdict.clone());
                    self.waiting_total -= f.waiting.len();
                    std::mem::take(&mut f.waiting)
                }
                None => Vec::new(),
            };
            if self.show_benign || !verdict.benign {
                sink.drop(&self.record(&verdict, &d, answer, 1, true));
                for (d, packet) in waiting {
                    self.tap_packet(&d, packet.as_ref(), &verdict, answer);
                }
            }
        }
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
        let Some(name) = self.blind.investigator().ifname(d.netns, iif) else {
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
            netns_name: self.blind.investigator().netns_name(d.netns),
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
                if val.sampled_out + val.lost == 0 {
                    continue;
                }
                let mut d = synthetic(key);
                d.pod = self.pods.for_drop(d.netns, d.flow.as_ref());
                // No event: only what the kernel could not filter is checked here.
                if !self.filter.matches_unsent(&d) {
                    continue;
                }
                self.keys.insert(
                    *key,
                    KeyState {
                        verdict: None,
                        sample: d.clone(),
                        answer: None,
                        events: 0,
                        reported_suppressed: 0,
                        reported_lost: 0,
                    },
                );
                let job = self.new_job(&d, None, false);
                if let Some(v) = self.classify(job, Origin::Key(*key), sink) {
                    if let Some(k) = self.keys.get_mut(key) {
                        k.verdict = Some(v);
                    }
                }
            }
            let st = self.keys.get_mut(key).expect("inserted above");
            // Not classified yet: its unsent drops are reported on a later pass.
            let Some(verdict) = st.verdict.clone() else {
                if final_pass {
                    self.counts_exact = false;
                }
                continue;
            };
            let sampled = val.sampled_out.saturating_sub(std::mem::replace(
                &mut st.reported_suppressed,
                val.sampled_out,
            ));
            let lost = val
                .lost
                .saturating_sub(std::mem::replace(&mut st.reported_lost, val.lost));
            let (sample, answer, events) = (st.sample.clone(), st.answer, st.events);
            let rejected = self.rejected.get(key).copied().unwrap_or(0);
            if final_pass && events + rejected + val.sampled_out + val.lost != val.packets {
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
        if final_pass && !self.filter.kernel_exact() {
            // Part of the filter runs in userspace only: drops the kernel counted but did
            // not send were never checked against it.
            self.unchecked = kernel.iter().map(|(_, v)| v.sampled_out + v.lost).sum();
            if self.unchecked > 0 {
                self.counts_exact = false;
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
            .filter_map(|f| {
                let verdict = f.verdict.clone()?;
                let (count, bytes) = (
                    std::mem::take(&mut f.pending),
                    std::mem::take(&mut f.pending_bytes),
                );
                Some((verdict, f.sample.clone(), f.answer, count, bytes))
            })
            .collect();
        for (v, d, answer, count, bytes) in pending {
            let mut rec = self.record(&v, &d, answer, count, false);
            rec.bytes = bytes;
            sink.drop(&rec);
        }
        let newest = self.newest_ns;
        self.folds.retain(|_, f| {
            f.verdict.is_none() || newest.saturating_sub(f.sample.ts_ns) < FOLD_IDLE_NS
        });
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
            evidence_skipped: self.evidence_skipped,
            agg_full: 0,
            stalls: Default::default(),
            packets: None,
            unchecked: self.unchecked,
            ..Default::default()
        }
    }
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

/// A verdict reached without evidence, saying why.
fn without_evidence(mut done: Done, why: &str) -> Done {
    done.verdict
        .evidence
        .push_str(&format!(" (evidence not gathered: {why})"));
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        causes::Engine,
        events::Answer,
        evidence::investigator::Investigator,
        output::{AttachInfo, DropRecord, Summary},
    };

    /// A namespace that answers names only: every fact from live state is unknown.
    struct Silent;

    impl Investigator for Silent {
        fn netns_name(&mut self, _: u32) -> Option<String> {
            Some("dr-r".into())
        }
        fn interfaces(&mut self, _: u32) -> Option<usize> {
            Some(2)
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
        let traced = Traced {
            icmp: true,
            icmp6: false,
            rst: true,
        };
        Pipeline::new(
            Filter::default(),
            show_benign,
            Runner::inline(Classifier::new(Engine::builtin(), Box::new(Silent), traced)),
            Classifier::new(Engine::builtin(), Box::new(Silent), traced),
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
        let (feed, publisher) = crate::changes::feed::feed().unwrap();
        let feed = Arc::new(feed);
        let traced = Traced {
            icmp: true,
            icmp6: false,
            rst: true,
        };
        let classifier = || Classifier::new(Engine::builtin(), Box::new(Silent), traced);
        let mut p = Pipeline::new(
            Filter::default(),
            false,
            Runner::inline(classifier().with_changes(feed.clone())),
            classifier(),
            Box::new(|_| Vec::new()),
            pods::Resolver::new(std::path::Path::new("/nonexistent-pods-root"), Vec::new()),
        );
        p.watching(
            Watched {
                sysctl: true,
                xt_replace: true,
                netlink: true,
            },
            feed,
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
            sampled_out: 9,
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

    /// Silent, but every classification waits until the gate opens.
    struct Gated(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

    impl Gated {
        fn wait(&self) {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
        }
    }

    impl Investigator for Gated {
        fn exec_prefix(&mut self, _: u32) -> String {
            self.wait();
            String::new()
        }
        fn netns_name(&mut self, n: u32) -> Option<String> {
            Silent.netns_name(n)
        }
        fn interfaces(&mut self, n: u32) -> Option<usize> {
            Silent.interfaces(n)
        }
        fn ifname(&mut self, n: u32, i: u32) -> Option<String> {
            Silent.ifname(n, i)
        }
    }

    /// A pipeline whose evidence worker waits for the returned gate.
    fn gated_pipeline() -> (Pipeline, Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>) {
        let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let traced = Traced::NONE;
        let inner = gate.clone();
        let runner = Runner::spawn(move || {
            Classifier::new(Engine::builtin(), Box::new(Gated(inner)), traced)
        })
        .unwrap();
        let p = Pipeline::new(
            Filter::default(),
            false,
            runner,
            Classifier::new(Engine::builtin(), Box::new(Silent), traced),
            Box::new(|_| Vec::new()),
            pods::Resolver::new(std::path::Path::new("/nonexistent-pods-root"), Vec::new()),
        );
        (p, gate)
    }

    fn open(gate: &(std::sync::Mutex<bool>, std::sync::Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn drops_that_arrive_while_evidence_is_gathered_are_counted() {
        let (mut p, gate) = gated_pipeline();
        let mut sink = Collect::default();
        for skb in 1..=5 {
            p.push(
                Record::Drop(drop_at("NO_SOCKET", "__udp4_lib_rcv", skb, 53)),
                &mut sink,
            );
        }
        // The loop did not wait: nothing is reported yet, nothing is lost.
        assert!(sink.records.is_empty());
        assert!(p.summary(5, 0, 1.0).causes.is_empty());
        open(&gate);
        p.settle(&mut sink);
        p.flush(&mut sink);
        let counts: Vec<(bool, u64)> = sink.records.iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(counts, [(true, 1), (false, 4)]);
        assert_eq!(p.summary(5, 0, 1.0).causes[0].1.count, 5);
        assert_eq!(p.evidence_skipped, 0);
    }

    #[test]
    fn a_full_evidence_queue_never_holds_up_the_loop() {
        let (mut p, gate) = gated_pipeline();
        let mut sink = Collect::default();
        // More new kinds of drop than the queue holds (one more may be in the worker's hands).
        let n = crate::classify::QUEUE as u64 + 5;
        for skb in 1..=n {
            p.push(
                Record::Drop(drop_at("NO_SOCKET", "__udp4_lib_rcv", skb, 1000 + skb as u16)),
                &mut sink,
            );
        }
        assert!(p.evidence_skipped >= 4, "{}", p.evidence_skipped);
        assert_eq!(sink.records.len() as u64, p.evidence_skipped);
        assert!(sink.records.iter().all(|r| r
            .verdict
            .evidence
            .ends_with("(evidence not gathered: too many new kinds of drop at once)")));
        open(&gate);
        p.settle(&mut sink);
        assert_eq!(sink.records.len() as u64, n);
        assert_eq!(p.summary(n, 0, 1.0).causes[0].1.count, n);
    }
}

