//! events -> correlate -> filter -> classify -> fold -> sinks.
//!
//! Identical drops are folded: the first is reported at once, repeats are counted and reported
//! as one record per flush interval. Classification runs once per distinct drop, not per packet.
use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{AggKey, AggVal};

use crate::{
    capture::{Packet, PacketTap},
    causes::{facts, Verdict},
    changes::{feed::Feed, ChangeLog},
    classify::{Classifier, Done, Job, Runner},
    events::{Answer, Device, DropEvent, Flow, Record, Reply, Sysctls},
    filter::Filter,
    output::{Clock, DropRecord, Sink, Summary},
    pods,
};

pub use crate::causes::facts::Traced;
pub use changes::Watched;
pub use totals::CauseTotals;

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
    sample: DropEvent,
    answer: Option<Answer>,
    /// Repeats since the last flush (while waiting for the verdict: every drop after the
    /// first, hidden ones included).
    pending: u64,
    /// Bytes of the pending repeats.
    pending_bytes: u64,
    /// While waiting for the verdict: the first drops with their packets, for the tap.
    waiting: Vec<(DropEvent, Option<Arc<Packet>>)>,
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
    sample: DropEvent,
    answer: Option<Answer>,
    events: u64,
    reported_suppressed: u64,
    reported_lost: u64,
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
        d: &DropEvent,
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

    fn new_job(&mut self, d: &DropEvent, answer: Option<Answer>, frag_needed_dropped: bool) -> Job {
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
    fn answer_for(&mut self, d: &DropEvent) -> Option<Answer> {
        let r = self.replies.remove(&d.skb)?;
        let same = |a: Option<Flow>, b: Option<Flow>| {
            a.map(|f| (f.src, f.dst)) == b.map(|f| (f.src, f.dst))
        };
        (d.ts_ns.saturating_sub(r.ts_ns) < REPLY_PAIR_WINDOW_NS && same(r.flow, d.flow))
            .then_some(r.answer)
    }

    fn on_drop(&mut self, mut d: DropEvent, sink: &mut dyn Sink) {
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
    fn track_frag_needed(&mut self, d: &DropEvent) -> bool {
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
    fn name_arrival(&mut self, d: &mut DropEvent) {
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

    fn record(
        &mut self,
        v: &Arc<Verdict>,
        d: &DropEvent,
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
        mut synthetic: impl FnMut(&AggKey) -> DropEvent,
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

/// Repeats of one fold waiting for the next flush: verdict, sample drop, answer, packets, bytes.
type PendingRepeat = (Arc<Verdict>, DropEvent, Option<Answer>, u64, u64);

/// A verdict reached without evidence, saying why.
fn without_evidence(mut done: Done, why: &str) -> Done {
    done.verdict
        .evidence
        .push_str(&format!(" (evidence not gathered: {why})"));
    done
}

mod changes;
mod totals;

#[cfg(test)]
mod tests;
