//! Conntrack causes: table full, INVALID packets dropped by a rule.
use dropscope_tests::{
    topology::{A4, B4},
    traffic::{tcp_bare_ack, Udp},
    Observer, Topology,
};

use crate::{evidence, Expect};

/// `conntrack -S` drop / invalid totals in a namespace.
fn ct_stat(ns: &dropscope_tests::Netns, key: &str) -> u64 {
    ns.sh("conntrack -S")
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// Restores the (global) conntrack limit however the test ends.
struct CtMax(String);
impl Drop for CtMax {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", &self.0);
    }
}

#[test]
fn conntrack_table_full_is_conntrack_full() {
    let t = Topology::new();
    // Conntrack runs in R only (a rule needs it); the table limit is global but the count is
    // per namespace, so other namespaces are unaffected while it is low.
    t.r.sh("iptables-nft -A FORWARD -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT");
    let _restore =
        CtMax(std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap());
    let obs = Observer::start(&["--netns", &t.r.name]);
    std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", "3").unwrap();
    for port in 9700..9706 {
        Udp::to(B4, port).send(&t.a);
    }
    let report = obs.stop();
    drop(_restore);
    report.assert_consistent();
    let recs = report.of("conntrack_full");
    let counted = report.count("conntrack_full");
    assert_eq!(counted, ct_stat(&t.r, "drop"), "{:#?}", report.drops());
    assert_eq!(counted, 3);
    for r in &recs {
        assert_eq!(
            (&r["ifname"], &r["src"], &r["hook"]),
            (&"r0".into(), &A4.into(), &"prerouting".into())
        );
    }
    assert!(
        evidence(&report, "conntrack_full").contains("nf_conntrack_max=3"),
        "{}",
        evidence(&report, "conntrack_full")
    );
}

#[test]
fn invalid_state_rule_is_conntrack_invalid() {
    let t = Topology::new();
    t.r.sh(
        "sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0; nft add table inet cti; \
         nft add chain inet cti f '{ type filter hook forward priority 0; }'; \
         nft add rule inet cti f ct state invalid counter drop comment '\"ct-invalid\"'",
    );
    let obs = Observer::start(&["--netns", &t.r.name]);
    for sport in [40001, 40002] {
        tcp_bare_ack(&t.a, A4, B4, sport, 80);
    }
    let report = obs.stop();
    let e = Expect {
        proto: "tcp",
        ..Expect::routed(&t, "conntrack_invalid", 80)
    };
    let counted = e.check(&report);
    assert_eq!(
        counted,
        dropscope_tests::nft_rule_packets(&t.r, "ct-invalid")
    );
    assert_eq!(counted, 2);
    assert!(evidence(&report, "conntrack_invalid").contains("comment \"ct-invalid\""));
}
