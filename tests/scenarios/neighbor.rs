//! Neighbour resolution failure: the next hop never answers ARP.
use dropscope_tests::{traffic::Udp, wait_for, Nstat, Observer, Topology};

use crate::{evidence, observe, Expect};

#[test]
// vm-test: core
fn neigh_failed_is_neighbor_failed() {
    let t = Topology::new();
    let before_a = Nstat::read(&t.a);
    let (report, unreachables) = observe(&t.r, &[], (&t.a, "IcmpInDestUnreachs"), || {
        Udp::to("10.231.2.99", 9300).count(3).send(&t.a);
        // ARP gives up after its probes (about 3 s); each queued packet is then dropped and
        // answered with ICMP host unreachable. Wait for those answers, not for a fixed time.
        wait_for("3 ICMP host-unreachable at the sender", 15.0, || {
            Nstat::delta(&t.a, &before_a, "IcmpInDestUnreachs") >= 3
        });
    });
    let e = Expect {
        ifname: "r1",
        dst: "10.231.2.99",
        ..Expect::routed(&t, "neighbor_failed", 9300)
    };
    assert_eq!((e.check(&report), unreachables), (3, 3));
    let ev = evidence(&report, "neighbor_failed");
    assert!(
        ev.contains("host unreachable") && ev.contains("neighbours 10.231.2.99 FAILED"),
        "{ev}"
    );
}

/// `unresolved_discards` of the ARP table, summed over CPUs. The table's statistics are
/// global and shown only in the initial namespace (/proc/net/stat/arp_cache).
fn unresolved_discards() -> u64 {
    let text = std::fs::read_to_string("/proc/net/stat/arp_cache").expect("arp_cache stats");
    let mut lines = text.lines();
    let col = lines
        .next()
        .unwrap()
        .split_whitespace()
        .position(|h| h == "unresolved_discards")
        .expect("column");
    lines
        .map(|l| u64::from_str_radix(l.split_whitespace().nth(col).unwrap(), 16).unwrap())
        .sum()
}

#[test]
fn burst_to_unresolved_neighbor_is_neighbor_queue_full() {
    let t = Topology::new();
    // Room for about two queued packets per unresolved neighbour.
    t.r.sh("sysctl -qw net.ipv4.neigh.r1.unres_qlen_bytes=2000");
    let before = unresolved_discards();
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to("10.231.2.98", 9301)
        .payload(600)
        .count(8)
        .send(&t.a);
    let report = obs.stop();
    report.assert_consistent();
    let discards = unresolved_discards() - before;
    assert!(discards > 0);
    assert_eq!(report.count("neighbor_queue_full"), discards);
    let r = report.of("neighbor_queue_full")[0];
    assert_eq!(
        (&r["dst"], &r["dport"]),
        (&"10.231.2.98".into(), &9301.into())
    );
    let ev = evidence(&report, "neighbor_queue_full");
    assert!(ev.contains("neighbours 10.231.2.98 INCOMPLETE"), "{ev}");
}
