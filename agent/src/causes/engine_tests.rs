//! Every rule of the table, exercised by a drop that should reach it; and the degraded
//! answers when the kernel could not provide a fact.
use std::net::IpAddr;

use super::*;
use crate::{
    events::{Device, Drop, Family, Sysctls},
    evidence::{
        conntrack::CtStats,
        rules::{Matcher, Moved, RuleId, Verdict as NfVerdict},
    },
};

fn moved(engine: &'static str, table: &str, text: &str, verdict: NfVerdict) -> Option<Moved> {
    let rule = RuleId {
        engine,
        table: table.into(),
        chain: "FORWARD".into(),
        text: text.into(),
    };
    Some(Moved {
        rule,
        verdict,
        matcher: Default::default(),
        packets: 2,
    })
}

fn dev(name: &str, mtu: u32) -> Device {
    let mut n = [0u8; 16];
    n[..name.len()].copy_from_slice(name.as_bytes());
    Device::new(7, n, mtu)
}

/// UDP 10.231.1.2:40000 -> 10.231.2.2:5353 dropped on r0 (the scenarios' addresses).
fn drop(reason: &str, location: &str) -> Drop {
    let mut d = Drop::example(reason, location);
    d.skb = 1;
    d.netns = 4026532246;
    d.dev = Some(dev("r0", 1500));
    d.len = 84;
    let flow = d.flow.as_mut().unwrap();
    flow.src = "10.231.1.2".parse::<IpAddr>().unwrap();
    flow.dst = "10.231.2.2".parse::<IpAddr>().unwrap();
    flow.ports = Some((40000, 5353));
    d
}

struct Case {
    name: &'static str,
    drop: Drop,
    icmp: Option<(u8, u8)>,
    rst: bool,
    engine: Option<&'static str>,
    rule: Option<Moved>,
    hook: &'static str,
    ct: Option<CtStats>,
    frag_needed_dropped: bool,
    route: Option<&'static str>,
    ifaces: usize,
    cause: &'static str,
    evidence_has: &'static str,
}

fn case(name: &'static str, drop: Drop, cause: &'static str, evidence_has: &'static str) -> Case {
    Case {
        name,
        drop,
        icmp: None,
        rst: false,
        engine: None,
        rule: None,
        hook: "forward",
        ct: None,
        frag_needed_dropped: false,
        route: None,
        ifaces: 2,
        cause,
        evidence_has,
    }
}

fn with_sysctls(mut d: Drop, f: impl FnOnce(&mut Sysctls)) -> Drop {
    f(&mut d.sysctls);
    d
}

fn v6(mut d: Drop) -> Drop {
    let f = d.flow.as_mut().unwrap();
    f.family = Family::Ipv6;
    f.src = "fd00:231:1::2".parse().unwrap();
    f.dst = "fd00:231:2::2".parse().unwrap();
    d
}

fn cases() -> Vec<Case> {
    let mut too_big = drop("PKT_TOO_BIG", "ip_forward");
    too_big.len = 1428;
    too_big.out = Some(dev("r1", 1280));
    let mut ttl = drop("IP_INHDR", "ip_forward");
    ttl.ttl = Some(1);
    vec![
        case(
            "ping reply copy",
            drop("NO_SOCKET", "ping_rcv"),
            "benign",
            "ping socket",
        ),
        case(
            "ping reply copy freed in icmp_rcv (6.1)",
            {
                let mut d = drop("NO_SOCKET", "icmp_rcv");
                let f = d.flow.as_mut().unwrap();
                (f.proto, f.ports, f.icmp) = (1, None, Some((0, 0)));
                d
            },
            "benign",
            "raw socket",
        ),
        case(
            "mld report",
            v6(drop("NOT_SPECIFIED", "ip6_mc_input")),
            "benign",
            "has not joined",
        ),
        case(
            "mld not forwarded",
            {
                let mut d = v6(drop("IP_INADDRERRORS", "ip6_forward"));
                d.flow.as_mut().unwrap().dst = "ff02::16".parse().unwrap();
                d
            },
            "benign",
            "never forwarded",
        ),
        case(
            "ipv6 neighbour solicitation on 6.1",
            {
                let mut d = v6(drop("NOT_SPECIFIED", "icmpv6_rcv"));
                let f = d.flow.as_mut().unwrap();
                (f.proto, f.ports, f.icmp) = (58, None, Some((135, 0)));
                d
            },
            "benign",
            "ICMPv6 type 135",
        ),
        case(
            "socket purge",
            drop("QUEUE_PURGE", "inet_sock_destruct"),
            "benign",
            "QUEUE_PURGE",
        ),
        case(
            "forwarding off everywhere",
            with_sysctls(drop("IP_INADDRERRORS", "ip_error"), |s| {
                s.dev_forwarding = Some(0);
                s.all_forwarding = Some(0);
            }),
            "forwarding_disabled",
            "net.ipv4.conf.r0.forwarding=0 and net.ipv4.conf.all.forwarding=0",
        ),
        case(
            "forwarding off on one device",
            with_sysctls(drop("IP_INADDRERRORS", "ip_error"), |s| {
                s.dev_forwarding = Some(0);
                s.all_forwarding = Some(1);
            }),
            "forwarding_disabled",
            "net.ipv4.conf.r0.forwarding=0 while net.ipv4.conf.all.forwarding=1",
        ),
        case(
            "forwarding value unreadable",
            drop("IP_INADDRERRORS", "ip_error"),
            "forwarding_disabled",
            "forwarding value unreadable",
        ),
        case(
            "ipv6 forwarding off",
            with_sysctls(v6(drop("IP_INADDRERRORS", "ip6_forward")), |s| {
                s.all6_forwarding = Some(0)
            }),
            "forwarding_disabled",
            "net.ipv6.conf.all.forwarding=0",
        ),
        case(
            "strict rp_filter on all",
            with_sysctls(drop("IP_RPFILTER", "ip_rcv_finish_core"), |s| {
                s.dev_rp_filter = Some(0);
                s.all_rp_filter = Some(1);
            }),
            "rp_filter",
            "effective=1 (all=1, r0=0)",
        ),
        case(
            "martian",
            drop("IP_LOCAL_SOURCE", "ip_rcv_finish_core"),
            "martian_source",
            "IP_LOCAL_SOURCE",
        ),
        Case {
            icmp: Some((3, 3)),
            engine: Some("nftables"),
            ..case(
                "udp reject",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_reject",
                "port unreachable (3/3)",
            )
        },
        Case {
            engine: Some("nftables"),
            ..case(
                "nft drop",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_drop",
                "nft_do_chain",
            )
        },
        Case {
            engine: Some("nftables"),
            rule: moved(
                "iptables-nft",
                "filter",
                "-A FORWARD -p tcp -j REJECT --reject-with tcp-reset",
                NfVerdict::Reject("tcp-reset".into()),
            ),
            ..case(
                "tcp reset reject",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_reject",
                "REJECT with tcp-reset",
            )
        },
        Case {
            engine: Some("iptables-legacy"),
            ..case(
                "legacy drop",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_drop",
                "iptables-legacy",
            )
        },
        Case {
            engine: Some("conntrack/other hook"),
            ..case(
                "other hook drop",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_drop",
                "conntrack/other hook",
            )
        },
        Case {
            icmp: Some((3, 4)),
            ..case(
                "mtu",
                too_big,
                "mtu_exceeded",
                "1428-byte packet does not fit MTU 1280 of r1; ICMP sent: fragmentation needed",
            )
        },
        Case {
            icmp: Some((3, 0)),
            ..case(
                "no route",
                drop("IP_INNOROUTES", "ip_error"),
                "no_route",
                "no route to 10.231.2.2",
            )
        },
        case("ttl", ttl, "ttl_expired", "TTL 1 on arrival at r0"),
        Case {
            ifaces: 1,
            ..case(
                "end host",
                drop("IP_INADDRERRORS", "ip_error"),
                "not_local_address",
                "is not an address of this host",
            )
        },
        Case {
            icmp: Some((3, 1)),
            route: Some("unreachable 10.231.66.0/24"),
            ..case(
                "unreachable route",
                drop("NOT_SPECIFIED", "ip_error"),
                "unreachable_route",
                "route for 10.231.2.2: unreachable 10.231.66.0/24",
            )
        },
        Case {
            icmp: Some((3, 1)),
            route: Some("10.231.0.0/16 dev r1"),
            ..case(
                "ip_error without reason, unicast route",
                drop("NOT_SPECIFIED", "ip_error"),
                "unclassified",
                "NOT_SPECIFIED at ip_error",
            )
        },
        case(
            "old kernel, forwarding off",
            with_sysctls(drop("NOT_SPECIFIED", "ip_error"), |s| {
                s.dev_forwarding = Some(0)
            }),
            "forwarding_disabled",
            "kernel gives no drop reason",
        ),
        case(
            "veth mtu",
            drop("NOT_SPECIFIED", "__dev_forward_skb2"),
            "veth_mtu_mismatch",
            "did not fit its veth peer",
        ),
        Case {
            icmp: Some((3, 4)),
            ..case(
                "tunnel",
                drop("NOT_SPECIFIED", "ip_fragment"),
                "tunnel_mtu",
                "encapsulated",
            )
        },
        Case {
            frag_needed_dropped: true,
            ..case(
                "pmtu (original)",
                drop("PKT_TOO_BIG", "ip_forward"),
                "pmtu_blackhole",
                "was dropped by a firewall rule",
            )
        },
        Case {
            rule: moved(
                "iptables-nft",
                "filter",
                "-A OUTPUT -p icmp --icmp-type 3/4 -j DROP",
                NfVerdict::Drop,
            ),
            hook: "output",
            ..case(
                "pmtu (icmp)",
                {
                    let mut d = drop("NETFILTER_DROP", "nft_do_chain");
                    let f = d.flow.as_mut().unwrap();
                    f.proto = 1;
                    f.ports = None;
                    f.icmp = Some((3, 4));
                    d
                },
                "pmtu_blackhole",
                "dropped in the output hook",
            )
        },
        Case {
            ct: Some(CtStats {
                drop: 3,
                count: Some(3),
                max: Some(3),
                ..Default::default()
            }),
            hook: "prerouting",
            ..case(
                "ct full",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "conntrack_full",
                "3 of nf_conntrack_max=3",
            )
        },
        Case {
            ct: Some(CtStats {
                drop: 1,
                insert_failed: 1,
                ..Default::default()
            }),
            ..case(
                "ct race",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "conntrack_race",
                "insert_failed",
            )
        },
        Case {
            rule: {
                let mut m = moved("nftables", "inet f", "handle 4", NfVerdict::Drop).unwrap();
                m.matcher = Matcher {
                    ct_invalid: true,
                    ..Default::default()
                };
                Some(m)
            },
            ..case(
                "ct invalid",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "conntrack_invalid",
                "conntrack state INVALID",
            )
        },
        Case {
            rule: moved(
                "iptables-nft",
                "filter",
                "-A FORWARD -p udp -j DROP",
                NfVerdict::Drop,
            ),
            hook: "bridge",
            ..case(
                "bridged",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "bridge_netfilter",
                "bridged frame on r0",
            )
        },
        case(
            "bad header",
            drop("IP_INHDR", "ip_rcv_core"),
            "malformed_packet",
            "IP_INHDR at ip_rcv_core",
        ),
        case(
            "arp failed",
            drop("NEIGH_FAILED", "neigh_invalidate"),
            "neighbor_failed",
            "neighbours 10.231.2.2 FAILED",
        ),
        case(
            "nd failed (v6, no reason)",
            v6(drop("NOT_SPECIFIED", "neigh_invalidate")),
            "neighbor_failed",
            "resolution failed",
        ),
        case(
            "neigh queue",
            drop("NEIGH_QUEUEFULL", "__neigh_event_send"),
            "neighbor_queue_full",
            "queue full",
        ),
        case(
            "neigh table",
            drop("NEIGH_CREATEFAIL", "ip_finish_output2"),
            "neighbor_table_full",
            "could not be created",
        ),
        case(
            "closed port",
            drop("NO_SOCKET", "__udp4_lib_rcv"),
            "no_listener",
            "udp port 5353 on 10.231.2.2",
        ),
        Case {
            rst: true,
            ..case(
                "closed tcp port",
                drop("NO_SOCKET", "tcp_v4_rcv"),
                "no_listener",
                "answered 10.231.1.2 with a TCP reset",
            )
        },
        case(
            "rcvbuf",
            drop("SOCKET_RCVBUFF", "udp_queue_rcv_one_skb"),
            "socket_buffer_full",
            "port 5353",
        ),
        case(
            "qdisc",
            drop("QDISC_DROP", "__dev_queue_xmit"),
            "qdisc_drop",
            "QDISC_DROP on r0",
        ),
        case(
            "tc",
            drop("TC_INGRESS", "tcf_classify"),
            "tc_drop",
            "TC_INGRESS on r0",
        ),
        case(
            "backlog",
            drop("CPU_BACKLOG", "enqueue_to_backlog"),
            "cpu_backlog",
            "backlog",
        ),
        case(
            "vxlan",
            drop("VXLAN_VNI_NOT_FOUND", "vxlan_rcv"),
            "overlay_mismatch",
            "VXLAN_VNI_NOT_FOUND",
        ),
        case(
            "vxlan no remote",
            drop("NO_TX_TARGET", "vxlan_xmit"),
            "overlay_mismatch",
            "has no remote",
        ),
        case(
            "xfrm",
            drop("XFRM_POLICY", "ip_forward"),
            "xfrm_policy",
            "IPsec",
        ),
        case(
            "unknown",
            drop("SOME_NEW_REASON", "somewhere"),
            "unclassified",
            "kernel reason SOME_NEW_REASON at somewhere",
        ),
    ]
}

fn classify(engine: &Engine, c: &Case) -> Verdict {
    let facts = Facts {
        icmp_sent: c.icmp,
        rst_sent: c.rst,
        nf_engine: c.engine,
        nsexec: "ip netns exec dr-r ".into(),
        nf_rule: c.rule.clone(),
        nf_hook: Some(c.hook),
        ct: c.ct,
        frag_needed_dropped: c.frag_needed_dropped,
        route: c.route.map(str::to_string),
        ifaces: Some(c.ifaces),
        neighbours: vec!["10.231.2.2 FAILED".into()],
        ..Facts::bare(&c.drop)
    };
    engine.classify(&facts)
}

#[test]
fn every_case_gets_its_cause_and_evidence() {
    let engine = Engine::builtin();
    for c in cases() {
        let v = classify(&engine, &c);
        assert_eq!(v.cause, c.cause, "case '{}': got {v:?}", c.name);
        assert!(
            v.evidence.contains(c.evidence_has),
            "case '{}': evidence {:?}",
            c.name,
            v.evidence
        );
        assert!(!v.hint.is_empty());
    }
}

#[test]
fn every_rule_is_reached_by_some_case() {
    let engine = Engine::builtin();
    let hit: std::collections::HashSet<usize> =
        cases().iter().map(|c| classify(&engine, c).rule).collect();
    for (i, r) in engine.rules().iter().enumerate() {
        assert!(
            hit.contains(&i),
            "rule {} ({}, reason {:?}) has no test case",
            i + 1,
            r.cause,
            r.reason.values()
        );
    }
}

#[test]
fn fixes_run_in_the_drop_namespace() {
    let engine = Engine::builtin();
    let c = case(
        "fwd",
        with_sysctls(drop("IP_INADDRERRORS", "ip_error"), |s| {
            s.dev_forwarding = Some(0);
            s.all_forwarding = Some(0);
        }),
        "forwarding_disabled",
        "",
    );
    assert!(classify(&engine, &c)
        .hint
        .starts_with("ip netns exec dr-r sysctl -w net.ipv4.ip_forward=1"));
}

#[test]
fn reject_without_icmp_signal_degrades_to_drop() {
    // A kernel without the icmp_send tracepoint cannot prove REJECT: the answer is the honest
    // "netfilter_drop", never an invented reject.
    let engine = Engine::builtin();
    let c = Case {
        engine: Some("nftables"),
        ..case(
            "x",
            drop("NETFILTER_DROP", "nft_do_chain"),
            "netfilter_drop",
            "",
        )
    };
    assert_eq!(classify(&engine, &c).cause, "netfilter_drop");
}

#[test]
fn missing_facts_print_as_question_marks() {
    let engine = Engine::builtin();
    let mut d = drop("IP_RPFILTER", "ip_rcv_finish_core");
    d.dev = None;
    let c = case("x", d, "rp_filter", "");
    let v = classify(&engine, &c);
    assert!(
        v.evidence.contains("rp_filter on ? is strict: effective=?"),
        "{}",
        v.evidence
    );
}

#[test]
fn the_dropping_rule_is_named_with_its_removal_command() {
    let engine = Engine::builtin();
    let c = Case {
        engine: Some("nftables"),
        rule: moved(
            "nftables",
            "inet drt",
            "handle 3 comment \"ds\"",
            NfVerdict::Drop,
        ),
        ..case(
            "x",
            drop("NETFILTER_DROP", "nft_do_chain"),
            "netfilter_drop",
            "",
        )
    };
    let v = classify(&engine, &c);
    assert!(
        v.evidence.contains(
            "rule: [nftables table inet drt chain FORWARD: handle 3 comment \"ds\"] (+2 packets)"
        ),
        "{}",
        v.evidence
    );
    assert!(
        v.hint
            .contains("ip netns exec dr-r nft delete rule inet drt FORWARD handle 3"),
        "{}",
        v.hint
    );
    let c = Case {
        engine: Some("iptables-legacy"),
        rule: moved(
            "iptables-legacy",
            "filter",
            "-A FORWARD -p udp -j DROP",
            NfVerdict::Drop,
        ),
        ..case(
            "x",
            drop("NETFILTER_DROP", "nf_hook_slow"),
            "netfilter_drop",
            "",
        )
    };
    let v = classify(&engine, &c);
    assert!(
        v.hint
            .contains("iptables-legacy -t filter -D FORWARD -p udp -j DROP"),
        "{}",
        v.hint
    );
}
