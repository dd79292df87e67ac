//! Context probes (nf_hook_slow, ip_forward, nft_do_chain, ipt_do_table): what they add where
//! the kernel allows them, and the same cause from the drop tracepoint alone where it does
//! not, or when a fallback is forced with `--context`.
//!
//! `cargo xtask vm-test` sets DROPSCOPE_EXPECT_CONTEXT=1 on kernels that allow fentry and
//! kprobes, so a probe that silently fails to attach there fails these tests. On a kernel that
//! allows neither (like the development host: lockdown, no kprobes) they check the degraded
//! answer instead.
//!
//! vm-test: core
use dropscope_tests::{
    iptables_rule_packets, nft_forward_drop, nft_rule_packets, topology::B4, traffic::Udp,
    Observer, Report, Topology,
};
use serde_json::Value;

use crate::Expect;

fn expect_context() -> bool {
    std::env::var("DROPSCOPE_EXPECT_CONTEXT").is_ok_and(|v| v == "1")
}

/// The mode a probe got, from the attach record.
fn mode<'a>(report: &'a Report, probe: &str) -> &'a str {
    let probes = report.attach()["probes"]
        .as_array()
        .expect("attach record lists probes");
    let p = probes
        .iter()
        .find(|p| p["probe"] == probe)
        .unwrap_or_else(|| panic!("{probe} not in {probes:#?}"));
    p["mode"].as_str().unwrap()
}

/// Checks the modes `--context FLAG` should give, and says whether the probe `probe` is attached.
fn check_modes(report: &Report, flag: &str, probe: &str) -> bool {
    let got = mode(report, probe);
    match flag {
        "off" => assert_eq!(got, "unavailable", "--context off attaches nothing"),
        "kprobe" => assert_ne!(got, "fentry", "--context kprobe must not use fentry"),
        _ => {}
    }
    if expect_context() && flag != "off" {
        assert_ne!(
            got,
            "unavailable",
            "{probe} should attach on this kernel: {:#}",
            report.attach()
        );
        if flag == "auto" && matches!(probe, "nf_hook_slow" | "ip_forward") {
            assert_eq!(
                got,
                "fentry",
                "{probe} is in vmlinux: fentry expected: {:#}",
                report.attach()
            );
        }
        if flag == "kprobe" {
            assert_eq!(got, "kprobe");
        }
    }
    got != "unavailable"
}

fn first<'a>(report: &'a Report, cause: &str) -> &'a Value {
    report.of(cause)[0]
}

#[test]
fn nft_drop_carries_hook_table_and_chain_in_every_mode() {
    let t = Topology::new();
    nft_forward_drop(&t.r, "ctx", 9700, "ctx-9700");
    for flag in ["auto", "kprobe", "off"] {
        let before = nft_rule_packets(&t.r, "ctx-9700");
        let obs = watch_with_probes(&t, flag);
        Udp::to(B4, 9700).count(3).send(&t.a);
        let report = obs.stop();
        let counted = Expect::routed(&t, "netfilter_drop", 9700).check(&report);
        assert_eq!(
            counted,
            nft_rule_packets(&t.r, "ctx-9700") - before,
            "--context {flag}"
        );
        assert_eq!(counted, 3);
        let r = first(&report, "netfilter_drop");
        // From the probe or from the stack, the hook is the same.
        assert_eq!(r["hook"], "forward", "--context {flag}: {r:#}");
        if check_modes(&report, flag, "nf_hook_slow") {
            assert_eq!(r["hook_from"], "probe", "{r:#}");
            assert_eq!(r["nf_family"], "ipv4", "{r:#}");
        } else {
            assert_eq!(r["hook_from"], "stack", "{r:#}");
        }
        if check_modes(&report, flag, "nft_do_chain") {
            assert_eq!(
                (&r["nf_table"], &r["nf_chain"]),
                (&"ctx".into(), &"f".into()),
                "{r:#}"
            );
            assert_eq!(r["engine"], "nftables");
        } else {
            assert!(r["nf_table"].is_null(), "{r:#}");
        }
        if check_modes(&report, flag, "ip_forward") {
            assert_eq!(
                (&r["forwarded"], &r["in_ifname"]),
                (&true.into(), &"r0".into()),
                "{r:#}"
            );
        } else {
            assert!(r["forwarded"].is_null(), "{r:#}");
        }
    }
}

#[test]
fn legacy_drop_names_its_table_in_every_mode() {
    let t = Topology::new();
    t.r.sh("iptables-legacy -A FORWARD -p udp --dport 9701 -j DROP");
    for flag in ["auto", "kprobe", "off"] {
        let rule = "--dport 9701 -j DROP";
        let before = iptables_rule_packets(&t.r, "iptables-legacy", rule);
        let obs = watch_with_probes(&t, flag);
        Udp::to(B4, 9701).count(2).send(&t.a);
        let report = obs.stop();
        let counted = Expect::routed(&t, "netfilter_drop", 9701).check(&report);
        assert_eq!(
            counted,
            iptables_rule_packets(&t.r, "iptables-legacy", rule) - before
        );
        assert_eq!(counted, 2);
        let r = first(&report, "netfilter_drop");
        assert_eq!(
            (&r["hook"], &r["engine"]),
            (&"forward".into(), &"iptables-legacy".into()),
            "--context {flag}: {r:#}"
        );
        if check_modes(&report, flag, "ipt_do_table") {
            assert_eq!(r["nf_table"], "filter", "{r:#}");
        } else {
            assert!(r["nf_table"].is_null(), "{r:#}");
        }
        let _ = check_modes(&report, flag, "nf_hook_slow");
    }
}

/// A drop on the way out of a forwarded packet (skb->dev is already the egress device): with
/// the ip_forward probe it names where the packet came in too (used by the qdisc test, which
/// runs with `--context-arm always`).
pub fn check_forwarded(report: &Report, r: &Value, ingress: &str, egress: &str) {
    if check_modes(report, "auto", "ip_forward") {
        assert_eq!(
            (&r["forwarded"], &r["in_ifname"], &r["out_ifname"]),
            (&true.into(), &ingress.into(), &egress.into()),
            "{r:#}"
        );
    } else {
        assert!(r["forwarded"].is_null(), "{r:#}");
    }
}

#[test]
fn forwarding_off_carries_the_route_error_from_ip_error() {
    let t = Topology::new();
    t.r.sh("sysctl -qw net.ipv4.ip_forward=0");
    for flag in ["auto", "off"] {
        let before = dropscope_tests::Nstat::read(&t.r);
        let obs = Observer::start(&["--netns", &t.r.name, "--context", flag]);
        Udp::to(B4, 9703).count(2).send(&t.a);
        let report = obs.stop();
        let counted = Expect::routed(&t, "forwarding_disabled", 9703).check(&report);
        assert_eq!(
            counted,
            dropscope_tests::Nstat::delta(&t.r, &before, "IpInAddrErrors")
        );
        assert_eq!(counted, 2);
        let r = first(&report, "forwarding_disabled");
        if check_modes(&report, flag, "ip_error") {
            assert_eq!(r["route_error"], "EHOSTUNREACH", "{r:#}");
        } else {
            assert!(r["route_error"].is_null(), "{r:#}");
        }
    }
}

#[test]
fn icmpv6_errors_are_paired_where_the_probe_attaches() {
    // An IPv6 packet too big for the router's egress: the router answers "packet too big".
    // With the icmp6_send probe the drop says so (and each answered drop is one the kernel
    // counted as sent); without it the answer is unknown, never "none".
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    for flag in ["auto", "kprobe", "off"] {
        t.a.sh("ip -6 route flush cache");
        let before = dropscope_tests::Nstat::read(&t.r);
        let obs = Observer::start(&["--netns", &t.r.name, "--context", flag]);
        Udp::to(dropscope_tests::topology::B6, 9710)
            .payload(1400)
            .dont_fragment()
            .count(2)
            .send(&t.a);
        let report = obs.stop();
        report.assert_consistent();
        let sent = dropscope_tests::Nstat::delta(&t.r, &before, "Icmp6OutPktTooBigs");
        let recs = report.of("mtu_exceeded");
        assert!(!recs.is_empty(), "--context {flag}: {:#?}", report.drops());
        if check_modes(&report, flag, "icmp6_send") {
            let answered: u64 = recs
                .iter()
                .filter(|r| r["icmp_sent"]["type"] == 2 && r["icmp_sent"]["family"] == "ipv6")
                .map(|r| r["count"].as_u64().unwrap())
                .sum();
            assert_eq!(answered, sent, "--context {flag}: {recs:#?}");
            assert!(
                recs[0]["evidence"]
                    .as_str()
                    .unwrap()
                    .contains("ICMP sent: ICMPv6 packet too big"),
                "{:#}",
                recs[0]
            );
        } else {
            for r in &recs {
                let ev = r["evidence"].as_str().unwrap();
                assert!(ev.contains("ICMP sent: unknown"), "--context {flag}: {ev}");
                assert!(r["icmp_sent"].is_null());
            }
        }
    }
}

/// dropscope on the router with the context probes in mode `flag`, attached from the start
/// (not on demand), so the first drop already carries what they saw.
fn watch_with_probes(t: &Topology, flag: &str) -> Observer {
    Observer::start(&[
        "--netns",
        &t.r.name,
        "--context",
        flag,
        "--context-arm",
        "always",
    ])
}

/// The default arming: the hot-path probes are attached by the first netfilter drops,
/// see the next ones, and go again after `--context-linger` without such drops.
#[test]
fn hot_path_probes_attach_on_demand_and_detach_when_quiet() {
    let t = Topology::new();
    nft_forward_drop(&t.r, "ctx", 9705, "ctx-9705");
    let obs = Observer::start(&["-v", "--netns", &t.r.name, "--context-linger", "2"]);
    // Traffic R forwards and accepts (B refuses it, outside the watched namespace): it must
    // not attach them.
    let forwarded = dropscope_tests::Nstat::read(&t.r);
    Udp::to(B4, 9706).count(50).send(&t.a);
    dropscope_tests::wait_for("R to forward the accepted traffic", 10.0, || {
        dropscope_tests::Nstat::delta(&t.r, &forwarded, "IpForwDatagrams") >= 50
    });
    assert!(
        !obs.wait_for_log(1.0, "context probes attached"),
        "healthy forwarded traffic attached the hot-path probes"
    );
    let before = nft_rule_packets(&t.r, "ctx-9705");
    Udp::to(B4, 9705).count(2).send(&t.a);
    // The record is printed after the loop turn that read the drop, which attaches the
    // probes it needs.
    let first = obs.wait_for(60.0, |r| r["cause"] == "netfilter_drop");
    let first = first.expect("no record of the first drops").0;
    // The first drop of the burst: the answer without the probes, the hook from the stack.
    assert_eq!(
        (&first["hook"], &first["hook_from"]),
        (&"forward".into(), &"stack".into()),
        "{first:#}"
    );
    let armed = obs.wait_for_log(30.0, "context probes attached: nf_hook_slow");
    if armed {
        Udp::to(B4, 9705).count(2).send(&t.a);
        // Nothing needs them for longer than the linger: they go again.
        assert!(
            obs.wait_for_log(60.0, "context probes detached"),
            "the probes were not detached after the linger"
        );
    }
    let report = obs.stop();
    let counted = Expect::routed(&t, "netfilter_drop", 9705).check(&report);
    assert_eq!(counted, nft_rule_packets(&t.r, "ctx-9705") - before);
    assert_eq!(counted, if armed { 4 } else { 2 });
    if mode(&report, "nf_hook_slow") == "unavailable" {
        assert!(!expect_context(), "{:#}", report.attach());
        assert!(!armed, "{}", report.stderr);
        return;
    }
    assert!(armed, "the first drops did not attach the probes: {}", report.stderr);
    let note = report.attach()["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["probe"] == "nf_hook_slow")
        .unwrap()["note"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(note.contains("on demand"), "{note}");
    // Once attached, later drops carry what the probes saw.
    let records = report.of("netfilter_drop");
    let from_probe = records.iter().find(|r| r["hook_from"] == "probe");
    let r = from_probe.unwrap_or_else(|| panic!("no drop seen by the probes: {records:#?}"));
    assert_eq!(
        (&r["hook"], &r["nf_table"], &r["forwarded"]),
        (&"forward".into(), &"ctx".into(), &true.into()),
        "{r:#}"
    );
}
