//! Nothing listening on the destination port (TCP and UDP).
use dropscope_tests::{
    topology::{A4, B4},
    traffic::{tcp_connect, Udp},
    Nstat, Observer, Topology,
};

use crate::{evidence, Expect};

#[test]
fn nolisten_tcp_is_no_listener() {
    let t = Topology::new();
    let before = Nstat::read(&t.b);
    let obs = Observer::start(&["--netns", &t.b.name]);
    for _ in 0..3 {
        let err = tcp_connect(&t.a, B4, 8081).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    let report = obs.stop();
    let e = Expect {
        cause: "no_listener",
        ifname: "b0",
        family: "ipv4",
        proto: "tcp",
        src: A4,
        dst: B4,
        dport: Some(8081),
        netns: t.b.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(counted, Nstat::delta(&t.b, &before, "TcpOutRsts"));
    assert_eq!(counted, 3);
    assert_eq!(report.of("no_listener")[0]["location"], "tcp_v4_rcv");
    assert!(evidence(&report, "no_listener").contains("tcp port 8081"));
}

#[test]
fn nolisten_udp_is_no_listener() {
    let t = Topology::new();
    let before = Nstat::read(&t.b);
    let obs = Observer::start(&["--netns", &t.b.name]);
    Udp::to(B4, 5354).count(3).send(&t.a);
    let report = obs.stop();
    let e = Expect {
        cause: "no_listener",
        ifname: "b0",
        family: "ipv4",
        proto: "udp",
        src: A4,
        dst: B4,
        dport: Some(5354),
        netns: t.b.inode(),
    };
    let counted = e.check(&report);
    assert_eq!(counted, Nstat::delta(&t.b, &before, "UdpNoPorts"));
    assert_eq!(counted, 3);
    assert!(evidence(&report, "no_listener").contains("udp port 5354"));
}
