//! MTU: a packet with DF set larger than the egress MTU.
use dropscope_tests::{
    topology::{A6, B4, B6},
    traffic::Udp,
    Topology,
};

use crate::{evidence, observe, Expect};

#[test]
// vm-test: core
fn mtu4_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip route flush cache");
    let (report, kernel) = observe(&t.r, &[], (&t.r, "IpFragFails"), || {
        Udp::to(B4, 9200)
            .payload(1400)
            .dont_fragment()
            .count(3)
            .send(&t.a);
    });
    assert_eq!(
        (
            Expect::routed(&t, "mtu_exceeded", 9200).check(&report),
            kernel
        ),
        (3, 3)
    );
    let r = report.of("mtu_exceeded")[0];
    assert_eq!(
        (&r["out_ifname"], &r["out_mtu"], &r["len"]),
        (&"r1".into(), &1280.into(), &1428.into())
    );
    let ev = evidence(&report, "mtu_exceeded");
    assert!(
        ev.contains("1428-byte packet does not fit MTU 1280 of r1")
            && ev.contains("fragmentation needed"),
        "{ev}"
    );
}

#[test]
// vm-test: core
fn mtu6_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip -6 route flush cache");
    let (report, kernel) = observe(&t.r, &[], (&t.r, "Ip6InTooBigErrors"), || {
        Udp::to(B6, 9201)
            .payload(1400)
            .dont_fragment()
            .count(2)
            .send(&t.a);
    });
    // ip6_forward moves the packet to its egress device before dropping it; dropscope still
    // names the device it arrived on, as for IPv4, and the egress as out_ifname.
    let e = Expect {
        ifname: "r0",
        family: "ipv6",
        src: A6,
        dst: B6,
        ..Expect::routed(&t, "mtu_exceeded", 9201)
    };
    assert_eq!((e.check(&report), kernel), (2, 2));
    assert!(evidence(&report, "mtu_exceeded").contains("MTU 1280 of r1"));
    assert_eq!(report.of("mtu_exceeded")[0]["out_ifname"], "r1");
}

#[test]
fn smaller_veth_peer_is_veth_mtu_mismatch() {
    let t = Topology::new();
    t.r.sh("ip link set r0 mtu 1280");
    let before =
        t.r.sh("cat /sys/class/net/r0/statistics/rx_dropped")
            .trim()
            .parse::<u64>()
            .unwrap();
    let (report, _) = observe(&t.a, &[], (&t.a, "IpOutRequests"), || {
        Udp::to(B4, 9202).payload(1400).count(3).send(&t.a);
    });
    let dropped =
        t.r.sh("cat /sys/class/net/r0/statistics/rx_dropped")
            .trim()
            .parse::<u64>()
            .unwrap()
            - before;
    // The sender's veth end frees the packet: ifname a0, namespace A.
    let e = Expect {
        ifname: "a0",
        netns: t.a.inode(),
        ..Expect::routed(&t, "veth_mtu_mismatch", 9202)
    };
    assert_eq!((e.check(&report), dropped), (3, 3));
    // On the transmit path skb->len includes the 14-byte Ethernet header: 1400 + 28 + 14.
    let ev = evidence(&report, "veth_mtu_mismatch");
    assert!(
        ev.contains("1442-byte packet sent on a0 (MTU 1500)"),
        "{ev}"
    );
}

#[test]
fn dropped_frag_needed_is_pmtu_blackhole() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280; iptables-nft -A OUTPUT -p icmp --icmp-type fragmentation-needed -j DROP");
    t.a.sh("ip route flush cache");
    let (report, too_big) = observe(&t.r, &[], (&t.r, "IpFragFails"), || {
        Udp::to(B4, 9203)
            .payload(1400)
            .dont_fragment()
            .count(3)
            .send(&t.a);
    });
    report.assert_consistent();
    let icmp_dropped =
        dropscope_tests::iptables_rule_packets(&t.r, "iptables-nft", "--icmp-type 3/4 -j DROP");
    assert_eq!((too_big, icmp_dropped), (3, 3));
    // Each big packet is two drops: the packet itself and the ICMP that should have reported it.
    assert_eq!(report.causes(), vec![("pmtu_blackhole".to_string(), 6)]);
    let recs = report.of("pmtu_blackhole");
    let originals: u64 = recs
        .iter()
        .filter(|r| r["reason"] == "PKT_TOO_BIG")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let icmps: Vec<_> = recs
        .iter()
        .filter(|r| r["reason"] == "NETFILTER_DROP")
        .collect();
    assert_eq!(originals, too_big);
    assert_eq!(
        icmps
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum::<u64>(),
        icmp_dropped
    );
    assert_eq!(icmps[0]["hook"], "output");
    assert_eq!(
        (
            &icmps[0]["icmp_type"],
            &icmps[0]["icmp_code"],
            &icmps[0]["dst"]
        ),
        (&3.into(), &4.into(), &"10.231.1.2".into())
    );
    assert!(icmps[0]["rule"]
        .as_str()
        .unwrap()
        .contains("--icmp-type 3/4 -j DROP"));
}
