//! Firewall causes: nftables / iptables-nft / iptables-legacy DROP, and REJECT.
use dropscope_tests::{
    iptables_rule_packets, nft_rule_packets,
    topology::B4,
    traffic::{tcp_connect, Udp},
    Nstat, Observer, Topology,
};

use crate::{evidence, Expect};

#[test]
// vm-test: core
fn nft_drop_is_netfilter_drop_in_nftables() {
    let t = Topology::new();
    t.r.sh(
        "nft add table inet drt; nft add chain inet drt fw '{ type filter hook forward priority 0; }'; \
         nft add rule inet drt fw ip daddr 10.231.2.2 udp dport 9100 counter drop comment '\"ds-9100\"'",
    );
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9100).count(5).send(&t.a);
    let report = obs.stop();
    let counted = Expect::routed(&t, "netfilter_drop", 9100).check(&report);
    assert_eq!(counted, nft_rule_packets(&t.r, "ds-9100"));
    assert_eq!(counted, 5);
    assert_eq!(report.of("netfilter_drop")[0]["location"], "nft_do_chain");
    let ev = evidence(&report, "netfilter_drop");
    assert!(
        ev.contains("rule: [nftables table inet drt chain fw: handle"),
        "the rule is named: {ev}"
    );
    assert!(ev.contains("comment \"ds-9100\""), "{ev}");
    let hint = report.of("netfilter_drop")[0]["fix"].as_str().unwrap();
    assert!(
        hint.contains("nft delete rule inet drt fw handle"),
        "{hint}"
    );
}

#[test]
// vm-test: core
fn ipt_nft_drop_is_netfilter_drop_in_nftables() {
    let t = Topology::new();
    t.r.sh("iptables-nft -A FORWARD -p udp --dport 9101 -j DROP");
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9101).count(3).send(&t.a);
    let report = obs.stop();
    let counted = Expect::routed(&t, "netfilter_drop", 9101).check(&report);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-nft", "--dport 9101 -j DROP")
    );
    assert_eq!(counted, 3);
    assert!(evidence(&report, "netfilter_drop").contains("nftables / iptables-nft"));
}

#[test]
// vm-test: core
fn ipt_legacy_drop_is_netfilter_drop_in_iptables_legacy() {
    let t = Topology::new();
    t.r.sh("iptables-legacy -A FORWARD -p udp --dport 9102 -j DROP");
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9102).count(4).send(&t.a);
    let report = obs.stop();
    let counted = Expect::routed(&t, "netfilter_drop", 9102).check(&report);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-legacy", "--dport 9102 -j DROP")
    );
    assert_eq!(counted, 4);
    assert_eq!(report.of("netfilter_drop")[0]["location"], "nf_hook_slow");
    let ev = evidence(&report, "netfilter_drop");
    assert!(ev.contains("iptables-legacy"), "{ev}");
    assert!(ev.contains("[iptables-legacy table filter chain FORWARD: -A FORWARD -p udp -m udp --dport 9102 -j DROP]"), "{ev}");
}

#[test]
// vm-test: core
fn reject_udp_is_netfilter_reject() {
    let t = Topology::new();
    t.r.sh("iptables-nft -A FORWARD -p udp --dport 5353 -j REJECT");
    let before_a = Nstat::read(&t.a);
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 5353).count(3).send(&t.a);
    let report = obs.stop();
    let counted = Expect::routed(&t, "netfilter_reject", 5353).check(&report);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-nft", "--dport 5353 -j REJECT")
    );
    assert_eq!(counted, 3);
    // The sender really got the ICMP errors dropscope paired with the drops.
    assert_eq!(Nstat::delta(&t.a, &before_a, "IcmpInDestUnreachs"), 3);
    let r = report.of("netfilter_reject")[0];
    assert_eq!(r["icmp_sent"]["type"], 3);
    assert_eq!(r["icmp_sent"]["code"], 3);
    assert!(evidence(&report, "netfilter_reject").contains("port unreachable"));
}

#[test]
// vm-test: core
fn reject_tcp_reset_is_netfilter_reject() {
    let t = Topology::new();
    t.r.sh("iptables-nft -A FORWARD -p tcp --dport 8080 -j REJECT --reject-with tcp-reset");
    let obs = Observer::start(&["--netns", &t.r.name]);
    for _ in 0..2 {
        let err = tcp_connect(&t.a, B4, 8080).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    let report = obs.stop();
    let e = Expect {
        proto: "tcp",
        ..Expect::routed(&t, "netfilter_reject", 8080)
    };
    let counted = e.check(&report);
    assert_eq!(
        counted,
        iptables_rule_packets(&t.r, "iptables-nft", "--dport 8080 -j REJECT")
    );
    assert_eq!(counted, 2);
    assert!(
        evidence(&report, "netfilter_reject").contains("tcp-reset"),
        "{}",
        evidence(&report, "netfilter_reject")
    );
}

#[test]
fn drop_and_reject_are_told_apart_in_one_run() {
    let t = Topology::new();
    t.r.sh("iptables-nft -A FORWARD -p udp --dport 9103 -j DROP; iptables-nft -A FORWARD -p udp --dport 9104 -j REJECT");
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9103).count(2).send(&t.a);
    Udp::to(B4, 9104).count(3).send(&t.a);
    let report = obs.stop();
    report.assert_consistent();
    assert_eq!(
        report.causes(),
        vec![
            ("netfilter_drop".to_string(), 2),
            ("netfilter_reject".to_string(), 3)
        ]
    );
    assert!(report
        .of("netfilter_drop")
        .iter()
        .all(|r| r["dport"] == 9103));
    assert!(report
        .of("netfilter_reject")
        .iter()
        .all(|r| r["dport"] == 9104));
}

/// Where a rule at each hook sits in the topology, and what dropscope should report for it.
struct HookCase {
    hook: &'static str,
    /// Namespace that holds the rule: "a" (sender), "r" (router) or "b" (receiver).
    ns: &'static str,
    legacy: &'static str,
    nft_hook: &'static str,
}

const HOOKS: &[HookCase] = &[
    HookCase {
        hook: "prerouting",
        ns: "r",
        legacy: "-t raw -A PREROUTING",
        nft_hook: "prerouting",
    },
    HookCase {
        hook: "input",
        ns: "b",
        legacy: "-A INPUT",
        nft_hook: "input",
    },
    HookCase {
        hook: "forward",
        ns: "r",
        legacy: "-A FORWARD",
        nft_hook: "forward",
    },
    HookCase {
        hook: "output",
        ns: "a",
        legacy: "-A OUTPUT",
        nft_hook: "output",
    },
    HookCase {
        hook: "postrouting",
        ns: "r",
        legacy: "-t mangle -A POSTROUTING",
        nft_hook: "postrouting",
    },
];

/// Drops UDP to one port at every hook with one engine; checks hook, engine, rule and count.
fn hooks_are_named(engine: &str) {
    for (i, case) in HOOKS.iter().enumerate() {
        let t = Topology::new();
        let ns = match case.ns {
            "a" => &t.a,
            "b" => &t.b,
            _ => &t.r,
        };
        let port = 9500 + i as u16;
        let rule_text = format!("--dport {port} -j DROP");
        if engine == "iptables-legacy" {
            ns.sh(&format!(
                "iptables-legacy {} -p udp --dport {port} -j DROP",
                case.legacy
            ));
        } else {
            ns.sh(&format!(
                "nft add table inet h; nft add chain inet h c '{{ type filter hook {} priority 0; }}'; \
                 nft add rule inet h c udp dport {port} counter drop comment '\"hook-{port}\"'",
                case.nft_hook
            ));
        }
        let obs = Observer::start(&["--netns", &ns.name]);
        Udp::to(B4, port).count(2).send(&t.a);
        let report = obs.stop();
        report.assert_consistent();
        let recs = report.of("netfilter_drop");
        assert!(
            !recs.is_empty(),
            "{engine} {}: no netfilter_drop: {:#?}",
            case.hook,
            report.records
        );
        for r in &recs {
            assert_eq!(r["hook"], case.hook, "{engine} at {}: {r:#}", case.hook);
            assert_eq!(r["dport"], port);
            assert_eq!(r["netns"].as_u64(), Some(ns.inode()));
        }
        let rule = recs[0]["rule"].as_str().unwrap();
        let kernel = if engine == "iptables-legacy" {
            assert!(
                rule.contains(&rule_text) && rule.starts_with("[iptables-legacy"),
                "{rule}"
            );
            iptables_rule_packets(ns, "iptables-legacy", &rule_text)
        } else {
            assert!(rule.contains(&format!("comment \"hook-{port}\"")), "{rule}");
            nft_rule_packets(ns, &format!("hook-{port}"))
        };
        assert_eq!(
            report.count("netfilter_drop"),
            kernel,
            "{engine} at {}",
            case.hook
        );
        assert_eq!(kernel, 2);
    }
}

#[test]
fn iptables_legacy_rules_at_every_hook_are_named() {
    hooks_are_named("iptables-legacy");
}

#[test]
fn nftables_rules_at_every_hook_are_named() {
    hooks_are_named("nftables");
}

#[test]
fn l3_rule_on_bridged_traffic_is_bridge_netfilter() {
    // A and B on one bridge in namespace S; S filters bridged frames through iptables.
    let t = Topology::new();
    let s = dropscope_tests::Netns::new("s");
    s.sh(&format!(
        "ip link add br0 type bridge; ip link add p1 type veth peer name x1 netns {a}; \
         ip link add p2 type veth peer name x2 netns {b}; \
         for i in p1 p2; do ip link set $i master br0; ip link set $i up; done; ip link set br0 up; \
         sysctl -qw net.bridge.bridge-nf-call-iptables=1; \
         iptables-nft -A FORWARD -p udp --dport 9110 -j DROP",
        a = t.a.name,
        b = t.b.name
    ));
    t.a.sh("ip addr add 192.168.77.1/24 dev x1; ip link set x1 up");
    t.b.sh("ip addr add 192.168.77.2/24 dev x2; ip link set x2 up");
    t.a.sh("ping -c1 -W2 192.168.77.2 >/dev/null");
    let obs = Observer::start(&["--netns", &s.name]);
    Udp::to("192.168.77.2", 9110).count(3).send(&t.a);
    let report = obs.stop();
    let e = Expect {
        cause: "bridge_netfilter",
        ifname: "p2",
        family: "ipv4",
        proto: "udp",
        src: "192.168.77.1",
        dst: "192.168.77.2",
        dport: Some(9110),
        netns: s.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(
        counted,
        iptables_rule_packets(&s, "iptables-nft", "--dport 9110 -j DROP")
    );
    assert_eq!(counted, 3);
    // br_netfilter ran the IPv4 forward hook for the bridged frame.
    let r = report.of("bridge_netfilter")[0];
    assert_eq!(
        (&r["hook"], &r["nf_family"]),
        (&"forward".into(), &"ipv4".into()),
        "{r:#}"
    );
    assert_eq!(r["in_ifname"], "p1", "{r:#}");
}
