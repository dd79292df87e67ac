//! MTU: a packet with DF set larger than the egress MTU.
use dropscope_tests::{
    topology::{A6, B4, B6},
    traffic::Udp,
    Topology,
};

use crate::{evidence, observe, Expect};

#[test]
fn mtu4_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip route flush cache");
    let (report, kernel) = observe(&t.r, &[], (&t.r, "IpFragFails"), || {
        Udp::to(B4, 9200).payload(1400).dont_fragment().count(3).send(&t.a);
    });
    assert_eq!((Expect::routed(&t, "mtu_exceeded", 9200).check(&report), kernel), (3, 3));
    let r = report.of("mtu_exceeded")[0];
    assert_eq!((&r["out_ifname"], &r["out_mtu"], &r["len"]), (&"r1".into(), &1280.into(), &1428.into()));
    let ev = evidence(&report, "mtu_exceeded");
    assert!(ev.contains("1428-byte packet does not fit MTU 1280 of r1") && ev.contains("fragmentation needed"), "{ev}");
}

#[test]
fn mtu6_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip -6 route flush cache");
    let (report, kernel) = observe(&t.r, &[], (&t.r, "Ip6InTooBigErrors"), || {
        Udp::to(B6, 9201).payload(1400).dont_fragment().count(2).send(&t.a);
    });
    // IPv6: skb->dev is already the egress device when ip6_forward drops it.
    let e = Expect { ifname: "r1", family: "ipv6", src: A6, dst: B6, ..Expect::routed(&t, "mtu_exceeded", 9201) };
    assert_eq!((e.check(&report), kernel), (2, 2));
    assert!(evidence(&report, "mtu_exceeded").contains("MTU 1280 of r1"));
}
