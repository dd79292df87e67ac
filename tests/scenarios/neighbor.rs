//! Neighbour resolution failure: the next hop never answers ARP.
use dropscope_tests::{topology::A4, traffic::Udp, wait_for, Nstat, Observer, Topology};

use crate::{evidence, Expect};

#[test]
fn neigh_failed_is_neighbor_failed() {
    let t = Topology::new();
    let before_a = Nstat::read(&t.a);
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to("10.231.2.99", 9300).count(3).send(&t.a);
    // ARP gives up after its probes (about 3 s); each queued packet is then dropped and
    // answered with ICMP host unreachable. Wait for those answers, not for a fixed time.
    wait_for("3 ICMP host-unreachable at the sender", 15.0, || {
        Nstat::delta(&t.a, &before_a, "IcmpInDestUnreachs") >= 3
    });
    let report = obs.stop();
    let e = Expect {
        cause: "neighbor_failed",
        ifname: "r1",
        family: "ipv4",
        proto: "udp",
        src: A4,
        dst: "10.231.2.99",
        dport: Some(9300),
        netns: t.r.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(counted, Nstat::delta(&t.a, &before_a, "IcmpInDestUnreachs"));
    assert_eq!(counted, 3);
    assert!(evidence(&report, "neighbor_failed").contains("host unreachable"));
}
