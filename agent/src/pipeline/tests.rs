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

fn drop_at(reason: &str, location: &str, skb: u64, dport: u16) -> DropEvent {
    let mut d = DropEvent::example(reason, location);
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
    let sampled: Vec<&DropRecord> = sink.records.iter().filter(|r| r.unsent.is_some()).collect();
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
    let runner =
        Runner::spawn(move || Classifier::new(Engine::builtin(), Box::new(Gated(inner)), traced))
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
            Record::Drop(drop_at(
                "NO_SOCKET",
                "__udp4_lib_rcv",
                skb,
                1000 + skb as u16,
            )),
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
