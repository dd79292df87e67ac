//! Every rule of the table, exercised by a drop that should reach it; and the degraded
//! answers when the kernel or the namespace could not provide a fact. Live state comes from a
//! fake investigator, so each case says exactly what the namespace would have shown.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::*;
use crate::causes::facts::Traced;
use crate::{
    events::{Answer, Device, DropEvent, Family, Sysctls},
    evidence::{
        conntrack::CtStats,
        counters::Counters,
        investigator::{Investigator, NfState},
        routes::Route,
        rules::{Matcher, Moved, RuleId, Target as NfVerdict},
        tunnels::Tunnel,
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
fn drop(reason: &str, location: &str) -> DropEvent {
    let mut d = DropEvent::example(reason, location);
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

fn icmp(mut d: DropEvent, ty: u8, code: u8) -> DropEvent {
    let f = d.flow.as_mut().unwrap();
    (f.ports, f.icmp) = (None, Some((ty, code)));
    f.proto = if f.family == Family::Ipv6 { 58 } else { 1 };
    d
}

fn to(mut d: DropEvent, dst: &str) -> DropEvent {
    d.flow.as_mut().unwrap().dst = dst.parse().unwrap();
    d
}

fn port(mut d: DropEvent, dport: u16) -> DropEvent {
    d.flow.as_mut().unwrap().ports = Some((40000, dport));
    d
}

fn fragment(mut d: DropEvent, offset: u16) -> DropEvent {
    d.fragment = Some(offset);
    d
}

/// The stack of a drop by an nftables rule in the IPv4 forward hook.
const NFT_FORWARD: &[&str] = &[
    "sk_skb_reason_drop",
    "nft_do_chain",
    "nft_do_chain_ipv4",
    "nf_hook_slow",
    "ip_forward",
    "ip_rcv",
];

/// The stack of a drop by a hook function (x_tables, conntrack, NAT) in the forward hook.
const HOOK_FORWARD: &[&str] = &["sk_skb_reason_drop", "nf_hook_slow", "ip_forward", "ip_rcv"];

struct Case {
    name: &'static str,
    drop: DropEvent,
    answer: Option<Answer>,
    traced: Traced,
    rule: Option<Moved>,
    counters_read: bool,
    unread: &'static [&'static str],
    ct: Option<CtStats>,
    stack: &'static [&'static str],
    frag_needed_dropped: bool,
    route: Option<Route>,
    ifaces: usize,
    sysctls: Vec<(&'static str, &'static str)>,
    moved: Vec<(&'static str, u64)>,
    tunnel: Option<Tunnel>,
    cause: &'static str,
    evidence_has: &'static str,
}

fn case(name: &'static str, drop: DropEvent, cause: &'static str, evidence_has: &'static str) -> Case {
    Case {
        name,
        drop,
        answer: None,
        traced: Traced::ALL,
        rule: None,
        counters_read: true,
        unread: &[],
        ct: None,
        stack: &[],
        frag_needed_dropped: false,
        route: None,
        ifaces: 2,
        sysctls: Vec::new(),
        moved: Vec::new(),
        tunnel: None,
        cause,
        evidence_has,
    }
}

fn with_sysctls(mut d: DropEvent, f: impl FnOnce(&mut Sysctls)) -> DropEvent {
    f(&mut d.sysctls);
    d
}

fn v6(mut d: DropEvent) -> DropEvent {
    let f = d.flow.as_mut().unwrap();
    f.family = Family::Ipv6;
    f.src = "fd00:231:1::2".parse().unwrap();
    f.dst = "fd00:231:2::2".parse().unwrap();
    d
}

fn route(kind: &'static str, text: &str, mtu: Option<u32>) -> Option<Route> {
    Some(Route {
        kind,
        text: text.into(),
        mtu,
        mtu_expires: None,
        dev_mtu: None,
        rule: None,
        entry: None,
        bypassed_main: None,
    })
}

/// A refused route as the policy walk names it: the deciding rule, route and main's route.
fn policy_route(
    kind: &'static str,
    rule: Option<&str>,
    entry: Option<&str>,
    main: Option<&str>,
) -> Option<Route> {
    let text = match (entry, rule) {
        (Some(e), Some(r)) => format!("{e} (ip rule {r})"),
        (Some(e), None) => e.to_string(),
        (None, Some(r)) => format!("ip rule {r}"),
        (None, None) => kind.to_string(),
    };
    Some(Route {
        rule: rule.map(str::to_string),
        entry: entry.map(str::to_string),
        bypassed_main: main.map(str::to_string),
        ..route(kind, &text, None).unwrap()
    })
}

/// Answers from the case's fixed data.
struct Fake<'a>(&'a Case);

impl Investigator for Fake<'_> {
    fn exec_prefix(&mut self, _netns: u32) -> String {
        "ip netns exec dr-r ".into()
    }
    fn netns_name(&mut self, _netns: u32) -> Option<String> {
        Some("dr-r".into())
    }
    fn netfilter(&mut self, _d: &DropEvent, _answer: Option<Answer>) -> NfState {
        NfState {
            rule: self.0.rule.clone(),
            ct: self.0.ct,
            counters_read: self.0.counters_read,
            legacy_tables: Vec::new(),
            before_baseline: false,
            unread: self.0.unread.iter().map(|w| w.to_string()).collect(),
        }
    }
    fn route(&mut self, _d: &DropEvent) -> Option<Route> {
        self.0.route.clone()
    }
    fn interfaces(&mut self, _netns: u32) -> Option<usize> {
        Some(self.0.ifaces)
    }
    fn neighbours(&mut self, _d: &DropEvent) -> Vec<String> {
        vec!["10.231.2.2 FAILED".into()]
    }
    fn sysctl(&mut self, _netns: u32, key: &str) -> Option<String> {
        self.0
            .sysctls
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
    fn counters(&mut self, _netns: u32) -> Counters {
        Counters {
            moved: self
                .0
                .moved
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }
    fn tunnel(
        &mut self,
        _netns: u32,
        _dev: Option<String>,
        _src: IpAddr,
        _dst: IpAddr,
    ) -> Option<Tunnel> {
        self.0.tunnel.clone()
    }
    fn route_to(&mut self, _netns: u32, _dst: IpAddr) -> Option<Route> {
        self.0.route.clone()
    }
    fn ifname(&mut self, _netns: u32, _ifindex: u32) -> Option<String> {
        None
    }
}

fn cases() -> Vec<Case> {
    let mut too_big = drop("PKT_TOO_BIG", "ip_forward");
    too_big.len = 1428;
    too_big.out = Some(dev("r1", 1280));
    let mut ttl = drop("IP_INHDR", "ip_forward");
    ttl.ttl = Some(1);
    let mut outer = drop("NOT_SPECIFIED", "ip_fragment");
    outer.len = 1528;
    vec![
        // --- not drops, benign
        case(
            "fragment list of a consumed packet",
            drop("NOT_SPECIFIED", "skb_release_data"),
            "not_a_drop",
            "fragment of a reassembled packet",
        ),
        Case {
            stack: &["kfree_skb_list_reason", "skb_release_data", "consume_skb", "icmp_rcv"],
            ..case(
                "fragment list of a consumed packet (6.1)",
                drop("NOT_SPECIFIED", "kfree_skb_list_reason"),
                "not_a_drop",
                "fragment of a reassembled packet",
            )
        },
        case(
            "route query",
            drop("NOT_SPECIFIED", "inet_rtm_getroute"),
            "not_a_drop",
            "route query",
        ),
        case(
            "napi placeholder",
            drop("NOT_SPECIFIED", "netif_napi_add_weight_locked"),
            "not_a_drop",
            "placeholder buffer",
        ),
        case(
            "ping reply copy",
            drop("NO_SOCKET", "ping_rcv"),
            "benign",
            "ping socket",
        ),
        case(
            "ping reply copy freed in icmp_rcv (6.1)",
            icmp(drop("NO_SOCKET", "icmp_rcv"), 0, 0),
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
            "igmp report",
            to(drop("NOT_SPECIFIED", "ip_rcv_finish_core"), "224.0.0.22"),
            "benign",
            "IPv4 multicast to 224.0.0.22",
        ),
        case(
            "mld report on a device without the multicast route",
            to(v6(drop("IP_INNOROUTES", "ip6_pkt_discard")), "ff02::16"),
            "benign",
            "link-local multicast to ff02::16",
        ),
        case(
            "mld report of a device going away",
            to(v6(drop("NOT_SPECIFIED", "mld_sendpack")), "ff02::16"),
            "benign",
            "could not be sent at mld_sendpack",
        ),
        case(
            "mld not forwarded",
            to(v6(drop("IP_INADDRERRORS", "ip6_forward")), "ff12::1"),
            "benign",
            "never forwarded",
        ),
        case(
            "ipv6 neighbour solicitation on 6.1",
            icmp(v6(drop("NOT_SPECIFIED", "icmpv6_rcv")), 135, 0),
            "benign",
            "ICMPv6 type 135",
        ),
        case(
            "ipv6 router solicitation, kernel without drop reasons",
            icmp(v6(drop("UNKNOWN", "icmpv6_rcv")), 133, 0),
            "benign",
            "ICMPv6 type 133",
        ),
        case(
            "ipv6 echo request handled, kernel without drop reasons",
            icmp(v6(drop("UNKNOWN", "icmpv6_rcv")), 128, 0),
            "benign",
            "handled by icmpv6_rcv",
        ),
        case(
            "socket purge",
            drop("QUEUE_PURGE", "inet_sock_destruct"),
            "benign",
            "QUEUE_PURGE",
        ),
        case(
            "icmp error to broadcast",
            icmp(to(drop("INVALID_PROTO", "icmp_rcv"), "10.231.2.255"), 0, 0),
            "benign",
            "RFC 1122",
        ),
        Case {
            answer: Some(Answer::Icmp(11, 0)),
            ..case(
                "traceroute hop",
                port(ttl.clone(), 33435),
                "benign",
                "traceroute probe to 10.231.2.2 port 33435 expired here",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 3)),
            ..case(
                "traceroute end",
                port(drop("NO_SOCKET", "__udp4_lib_rcv"), 33436),
                "benign",
                "traceroute probe reached 10.231.2.2",
            )
        },
        Case {
            stack: &["sk_skb_reason_drop", "unix_stream_connect", "__sys_connect"],
            ..case(
                "unix socket connect refused",
                {
                    let mut d = drop("NOT_SPECIFIED", "unix_stream_connect");
                    d.flow = None;
                    d
                },
                "benign",
                "AF_UNIX",
            )
        },
        case(
            "unicast in L2 multicast",
            drop("UNICAST_IN_L2_MULTICAST", "ip_rcv_finish_core"),
            "benign",
            "configured or designed to ignore",
        ),
        {
            let mut d = drop("TCP_OLD_DATA", "tcp_validate_incoming");
            d.flow.as_mut().unwrap().proto = 6;
            case("tcp retransmission", d, "tcp_stale_segment", "stale or superfluous")
        },
        // --- fragments
        Case {
            answer: Some(Answer::Icmp(11, 1)),
            sysctls: vec![("net.ipv4.ipfrag_time", "30")],
            moved: vec![("IpReasmTimeout", 1)],
            ..case(
                "reassembly timeout",
                fragment(drop("FRAG_REASM_TIMEOUT", "ip_expire"), 0),
                "fragment_timeout",
                "waited 30 s (ipfrag_time)",
            )
        },
        Case {
            sysctls: vec![("net.ipv4.ipfrag_time", "30")],
            ..case(
                "reassembly timeout on a kernel without FRAG_REASM_TIMEOUT",
                fragment(drop("NOT_SPECIFIED", "ip_expire"), 0),
                "fragment_timeout",
                "freed with NOT_SPECIFIED at ip_expire",
            )
        },
        Case {
            sysctls: vec![("net.ipv4.ipfrag_time", "30")],
            ..case(
                "reassembly timeout on loopback (refused when re-routed)",
                fragment(drop("IP_LOCALNET", "ip_expire"), 0),
                "fragment_timeout",
                "re-routed the first fragment and refused it too (IP_LOCALNET)",
            )
        },
        case(
            "duplicate fragment",
            fragment(drop("DUP_FRAG", "ip_defrag"), 1480),
            "fragment_duplicate",
            "offset 1480",
        ),
        case(
            "fragment queue too far",
            fragment(drop("FRAG_TOO_FAR", "inet_frag_rbtree_purge"), 0),
            "fragment_invalid",
            "ipfrag_max_dist",
        ),
        Case {
            moved: vec![("IpExtReasmOverlaps", 1), ("IpReasmFails", 1)],
            ..case(
                "overlapping fragment",
                fragment(drop("NOT_SPECIFIED", "ip_defrag"), 8),
                "fragment_invalid",
                "overlaps another fragment",
            )
        },
        Case {
            answer: Some(Answer::Icmp6(4, 0)),
            ..case(
                "fragment with an impossible length",
                fragment(v6(drop("NOT_SPECIFIED", "ipv6_frag_rcv")), 65000),
                "fragment_invalid",
                "impossible offset or length",
            )
        },
        Case {
            traced: Traced::NONE,
            ..case(
                "refused fragment, no counter",
                fragment(v6(drop("NOT_SPECIFIED", "ipv6_frag_rcv")), 8),
                "fragment_invalid",
                "reassembly memory was full",
            )
        },
        Case {
            stack: &["sk_skb_reason_drop", "nf_hook_slow", "ipv6_rcv"],
            ..case(
                "fragment refused by conntrack's defragmentation",
                fragment(v6(drop("NETFILTER_DROP", "nf_hook_slow")), 8),
                "fragment_invalid",
                "connection tracking's defragmentation",
            )
        },
        // --- forwarding, rp_filter, martians
        Case {
            ifaces: 1,
            ..case(
                "end host",
                drop("IP_INADDRERRORS", "ip_error"),
                "not_local_address",
                "is not an address of this host",
            )
        },
        case(
            "forwarding off everywhere",
            with_sysctls(drop("IP_INADDRERRORS", "ip_error"), |s| {
                s.dev_forwarding = Some(0);
                s.all_forwarding = Some(0);
            }),
            "forwarding_disabled",
            "net.ipv4.conf.r0.forwarding=0 and net.ipv4.conf.all.forwarding=0 (netns dr-r)",
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
        Case {
            ifaces: 1,
            ..case(
                "end host, kernel without drop reasons",
                with_sysctls(drop("UNKNOWN", "ip_error"), |s| s.dev_forwarding = Some(0)),
                "not_local_address",
                "this kernel gives no drop reasons",
            )
        },
        case(
            "forwarding off everywhere, kernel without drop reasons",
            with_sysctls(drop("UNKNOWN", "ip_error"), |s| {
                s.dev_forwarding = Some(0);
                s.all_forwarding = Some(0);
            }),
            "forwarding_disabled",
            "net.ipv4.conf.r0.forwarding=0 and net.ipv4.conf.all.forwarding=0 (netns dr-r); freed at ip_error",
        ),
        case(
            "forwarding off on one device, kernel without drop reasons",
            with_sysctls(drop("UNKNOWN", "ip_error"), |s| {
                s.dev_forwarding = Some(0);
                s.all_forwarding = Some(1);
            }),
            "forwarding_disabled",
            "net.ipv4.conf.r0.forwarding=0 while net.ipv4.conf.all.forwarding=1",
        ),
        // Forwarding on: ip_error then means a route refused it, which needs the reason.
        case(
            "ip_error with forwarding on, kernel without drop reasons",
            with_sysctls(drop("UNKNOWN", "ip_error"), |s| {
                s.dev_forwarding = Some(1);
                s.all_forwarding = Some(1);
            }),
            "unclassified",
            "kernel reason UNKNOWN at ip_error",
        ),
        case(
            "forwarding value unreadable, kernel without drop reasons",
            drop("UNKNOWN", "ip_error"),
            "unclassified",
            "kernel reason UNKNOWN at ip_error",
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
        // --- echo to broadcast
        Case {
            sysctls: vec![("net.ipv4.icmp_echo_ignore_broadcasts", "1")],
            ..case(
                "broadcast ping",
                icmp(to(drop("INVALID_PROTO", "icmp_rcv"), "10.231.2.255"), 8, 0),
                "icmp_echo_ignored",
                "net.ipv4.icmp_echo_ignore_broadcasts=1",
            )
        },
        Case {
            sysctls: vec![("net.ipv4.icmp_echo_ignore_broadcasts", "0")],
            ..case(
                "broadcast ping, setting changed since",
                icmp(to(drop("INVALID_PROTO", "icmp_rcv"), "10.231.2.255"), 8, 0),
                "icmp_echo_ignored",
                "is 0 now",
            )
        },
        Case {
            sysctls: vec![("net.ipv6.icmp.echo_ignore_all", "1")],
            ..case(
                "ping6 with echo_ignore_all",
                icmp(v6(drop("NOT_SPECIFIED", "icmpv6_rcv")), 128, 0),
                "icmp_echo_ignored",
                "net.ipv6.icmp.echo_ignore_all=1",
            )
        },
        case(
            "ping6 request freed by icmpv6_rcv (before 6.2)",
            icmp(v6(drop("NOT_SPECIFIED", "icmpv6_rcv")), 128, 0),
            "benign",
            "frees it through the drop path",
        ),
        Case {
            sysctls: vec![("net.ipv6.icmp.echo_ignore_multicast", "1")],
            ..case(
                "multicast ping6",
                icmp(to(v6(drop("NOT_SPECIFIED", "icmpv6_rcv")), "ff02::1"), 128, 0),
                "icmp_echo_ignored",
                "net.ipv6.icmp.echo_ignore_multicast=1",
            )
        },
        // --- netfilter
        Case {
            stack: &[
                "sk_skb_reason_drop",
                "nft_do_chain",
                "nft_do_chain_ipv4",
                "nf_hook_slow",
                "__ip_local_out",
            ],
            rule: moved(
                "iptables-nft",
                "filter",
                "-A OUTPUT -p icmp --icmp-type 3/4 -j DROP",
                NfVerdict::Drop,
            ),
            ..case(
                "pmtu (icmp, nftables)",
                icmp(drop("NETFILTER_DROP", "nft_do_chain"), 3, 4),
                "pmtu_blackhole",
                "dropped in the ipv4 output hook",
            )
        },
        Case {
            stack: &["sk_skb_reason_drop", "nf_hook_slow", "__ip_local_out"],
            rule: moved(
                "iptables-legacy",
                "filter",
                "-A OUTPUT -p icmp --icmp-type 3/4 -j DROP",
                NfVerdict::Drop,
            ),
            ..case(
                "pmtu (icmp, legacy)",
                icmp(drop("NETFILTER_DROP", "nf_hook_slow"), 3, 4),
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
            stack: &["sk_skb_reason_drop", "nf_hook_slow", "ip_rcv"],
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
            stack: NFT_FORWARD,
            ..case(
                "ct invalid",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "conntrack_invalid",
                "conntrack state INVALID",
            )
        },
        Case {
            rule: moved("nftables", "bridge bf", "handle 2", NfVerdict::Drop),
            stack: &[
                "sk_skb_reason_drop",
                "nft_do_chain",
                "nft_do_chain_bridge",
                "nf_hook_slow",
                "__br_forward",
            ],
            ..case(
                "bridge family rule",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "bridge_filter",
                "bridge-family rule or policy in the bridge hook",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 3)),
            stack: NFT_FORWARD,
            ..case(
                "udp reject",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_reject",
                "port unreachable (3/3)",
            )
        },
        Case {
            rule: moved(
                "iptables-nft",
                "filter",
                "-A FORWARD -p tcp -j REJECT --reject-with tcp-reset",
                NfVerdict::Reject("tcp-reset".into()),
            ),
            stack: NFT_FORWARD,
            ..case(
                "tcp reset reject",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_reject",
                "REJECT with tcp-reset in the ipv4 forward hook",
            )
        },
        Case {
            rule: moved(
                "iptables-nft",
                "filter",
                "-A FORWARD -p udp -j DROP",
                NfVerdict::Drop,
            ),
            stack: &[
                "sk_skb_reason_drop",
                "nft_do_chain",
                "nft_do_chain_ipv4",
                "nf_hook_slow",
                "br_nf_forward_ip",
                "nf_hook_slow",
                "__br_forward",
            ],
            ..case(
                "bridged by br_netfilter",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "bridge_netfilter",
                "bridged frame on r0 dropped by an IP rule in the ipv4 forward hook",
            )
        },
        Case {
            stack: NFT_FORWARD,
            ..case(
                "nft drop, rule without counter",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_drop",
                "a chain policy or a rule without `counter`",
            )
        },
        Case {
            rule: moved(
                "iptables-legacy",
                "filter",
                "-A FORWARD -p udp -j DROP",
                NfVerdict::Drop,
            ),
            stack: HOOK_FORWARD,
            ..case(
                "legacy drop",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_drop",
                "by iptables-legacy rule [iptables-legacy table filter chain FORWARD",
            )
        },
        Case {
            stack: &[
                "sk_skb_reason_drop",
                "nf_hook_slow",
                "__ip_local_out",
                "ip_push_pending_frames",
                "__icmp_send",
            ],
            ..case(
                "redirect dropped by NAT",
                icmp(drop("NETFILTER_DROP", "nf_hook_slow"), 5, 1),
                "benign",
                "NAT dropped the ICMP redirect",
            )
        },
        Case {
            stack: HOOK_FORWARD,
            ..case(
                "hook function drop",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_no_rule",
                "by a netfilter hook function, not a rule",
            )
        },
        Case {
            counters_read: false,
            stack: &["sk_skb_reason_drop", "nf_hook_slow", "some_caller"],
            ..case(
                "unreadable rule sets",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_unidentified",
                "an unidentified hook (called from some_caller)",
            )
        },
        Case {
            // nft is missing: the iptables-nft rules were read, native nftables rules not.
            unread: &["nft not found"],
            ..case(
                "nftables drop, nft missing",
                drop("NETFILTER_DROP", "nft_do_chain"),
                "netfilter_drop",
                "rule: not identified: nft not found (the rule sets of this namespace could only partly be read)",
            )
        },
        Case {
            counters_read: false,
            unread: &["iptables-legacy-save not found"],
            stack: HOOK_FORWARD,
            ..case(
                "hook drop, iptables-legacy-save missing",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_unidentified",
                "rule: not identified: iptables-legacy-save not found (the rule sets of this namespace could not be read), so",
            )
        },
        Case {
            // Read in part: no rule found is no proof that none dropped it.
            unread: &["nft not found"],
            stack: HOOK_FORWARD,
            ..case(
                "hook drop, nft missing",
                drop("NETFILTER_DROP", "nf_hook_slow"),
                "netfilter_unidentified",
                "nft not found",
            )
        },
        // --- MTU
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
            answer: Some(Answer::Icmp(3, 4)),
            stack: &[
                "sk_skb_reason_drop",
                "ip_fragment",
                "ip_output",
                "iptunnel_xmit",
                "vxlan_xmit_one",
            ],
            route: route("unicast", "10.231.2.2 via 10.231.1.1 dev a0 table main mtu 1400", Some(1400)),
            tunnel: Some(Tunnel {
                name: "vx0".into(),
                kind: "vxlan".into(),
                mtu: 1500,
                overhead: 50,
                matched_by: "remote address",
                remote: None,
            }),
            ..case(
                "tunnel",
                outer,
                "tunnel_mtu",
                "1528-byte vxlan packet from vx0 to 10.231.2.2 does not fit the path MTU 1400",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 4)),
            route: route("unicast", "10.231.9.1 dev r0 table main", Some(1400)),
            tunnel: Some(Tunnel {
                name: "gr0".into(),
                kind: "gre".into(),
                mtu: 1500,
                overhead: 24,
                matched_by: "the device the packet was sent on",
                remote: Some("10.231.9.1".parse().unwrap()),
            }),
            ..case(
                "gre refusing its inner packet",
                {
                    let mut d = drop("NOT_SPECIFIED", "ip_tunnel_xmit");
                    d.len = 1488;
                    d.dev = Some(dev("gr0", 1500));
                    d
                },
                "tunnel_mtu",
                "1488-byte packet to 10.231.2.2 does not fit tunnel gr0 (MTU 1500): its underlay allows 1376 once encapsulated",
            )
        },
        Case {
            route: route("unicast", "10.231.2.2 dev r0 mtu 1300", Some(1300)),
            ..case(
                "local packet larger than the path MTU",
                drop("NOT_SPECIFIED", "ip_fragment"),
                "mtu_exceeded",
                "does not fit the path MTU 1300",
            )
        },
        case(
            "veth mtu",
            drop("NOT_SPECIFIED", "__dev_forward_skb2"),
            "veth_mtu_mismatch",
            "did not fit its veth peer",
        ),
        Case {
            answer: Some(Answer::Icmp(3, 4)),
            ..case(
                "mtu",
                too_big.clone(),
                "mtu_exceeded",
                "1428-byte packet does not fit MTU 1280 of r1; ICMP sent: fragmentation needed",
            )
        },
        Case {
            traced: Traced::NONE,
            ..case(
                "mtu, ipv6, icmpv6 not traceable",
                v6(too_big),
                "mtu_exceeded",
                "ICMP sent: unknown (this kernel does not let dropscope see ICMPv6 errors)",
            )
        },
        // --- routing
        Case {
            answer: Some(Answer::Icmp(3, 1)),
            route: route("unreachable", "unreachable 10.231.66.0/24 table 100", None),
            ..case(
                "unreachable route",
                drop("NOT_SPECIFIED", "ip_error"),
                "unreachable_route",
                "unreachable 10.231.66.0/24 table 100",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 13)),
            route: policy_route("prohibit", Some("110: from 10.231.1.2 prohibit"), None, None),
            ..case(
                "a policy rule refuses",
                drop("NOT_SPECIFIED", "ip_error"),
                "unreachable_route",
                "refused by policy rule 110: from 10.231.1.2 prohibit, before any table",
            )
        },
        Case {
            route: policy_route(
                "blackhole",
                Some("100: from 10.231.1.0/24 lookup 100"),
                Some("blackhole 10.231.2.0/24 table 100"),
                Some("10.231.2.0/24 dev r1"),
            ),
            ..case(
                "a policy table's blackhole shadows main",
                drop("NOT_SPECIFIED", "ip_error"),
                "unreachable_route",
                "blackhole 10.231.2.0/24 table 100 (ip rule 100: from 10.231.1.0/24 lookup 100); the main table's route 10.231.2.0/24 dev r1 is never reached",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 1)),
            route: policy_route("unreachable", None, Some("unreachable 10.231.2.0/24"), None),
            ..case(
                "an unreachable route in main",
                drop("NOT_SPECIFIED", "ip_error"),
                "unreachable_route",
                "10.231.2.2 from 10.231.1.2: unreachable 10.231.2.0/24 (ICMP sent: host unreachable)",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 0)),
            route: route("none", "no route to it in the tables the policy rules consult", None),
            ..case(
                "no route",
                drop("IP_INNOROUTES", "ip_error"),
                "no_route",
                "no route to 10.231.2.2",
            )
        },
        Case {
            answer: Some(Answer::Icmp(3, 1)),
            route: route("unicast", "10.231.2.2 dev r1 table main", None),
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
        case("ttl", ttl, "ttl_expired", "TTL 1 on arrival at r0"),
        case(
            "bad checksum",
            drop("UDP_CSUM", "__udp4_lib_rcv"),
            "malformed_packet",
            "checksum does not match",
        ),
        case(
            "bad header",
            drop("IP_INHDR", "ip_rcv_core"),
            "malformed_packet",
            "IP_INHDR at ip_rcv_core",
        ),
        // --- neighbours, sockets, queues
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
        Case {
            answer: Some(Answer::TcpReset),
            ..case(
                "closed tcp port",
                drop("NO_SOCKET", "tcp_v4_rcv"),
                "no_listener",
                "answered 10.231.1.2 with a TCP reset",
            )
        },
        case(
            "closed port",
            drop("NO_SOCKET", "__udp4_lib_rcv"),
            "no_listener",
            "udp port 5353 on 10.231.2.2",
        ),
        case(
            "rcvbuf",
            drop("SOCKET_RCVBUFF", "udp_queue_rcv_one_skb"),
            "socket_buffer_full",
            "port 5353",
        ),
        case(
            "vsock",
            drop("NOT_SPECIFIED", "virtio_transport_recv_pkt"),
            "vsock_drop",
            "vsock packet discarded",
        ),
        case(
            "tcp zero window",
            drop("TCP_ZEROWINDOW", "tcp_data_queue"),
            "socket_buffer_full",
            "zero window",
        ),
        Case {
            moved: vec![("TcpExtListenOverflows", 3), ("TcpExtListenDrops", 3)],
            ..case(
                "accept queue full",
                drop("TCP_LISTEN_OVERFLOW", "tcp_v4_syn_recv_sock"),
                "listen_overflow",
                "TcpExtListenOverflows +3, TcpExtListenDrops +3",
            )
        },
        case(
            "paws",
            drop("TCP_RFC7323_PAWS", "tcp_validate_incoming"),
            "tcp_out_of_window",
            "timestamps",
        ),
        case(
            "out of window",
            drop("TCP_INVALID_SEQUENCE", "tcp_validate_incoming"),
            "tcp_out_of_window",
            "does not fit its connection's state",
        ),
        case(
            "tcp-md5",
            drop("TCP_MD5FAILURE", "tcp_inbound_hash"),
            "tcp_auth_failed",
            "signature",
        ),
        case(
            "socket filter",
            drop("SOCKET_FILTER", "sk_filter_trim_cap"),
            "socket_policy",
            "refused it",
        ),
        case(
            "cgroup egress",
            drop("BPF_CGROUP_EGRESS", "ip_finish_output"),
            "security_policy",
            "cgroup BPF program",
        ),
        case(
            "ipv6 disabled",
            v6(drop("IPV6DISABLED", "ipv6_rcv")),
            "ipv6_disabled",
            "IPv6 is disabled",
        ),
        case(
            "no protocol handler",
            drop("IP_NOPROTO", "ip_protocol_deliver_rcu"),
            "no_protocol_handler",
            "nothing handles it here",
        ),
        case(
            "device down",
            drop("DEV_READY", "__dev_queue_xmit"),
            "device_not_ready",
            "is down",
        ),
        case(
            "no memory",
            drop("NOMEM", "__netif_receive_skb_core"),
            "resource_exhausted",
            "NOMEM",
        ),
        case(
            "stp blocking",
            drop("BRIDGE_INGRESS_STP_STATE", "br_handle_frame"),
            "bridge_port_blocked",
            "not in the forwarding state",
        ),
        case(
            "ovs",
            drop("OVS_DROP_EXPLICIT", "ovs_dp_process_packet"),
            "ovs_drop",
            "Open vSwitch: OVS_DROP_EXPLICIT",
        ),
        case(
            "tunnel loop",
            drop("RECURSION_LIMIT", "__dev_queue_xmit"),
            "overlay_mismatch",
            "tunnel routed into itself",
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
            "vxlan no remote",
            drop("NO_TX_TARGET", "vxlan_xmit"),
            "overlay_mismatch",
            "has no remote",
        ),
        case(
            "vxlan",
            drop("VXLAN_VNI_NOT_FOUND", "vxlan_rcv"),
            "overlay_mismatch",
            "VXLAN_VNI_NOT_FOUND",
        ),
        case(
            "xfrm",
            drop("XFRM_POLICY", "ip_forward"),
            "xfrm_policy",
            "IPsec",
        ),
        Case {
            stack: &["sk_skb_reason_drop", "somewhere", "caller_one", "caller_two"],
            ..case(
                "unknown",
                drop("SOME_NEW_REASON", "somewhere"),
                "unclassified",
                "kernel reason SOME_NEW_REASON at somewhere; stack: somewhere <- caller_one <- caller_two",
            )
        },
    ]
}

fn classify(engine: &Engine, c: &Case) -> Verdict {
    let stack: Vec<Arc<str>> = c.stack.iter().map(|f| Arc::from(*f)).collect();
    let mut fake = Fake(c);
    let mut facts = Facts::new(&c.drop, c.answer, c.traced, &stack, &mut fake);
    facts.frag_needed_dropped = c.frag_needed_dropped;
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
        assert!(!v.fix.is_empty());
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
        .fix
        .starts_with("ip netns exec dr-r sysctl -w net.ipv4.ip_forward=1"));
}

#[test]
fn reject_without_icmp_signal_degrades_to_drop() {
    // A kernel without the icmp_send tracepoint cannot prove REJECT: the answer is the honest
    // "netfilter_drop", never an invented reject.
    let engine = Engine::builtin();
    let c = Case {
        traced: Traced::NONE,
        stack: NFT_FORWARD,
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
fn answers_that_cannot_be_seen_are_unknown_not_none() {
    let engine = Engine::builtin();
    let mut too_big = v6(drop("PKT_TOO_BIG", "ip6_forward"));
    too_big.out = Some(dev("r1", 1280));
    let seen = case("x", too_big.clone(), "mtu_exceeded", "");
    assert!(classify(&engine, &seen)
        .evidence
        .ends_with("ICMP sent: none"));
    let unseen = Case {
        traced: Traced {
            icmp6: false,
            ..Traced::ALL
        },
        ..case("x", too_big, "mtu_exceeded", "")
    };
    let v = classify(&engine, &unseen);
    assert!(v.evidence.contains("ICMP sent: unknown"), "{}", v.evidence);
    assert!(!v.evidence.contains("none"), "{}", v.evidence);
}

#[test]
fn a_hook_function_drop_is_never_called_a_firewall_rule() {
    // The rule sets were read and no DROP/REJECT counter moved: no "firewall rule" claim and
    // no command that deletes a rule.
    let engine = Engine::builtin();
    let c = Case {
        stack: HOOK_FORWARD,
        ..case("x", drop("NETFILTER_DROP", "nf_hook_slow"), "", "")
    };
    let v = classify(&engine, &c);
    assert_eq!(v.cause, "netfilter_no_rule");
    assert!(!v.title.contains("Firewall rule"), "{}", v.title);
    assert!(!v.fix.contains("delete"), "{}", v.fix);
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
fn live_state_is_fetched_only_for_the_rules_reached() {
    // A drop decided by its reason alone asks the namespace nothing.
    struct Counting(HashMap<&'static str, u32>);
    impl Investigator for Counting {
        fn exec_prefix(&mut self, _: u32) -> String {
            *self.0.entry("exec_prefix").or_default() += 1;
            String::new()
        }
        fn netfilter(&mut self, _: &DropEvent, _: Option<Answer>) -> NfState {
            *self.0.entry("netfilter").or_default() += 1;
            NfState::default()
        }
        fn route(&mut self, _: &DropEvent) -> Option<Route> {
            *self.0.entry("route").or_default() += 1;
            None
        }
        fn interfaces(&mut self, _: u32) -> Option<usize> {
            *self.0.entry("interfaces").or_default() += 1;
            None
        }
        fn neighbours(&mut self, _: &DropEvent) -> Vec<String> {
            *self.0.entry("neighbours").or_default() += 1;
            Vec::new()
        }
        fn sysctl(&mut self, _: u32, _: &str) -> Option<String> {
            *self.0.entry("sysctl").or_default() += 1;
            None
        }
        fn counters(&mut self, _: u32) -> Counters {
            *self.0.entry("counters").or_default() += 1;
            Counters::default()
        }
    }
    let engine = Engine::builtin();
    let d = drop("QDISC_DROP", "__dev_queue_xmit");
    let mut inv = Counting(HashMap::new());
    let facts = Facts::new(&d, None, Traced::ALL, &[], &mut inv);
    assert_eq!(engine.classify(&facts).cause, "qdisc_drop");
    drop_facts(facts);
    assert_eq!(
        inv.0.keys().copied().collect::<Vec<_>>(),
        vec!["exec_prefix"],
        "only the fix's namespace prefix was needed"
    );
    // A netfilter drop reads the rule counters once, however many rules test them.
    let d = drop("NETFILTER_DROP", "nf_hook_slow");
    let mut inv = Counting(HashMap::new());
    let facts = Facts::new(&d, None, Traced::ALL, &[], &mut inv);
    engine.classify(&facts);
    drop_facts(facts);
    assert_eq!(inv.0.get("netfilter"), Some(&1));
    assert_eq!(inv.0.get("route"), None);
}

/// Ends the facts' borrow of the investigator.
fn drop_facts(f: Facts) {
    std::mem::drop(f);
}

#[test]
fn the_dropping_rule_is_named_with_its_removal_command() {
    let engine = Engine::builtin();
    let c = Case {
        rule: moved(
            "nftables",
            "inet drt",
            "handle 3 comment \"ds\"",
            NfVerdict::Drop,
        ),
        stack: NFT_FORWARD,
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
        v.fix
            .contains("ip netns exec dr-r nft delete rule inet drt FORWARD handle 3"),
        "{}",
        v.fix
    );
    let c = Case {
        rule: moved(
            "iptables-legacy",
            "filter",
            "-A FORWARD -p udp -j DROP",
            NfVerdict::Drop,
        ),
        stack: HOOK_FORWARD,
        ..case(
            "x",
            drop("NETFILTER_DROP", "nf_hook_slow"),
            "netfilter_drop",
            "",
        )
    };
    let v = classify(&engine, &c);
    assert!(
        v.fix
            .contains("iptables-legacy -t filter -D FORWARD -p udp -j DROP"),
        "{}",
        v.fix
    );
}
