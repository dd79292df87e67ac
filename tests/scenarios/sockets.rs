//! Nothing listening on the destination port (TCP and UDP).
use dropscope_tests::{
    topology::B4,
    traffic::{tcp_connect, Udp},
    Topology,
};

use crate::{evidence, observe, Expect};

#[test]
// vm-test: core
fn nolisten_tcp_is_no_listener() {
    let t = Topology::new();
    let (report, resets) = observe(&t.b, &[], (&t.b, "TcpOutRsts"), || {
        for _ in 0..3 {
            let err = tcp_connect(&t.a, B4, 8081).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    });
    let e = Expect {
        ifname: "b0",
        proto: "tcp",
        netns: t.b.inode(),
        ..Expect::routed(&t, "no_listener", 8081)
    };
    assert_eq!((e.check(&report), resets), (3, 3));
    assert_eq!(report.of("no_listener")[0]["location"], "tcp_v4_rcv");
    assert!(evidence(&report, "no_listener").contains("tcp port 8081"));
    // The reset is paired with the drop (tcp:tcp_send_reset), where the kernel traces resets
    // that answer closed ports (the attach record says when it does not).
    let rst_probe = report.attach()["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["probe"] == "tcp_send_reset")
        .cloned()
        .unwrap();
    if rst_probe["note"].is_null() {
        assert_eq!(report.of("no_listener")[0]["tcp_reset_sent"], true);
        assert!(evidence(&report, "no_listener").contains("answered 10.231.1.2 with a TCP reset"));
    } else {
        assert!(
            rst_probe["note"]
                .as_str()
                .unwrap()
                .contains("existing sockets only"),
            "{rst_probe}"
        );
        assert!(report.of("no_listener")[0]["tcp_reset_sent"].is_null());
    }
}

#[test]
// vm-test: core
fn nolisten_udp_is_no_listener() {
    let t = Topology::new();
    let (report, noports) = observe(&t.b, &[], (&t.b, "UdpNoPorts"), || {
        Udp::to(B4, 5354).count(3).send(&t.a);
    });
    let e = Expect {
        ifname: "b0",
        netns: t.b.inode(),
        ..Expect::routed(&t, "no_listener", 5354)
    };
    assert_eq!((e.check(&report), noports), (3, 3));
    assert!(evidence(&report, "no_listener").contains("udp port 5354"));
    assert!(evidence(&report, "no_listener").contains("ICMP sent: port unreachable"));
}
