//! MTU: a packet with DF set larger than the egress MTU.
use dropscope_tests::{
    topology::{A4, A6, B4, B6},
    traffic::Udp,
    Nstat, Observer, Topology,
};

use crate::{evidence, Expect};

#[test]
fn mtu4_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip route flush cache");
    let before = Nstat::read(&t.r);
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9200).payload(1400).dont_fragment().count(3).send(&t.a);
    let report = obs.stop();
    let e = Expect {
        cause: "mtu_exceeded",
        ifname: "r0",
        family: "ipv4",
        proto: "udp",
        src: A4,
        dst: B4,
        dport: Some(9200),
        netns: t.r.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(counted, Nstat::delta(&t.r, &before, "IpFragFails"));
    assert_eq!(counted, 3);
    let r = report.of("mtu_exceeded")[0];
    assert_eq!(r["out_ifname"], "r1");
    assert_eq!(r["out_mtu"], 1280);
    assert_eq!(r["len"], 1428);
    let ev = evidence(&report, "mtu_exceeded");
    assert!(ev.contains("1428-byte packet does not fit MTU 1280 of r1") && ev.contains("fragmentation needed"), "{ev}");
}

#[test]
fn mtu6_is_mtu_exceeded() {
    let t = Topology::new();
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip -6 route flush cache");
    let before = Nstat::read(&t.r);
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B6, 9201).payload(1400).dont_fragment().count(2).send(&t.a);
    let report = obs.stop();
    // IPv6: skb->dev is already the egress device when ip6_forward drops it.
    let e = Expect {
        cause: "mtu_exceeded",
        ifname: "r1",
        family: "ipv6",
        proto: "udp",
        src: A6,
        dst: B6,
        dport: Some(9201),
        netns: t.r.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(counted, Nstat::delta(&t.r, &before, "Ip6InTooBigErrors"));
    assert_eq!(counted, 2);
    assert!(evidence(&report, "mtu_exceeded").contains("MTU 1280 of r1"));
}
