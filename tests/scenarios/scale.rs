//! Rule attribution at kube-proxy scale: ~20,000 iptables-nft rules, ~20,000 iptables-legacy
//! rules and ~10,000 native nftables rules in the router R, one dropping rule among them.
//! The test checks the rule named, the cause, the count against the rule's own counter, and
//! dropscope's peak memory; attach time and the time from each packet to the first printed
//! line of its drop are printed as measurements (`--nocapture`).
use std::time::Instant;

use dropscope_tests::{
    iptables_rule_packets,
    kubeproxy::Scale,
    topology::{A4, B4},
    traffic::{tcp_bare_ack, tcp_connect, Udp},
    wait_for, Netns, Observer, Report, Topology,
};
use serde_json::Value;

/// Peak resident memory dropscope may use with the whole scale ruleset present.
const MAX_HWM_KB: u64 = 64 * 1024;
/// Generous bound for packet -> first printed line (a measurement first; the evidence worker
/// will make it tight).
const FIRST_LINE_SECS: f64 = 15.0;

/// The topology with the full scale ruleset in R, and routes there to every service range.
fn scale_topology() -> (Topology, Scale) {
    let t = Topology::new();
    let scale = Scale::full();
    let started = Instant::now();
    scale.load(&t.r);
    eprintln!(
        "scale: ruleset loaded in R in {} ms",
        started.elapsed().as_millis()
    );
    t.r.sh(&format!(
        "ip route add 10.96.0.0/16 via {B4}; ip route add 10.100.0.0/16 via {B4}; ip route add 10.104.0.0/16 via {B4}"
    ));
    (t, scale)
}

/// Sends `traffic` while `obs` watches and waits for the first record of `cause`; returns
/// it, after printing the time from the packet to that line. Then waits until drops to `dst`
/// standing for `total` packets were printed (whatever their cause), so that the next
/// traffic's counters cannot be read before this traffic's drops are explained: counters
/// that move in the same read as a drop's are candidates for it.
fn first_line(
    obs: &Observer,
    cause: &str,
    (dst, total): (&str, u64),
    traffic: impl FnOnce(),
) -> Value {
    let sent = Instant::now();
    traffic();
    let (first, at) = obs
        .wait_for(FIRST_LINE_SECS + 30.0, |r| {
            r["type"] == "drop" && r["cause"] == cause
        })
        .unwrap_or_else(|| panic!("no {cause} record printed: {:#?}", obs.printed()));
    let secs = at.duration_since(sent).as_secs_f64();
    eprintln!(
        "scale {cause}: packet -> first line {:.0} ms",
        secs * 1000.0
    );
    assert!(
        secs < FIRST_LINE_SECS,
        "first {cause} line {secs:.1} s after the packet"
    );
    wait_for(&format!("{total} drops to {dst} printed"), 30.0, || {
        let printed = obs.printed();
        let to_dst = printed
            .iter()
            .filter(|r| r["type"] == "drop" && r["dst"] == dst);
        to_dst
            .map(|r| r["count"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= total
    });
    first
}

/// The `iptables-save` text of the rule whose line contains `needle` (without its counters).
fn save_line(ns: &Netns, tool: &str, needle: &str) -> String {
    let text = ns.sh(&format!("{tool}-save -c"));
    let line = text
        .lines()
        .find(|l| l.starts_with('[') && l.contains(needle))
        .unwrap_or_else(|| panic!("no {tool} rule with {needle:?}"));
    line.split_once(' ').unwrap().1.to_string()
}

/// Packets of the counted nft rule with `comment` in one chain (listing one chain: the whole
/// ruleset takes nft seconds at this size).
fn nft_chain_rule(ns: &Netns, table: &str, chain: &str, comment: &str) -> (u64, u64) {
    let json: Value =
        serde_json::from_str(&ns.sh(&format!("nft -j list chain {table} '{chain}'"))).unwrap();
    for item in json["nftables"].as_array().unwrap() {
        let rule = &item["rule"];
        if rule["comment"].as_str() == Some(comment) {
            let packets = rule["expr"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
                .expect("a counter");
            return (packets, rule["handle"].as_u64().unwrap());
        }
    }
    panic!("no rule with comment {comment} in {table} {chain}")
}

/// All drop records of `cause` name `rule`; returns the packets they stand for.
fn check_all(report: &Report, cause: &str, rule: &str) -> u64 {
    for r in report.of(cause) {
        let ev = r["evidence"].as_str().unwrap();
        assert!(
            ev.contains(rule),
            "evidence does not name {rule}: {ev}\nall drops:\n{}",
            drops(report)
        );
    }
    report.count(cause)
}

/// The drop records, one line each (for failure messages).
fn drops(report: &Report) -> String {
    let line = |r: &&Value| {
        format!(
            "{} {} {}:{} -> {}:{} x{} {}",
            r["time"],
            r["cause"],
            r["src"],
            r["sport"],
            r["dst"],
            r["dport"],
            r["count"],
            r["evidence"]
        )
    };
    let lines: Vec<String> = report.drops().iter().map(line).collect();
    format!("{}\nstderr: {}", lines.join("\n"), report.stderr)
}

/// One router with all three rulesets, one dropscope watching it, three drops:
/// (a) a TCP connection to a service without endpoints, rejected by kube-proxy's
///     KUBE-SERVICES REJECT rule (iptables-nft) among ~20,000 rules;
/// (b) bare ACKs that conntrack finds INVALID, dropped by KUBE-FORWARD (iptables-nft);
/// (c) UDP to a load balancer from outside its source ranges, dropped by a counted native
///     nftables rule among ~10,000 (kube-proxy's nftables mode);
/// each named exactly (engine, table, chain, rule text with its comment or handle), with the
/// cause of its verdict and a count equal to the rule's counter; and (d) dropscope's peak
/// memory stays under 64 MB with the ~20,000 iptables-legacy rules present too.
#[test]
fn scale_kube_proxy_rulesets_name_the_dropping_rule() {
    let (t, scale) = scale_topology();
    t.r.sh("sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0");
    let obs = Observer::start(&["--netns", &t.r.name]);

    // (a)
    let svc = scale.nft_iptables.no_endpoints();
    assert_eq!(svc.proto, "tcp");
    let reject = first_line(&obs, "netfilter_reject", (&svc.ip, 2), || {
        for _ in 0..2 {
            let err = tcp_connect(&t.a, &svc.ip, svc.port).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        }
    });
    // (b)
    let invalid = first_line(&obs, "conntrack_invalid", (B4, 3), || {
        for sport in [40011, 40012, 40013] {
            tcp_bare_ack(&t.a, A4, B4, sport, 80);
        }
    });
    // (c)
    let lb = scale.nft.firewalled_probe();
    assert_eq!(lb.proto, "udp");
    let dropped = first_line(&obs, "netfilter_drop", (&lb.ip, 1), || {
        Udp::to(&lb.ip, lb.port).count(4).send(&t.a);
    });
    // (d)
    let hwm = obs.status_kb("VmHWM");
    let report = obs.stop();
    eprintln!(
        "scale: attach_ms {} | dropscope VmHWM {hwm} kB",
        report.attach()["attach_ms"]
    );
    report.assert_consistent();
    assert!(
        hwm < MAX_HWM_KB,
        "dropscope peak RSS {hwm} kB >= {MAX_HWM_KB} kB"
    );
    let causes: Vec<String> = report.causes().into_iter().map(|(c, _)| c).collect();
    assert_eq!(
        causes,
        ["conntrack_invalid", "netfilter_drop", "netfilter_reject"],
        "{}",
        drops(&report)
    );

    // (a) The KUBE-SERVICES rule of that service (its NodePort has a KUBE-EXTERNAL-SERVICES
    // rule with the same comment).
    let needle = format!(
        "-d {}/32 -p tcp -m comment --comment \"{}\"",
        svc.ip, svc.comment
    );
    let line = save_line(&t.r, "iptables-nft", &needle);
    assert!(line.starts_with("-A KUBE-SERVICES -d "), "{line}");
    assert!(
        line.ends_with("-j REJECT --reject-with icmp-port-unreachable"),
        "{line}"
    );
    let rule = format!("[iptables-nft table filter chain KUBE-SERVICES: {line}]");
    assert_eq!(reject["engine"], "iptables-nft", "{reject:#}");
    assert_eq!(
        (&reject["src"], &reject["dst"]),
        (&A4.into(), &svc.ip.as_str().into())
    );
    let counted = check_all(&report, "netfilter_reject", &rule);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-nft", &needle),
        "{}",
        drops(&report)
    );
    assert_eq!(counted, 2, "{}", drops(&report));

    // (b)
    let needle = "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP";
    let rule = format!("[iptables-nft table filter chain KUBE-FORWARD: {needle}]");
    assert_eq!(invalid["engine"], "iptables-nft", "{invalid:#}");
    let counted = check_all(&report, "conntrack_invalid", &rule);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-nft", needle),
        "{}",
        drops(&report)
    );
    assert_eq!(counted, 3, "{}", drops(&report));

    // (c)
    let table = format!("ip {}", scale.nft.table);
    let (packets, handle) = nft_chain_rule(&t.r, &table, &lb.chain, &lb.comment);
    let rule = format!(
        "[nftables table {table} chain {}: handle {handle} comment \"{}\"]",
        lb.chain, lb.comment
    );
    assert_eq!(dropped["engine"], "nftables", "{dropped:#}");
    assert_eq!(dropped["dst"], lb.ip.as_str());
    let counted = check_all(&report, "netfilter_drop", &rule);
    assert_eq!(counted, packets, "{}", drops(&report));
    assert_eq!(counted, 4, "{}", drops(&report));
}
