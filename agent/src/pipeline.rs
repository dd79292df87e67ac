//! events -> correlate -> filter -> classify -> fold -> sinks.
//!
//! Identical drops are folded: the first is reported at once, repeats are counted and reported
//! as one record per flush interval. Classification runs once per distinct drop, not per packet.
use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{AggKey, AggVal};

use crate::{
    causes::{facts, Engine, Facts, Verdict},
    events::{Answer, Device, Drop, Flow, Record, Reply, Sysctls},
    evidence::{conntrack::CtStats, netfilter, netns, routes, rules},
    filter::Filter,
    output::{DropRecord, Sink, Summary},
    pods::{self, PodRef},
};

/// How long a dropped "fragmentation needed" explains later too-big drops of its flow (ns).
const FRAG_NEEDED_WINDOW_NS: u64 = 2_000_000_000;
/// How long an answer (ICMP error, TCP reset) waits for the drop of the same packet (ns).
const REPLY_PAIR_WINDOW_NS: u64 = 100_000_000;
/// Distinct drops remembered for folding before the table is flushed and restarted.
const MAX_FOLDS: usize = 65_536;
/// Distinct flows (and pods) remembered per cause for the summary.
const MAX_FLOWS_PER_CAUSE: usize = 1024;

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
    pub evidence: String,
    pub hint: String,
    pub reasons: HashMap<Arc<str>, u64>,
    pub locations: HashMap<Arc<str>, u64>,
    pub ifaces: HashMap<Device, u64>,
    pub flows: HashMap<Flow, u64>,
    pub pods: HashMap<Arc<PodRef>, u64>,
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
}

pub struct Pipeline {
    engine: Engine,
    filter: Filter,
    show_benign: bool,
    namespaces: netns::Registry,
    pods: pods::Resolver,
    replies: HashMap<u64, Reply>,
    folds: HashMap<FoldKey, Fold>,
    nf_engines: HashMap<(u32, Arc<str>), &'static str>,
    /// Where an ICMP "fragmentation needed" was just dropped: (netns, its destination) -> time.
    frag_needed_drops: HashMap<(u32, std::net::IpAddr), u64>,
    rules: rules::Tracker,
    stacks: StackReader,
    keys: HashMap<AggKey, KeyState>,
    /// Whether every kernel count so far was matched by events plus reported unsent drops.
    pub counts_exact: bool,
    pub causes: HashMap<String, CauseTotals>,
    pub reasons: HashMap<Arc<str>, u64>,
    pub suppressed: u64,
    pub filtered: u64,
    pub drops: u64,
}

impl Pipeline {
    pub fn new(
        engine: Engine,
        filter: Filter,
        show_benign: bool,
        rules: rules::Tracker,
        stacks: StackReader,
        pods: pods::Resolver,
    ) -> Self {
        Pipeline {
            pods,
            rules,
            stacks,
            keys: HashMap::new(),
            counts_exact: true,
            engine,
            filter,
            show_benign,
            namespaces: netns::Registry::new(),
            replies: HashMap::new(),
            folds: HashMap::new(),
            nf_engines: HashMap::new(),
            frag_needed_drops: HashMap::new(),
            causes: HashMap::new(),
            reasons: HashMap::new(),
            suppressed: 0,
            filtered: 0,
            drops: 0,
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
        let verdict = Arc::new(self.classify(&d, answer, frag_needed_dropped));
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

    fn classify(&mut self, d: &Drop, answer: Option<Answer>, frag_needed_dropped: bool) -> Verdict {
        let icmp_sent = match answer {
            Some(Answer::Icmp(t, c)) => Some((t, c)),
            _ => None,
        };
        let netfilter = &*d.reason == "NETFILTER_DROP";
        // The probes name hook and engine directly; the stack and the namespace's tables
        // are the fallback when they are not attached.
        let probed_engine = d.context.ruleset.as_ref().map(|r| r.engine);
        let nf_engine = netfilter.then(|| probed_engine.unwrap_or_else(|| self.nf_engine(d)));
        let (nf_rule, ct) = if netfilter {
            self.dropping_rule(d, icmp_sent)
        } else {
            (None, None)
        };
        let stack = d.stack_id.map(|id| (self.stacks)(id)).unwrap_or_default();
        let probed_hook = d.context.netfilter.and_then(|n| n.hook);
        let nf_hook = if netfilter {
            probed_hook.or_else(|| netfilter::hook_from_stack(&stack))
        } else {
            None
        };
        let (route, ifaces) = match (needs_route(d), self.netns_path(d.netns)) {
            (true, Some(path)) => routes::lookup(path.as_deref(), d.flow.map(|f| f.dst)),
            _ => (None, None),
        };
        let neighbours = match (needs_neighbours(d), self.netns_path(d.netns), d.dev) {
            (true, Some(path), Some(dev)) => routes::unresolved_neighbours(
                path.as_deref(),
                dev.name().to_string(),
                d.flow.map(|f| f.dst),
            ),
            _ => Vec::new(),
        };
        let nsexec = self.namespaces.exec_prefix(d.netns);
        let rst_sent = answer == Some(Answer::TcpReset);
        let facts = Facts {
            drop: d,
            icmp_sent,
            rst_sent,
            nf_engine,
            nsexec,
            nf_rule,
            nf_hook,
            ct,
            frag_needed_dropped,
            route,
            ifaces,
            neighbours,
        };
        let mut verdict = self.engine.classify(&facts);
        if netfilter {
            for (key, fact) in [
                ("hook", "nf_hook"),
                ("engine", "nf_engine"),
                ("rule", "nf_rule"),
            ] {
                if let Some(v) = facts.get(fact) {
                    verdict.details.push((key, v.to_string()));
                }
            }
            verdict.details.extend(probe_details(&d.context));
        }
        if let Some(route) = &facts.route {
            verdict.details.push(("route", route.clone()));
        }
        if verdict.cause == "unclassified" && !stack.is_empty() {
            // Something to act on when no rule knows the drop: where it came from.
            let frames: Vec<&str> = stack.iter().skip(1).take(6).map(|f| &**f).collect();
            verdict.details.push(("stack", frames.join(" <- ")));
        }
        verdict
    }

    /// The DROP/REJECT rule whose counter moved with this drop, and conntrack's counters.
    /// Rules that cannot have matched the packet are excluded; an ICMP error sent with the
    /// drop prefers a REJECT rule, its absence a DROP rule; otherwise the rule that moved most.
    fn dropping_rule(
        &mut self,
        d: &Drop,
        icmp_sent: Option<(u8, u8)>,
    ) -> (Option<rules::Moved>, Option<CtStats>) {
        let Some(path) = self.netns_path(d.netns) else {
            return (None, None);
        };
        let fields = packet_fields(d);
        let mut found = rules::Attribution::default();
        for fresh in [false, true] {
            found = self.rules.attribute(d.netns, path.as_deref(), fresh);
            found.moved.retain(|m| m.matcher.could_match(&fields));
            if !found.moved.is_empty() {
                break;
            }
        }
        let is_reject = |m: &&rules::Moved| matches!(m.verdict, rules::Verdict::Reject(_));
        let preferred = match icmp_sent {
            Some(_) => found.moved.iter().find(is_reject),
            None => found.moved.iter().find(|m| !is_reject(m)),
        };
        (preferred.or(found.moved.first()).cloned(), found.ct)
    }

    /// How to enter `netns`: `Some(None)` for dropscope's own namespace, `None` if unreachable.
    fn netns_path(&mut self, netns: u32) -> Option<Option<std::path::PathBuf>> {
        if netns == self.namespaces.own() {
            return Some(None);
        }
        self.namespaces.get(netns).map(|r| Some(r.path.clone()))
    }

    /// The netfilter engine for a drop, looked up once per namespace and location.
    fn nf_engine(&mut self, d: &Drop) -> &'static str {
        let key = (d.netns, d.location.clone());
        if let Some(e) = self.nf_engines.get(&key) {
            return e;
        }
        let ns = self.namespaces.get(d.netns).cloned();
        let engine = netfilter::engine(&d.location, ns.as_ref());
        self.nf_engines.insert(key, engine);
        engine
    }

    fn count(&mut self, v: &Verdict, d: &Drop) {
        self.count_n(v, d, 1);
    }

    /// Adds `n` drops like `d` to the totals.
    fn count_n(&mut self, v: &Verdict, d: &Drop, n: u64) {
        if v.benign && !self.show_benign {
            self.suppressed += n;
            return;
        }
        *self.reasons.entry(d.reason.clone()).or_default() += n;
        // Hot path: no allocation once a cause, flow and device have been seen.
        if !self.causes.contains_key(v.cause.as_str()) {
            let fresh = CauseTotals {
                title: v.title.clone(),
                evidence: v.evidence.clone(),
                hint: v.hint.clone(),
                ..Default::default()
            };
            self.causes.insert(v.cause.clone(), fresh);
        }
        let t = self
            .causes
            .get_mut(v.cause.as_str())
            .expect("inserted above");
        t.count += n;
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
            netns_name: self.namespaces.name(d.netns),
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
                let verdict = Arc::new(self.classify(&d, None, false));
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
        Summary {
            causes,
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
        }
    }
}

/// The fields of a drop that firewall rules commonly match on.
/// Repeats of one fold waiting for the next flush: verdict, sample drop, answer, packets, bytes.
type PendingRepeat = (Arc<Verdict>, Drop, Option<Answer>, u64, u64);

/// Netfilter facts straight from the probes: family, table and chain of the dropping ruleset.
fn probe_details(c: &crate::events::Context) -> Vec<(&'static str, String)> {
    let mut details = Vec::new();
    if let Some(family) = c.netfilter.and_then(|n| n.family) {
        details.push(("nf_family", family.to_string()));
    }
    if let Some(r) = &c.ruleset {
        details.push(("nf_table", r.table.clone()));
        if let Some(chain) = &r.chain {
            details.push(("nf_chain", chain.clone()));
        }
    }
    if c.netfilter.is_some() {
        details.push(("hook_from", "probe".to_string()));
    }
    details
}

fn packet_fields(d: &Drop) -> rules::PacketFields {
    let flow = d.flow.as_ref();
    rules::PacketFields {
        proto: flow.map(|f| f.proto),
        sport: flow.and_then(|f| f.ports).map(|p| p.0),
        dport: flow.and_then(|f| f.ports).map(|p| p.1),
        src: flow.map(|f| f.src),
        dst: flow.map(|f| f.dst),
        iif: d.dev.map(|dev| dev.name().to_string()),
        oif: d.out.map(|dev| dev.name().to_string()),
    }
}

/// Drops whose explanation depends on the routing table of their namespace.
fn needs_route(d: &Drop) -> bool {
    matches!(
        &*d.reason,
        "IP_INNOROUTES" | "IP_OUTNOROUTES" | "IP_INADDRERRORS"
    ) || (&*d.reason == "NOT_SPECIFIED"
        && matches!(
            &*d.location,
            "ip_error" | "dst_discard" | "ip6_pkt_discard" | "ip6_pkt_prohibit"
        ))
}

/// Drops whose explanation depends on the neighbour table of their device.
fn needs_neighbours(d: &Drop) -> bool {
    matches!(&*d.reason, "NEIGH_FAILED" | "NEIGH_QUEUEFULL") || &*d.location == "neigh_invalidate"
}
