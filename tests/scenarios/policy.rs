//! Policy routing: the main table routes B, but an `ip rule` sends some traffic to another
//! table (or refuses it itself). The cause, and the rule and route in the evidence, must be the
//! ones the kernel used, not a lookup in the main table.
use dropscope_tests::{nft_rule_packets, topology::B4, traffic::Udp, Nstat, Observer, Topology};

use crate::{evidence, Expect};

/// A second source address on A (10.231.9.2) that R routes back, so only policy decides.
fn topology() -> Topology {
    let t = Topology::new();
    t.a.sh("ip addr add 10.231.9.2/32 dev a0");
    t.r.sh(
        "ip route add 10.231.9.0/24 via 10.231.1.2; \
         nft add table inet seen; \
         nft add chain inet seen pre '{ type filter hook prerouting priority -300; }'; \
         nft add rule inet seen pre udp dport 9600-9699 counter comment '\"arrived\"'",
    );
    t
}

/// Watches R while A sends `count` datagrams from 10.231.9.2 to B:dport. Returns the report
/// and how many of them reached R (its prerouting counter).
fn observe(t: &Topology, dport: u16, count: usize) -> (dropscope_tests::Report, u64) {
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, dport).from("10.231.9.2").count(count).send(&t.a);
    let report = obs.stop();
    (report, nft_rule_packets(&t.r, "arrived"))
}

fn expect(t: &Topology, dport: u16) -> Expect<'_> {
    Expect {
        src: "10.231.9.2",
        ..Expect::routed(t, "unreachable_route", dport)
    }
}

fn hint<'a>(report: &'a dropscope_tests::Report) -> &'a str {
    report.of("unreachable_route")[0]["fix"].as_str().unwrap()
}

#[test]
fn a_source_rule_to_a_blackhole_table_is_named_over_main() {
    let t = topology();
    t.r.sh("ip rule add from 10.231.9.0/24 lookup 100 pref 100; ip route add blackhole 10.231.2.0/24 table 100");
    let before = Nstat::read(&t.b);
    let (report, arrived) = observe(&t, 9600, 3);
    assert_eq!((expect(&t, 9600).check(&report), arrived), (3, 3));
    assert_eq!(Nstat::delta(&t.b, &before, "UdpNoPorts"), 0, "nothing reached B");
    let ev = evidence(&report, "unreachable_route");
    assert!(
        ev.contains("blackhole 10.231.2.0/24 table 100 (ip rule 100: from 10.231.9.0/24 lookup 100)"),
        "{ev}"
    );
    assert!(
        ev.contains("the main table's route 10.231.2.0/24 dev r1 is never reached"),
        "{ev}"
    );
    assert!(ev.contains("ICMP sent: none"), "{ev}");
    assert!(
        hint(&report).starts_with(&format!(
            "ip netns exec {} ip route del blackhole 10.231.2.0/24 table 100",
            t.r.name
        )),
        "{}",
        hint(&report)
    );
}

#[test]
fn a_mark_rule_to_an_unreachable_table_is_named() {
    let t = topology();
    t.r.sh(
        "nft add chain inet seen marker '{ type filter hook prerouting priority -150; }'; \
         nft add rule inet seen marker ip saddr 10.231.9.2 meta mark set 0x42; \
         ip rule add fwmark 0x42 lookup 200 pref 200; ip route add unreachable 10.231.0.0/16 table 200",
    );
    let before = Nstat::read(&t.r);
    let (report, arrived) = observe(&t, 9601, 4);
    let sent = Nstat::delta(&t.r, &before, "IcmpOutDestUnreachs");
    assert_eq!((expect(&t, 9601).check(&report), arrived, sent), (4, 4, 4));
    let ev = evidence(&report, "unreachable_route");
    assert!(
        ev.contains("unreachable 10.231.0.0/16 table 200 (ip rule 200: from all fwmark 0x42 lookup 200)")
            && ev.contains("ICMP sent: host unreachable"),
        "{ev}"
    );
}

#[test]
fn a_prohibit_rule_is_named_as_the_rule() {
    let t = topology();
    t.r.sh("ip rule add from 10.231.9.2 iif r0 prohibit pref 90");
    let (report, arrived) = observe(&t, 9602, 2);
    assert_eq!((expect(&t, 9602).check(&report), arrived), (2, 2));
    let ev = evidence(&report, "unreachable_route");
    assert!(
        ev.contains("refused by policy rule 90: from 10.231.9.2 iif r0 prohibit")
            && ev.contains("ICMP sent: administratively prohibited"),
        "{ev}"
    );
    assert!(
        hint(&report).starts_with(&format!("ip netns exec {} ip rule del pref 90", t.r.name)),
        "{}",
        hint(&report)
    );
}

#[test]
fn a_rule_to_a_table_that_routes_is_no_drop() {
    // Control: the same rule, its table routing B: forwarded, nothing reported.
    let t = topology();
    t.r.sh("ip rule add from 10.231.9.0/24 lookup 100 pref 100; ip route add 10.231.2.0/24 dev r1 table 100");
    let before = Nstat::read(&t.b);
    let (report, arrived) = observe(&t, 9603, 2);
    report.assert_consistent();
    assert!(report.drops().iter().all(|d| d["dport"] != 9603), "{:#?}", report.drops());
    assert_eq!(arrived, 2);
    // B has no listener: the datagrams arrived there.
    assert_eq!(Nstat::delta(&t.b, &before, "UdpNoPorts"), 2);
}
