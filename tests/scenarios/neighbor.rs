//! Neighbour resolution failure: the next hop never answers ARP.
use dropscope_tests::{traffic::Udp, wait_for, Nstat, Topology};

use crate::{evidence, observe, Expect};

#[test]
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
    let e = Expect { ifname: "r1", dst: "10.231.2.99", ..Expect::routed(&t, "neighbor_failed", 9300) };
    assert_eq!((e.check(&report), unreachables), (3, 3));
    assert!(evidence(&report, "neighbor_failed").contains("host unreachable"));
}
