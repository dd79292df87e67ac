//! Causes with one clear kernel reason: queues, sockets, tunnels, IPsec, martians, malformed packets.
use dropscope_tests::{tc_stat, topology::B4, traffic::Udp, wait_for, Observer, Topology};

use crate::{evidence, observe, Expect};

#[test]
// vm-test: core
fn qdisc_overflow_is_qdisc_drop() {
    let t = Topology::new();
    t.r.sh("tc qdisc add dev r1 root tbf rate 1mbit burst 1600 limit 3000");
    // Context probes attached from the start, so the first drop names the ingress device.
    let obs = Observer::start(&["--netns", &t.r.name, "--context-arm", "always"]);
    Udp::to(B4, 9600).payload(1000).count(30).send(&t.a);
    let report = obs.stop();
    let kernel = tc_stat(&t.r.sh("tc -s qdisc show dev r1"), "dropped ");
    assert!(kernel > 0, "the shaper dropped nothing");
    // Dropped on the egress device r1 after routing.
    let e = Expect {
        ifname: "r1",
        ..Expect::routed(&t, "qdisc_drop", 9600)
    };
    assert_eq!(e.check(&report), kernel);
    assert!(evidence(&report, "qdisc_drop").contains("on r1"));
    crate::context::check_forwarded(&report, report.of("qdisc_drop")[0], "r0", "r1");
}

#[test]
fn full_receive_buffer_is_socket_buffer_full() {
    let t = Topology::new();
    // A receiver that never reads, with the smallest buffer the kernel allows.
    let sock = dropscope_tests::traffic::udp_listener(&t.b, "10.231.2.2:9602");
    sock.set_nonblocking(true).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let small: libc::c_int = 1;
    // SAFETY: valid socket fd and int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            4,
        )
    };
    let (report, kernel) = observe(&t.b, &[], (&t.b, "UdpRcvbufErrors"), || {
        Udp::to(B4, 9602).payload(1000).count(40).send(&t.a);
        wait_for("receive-buffer errors", 5.0, || {
            dropscope_tests::Nstat::read(&t.b).get("UdpRcvbufErrors") > 0
        });
    });
    let e = Expect {
        ifname: "b0",
        netns: t.b.inode(),
        ..Expect::routed(&t, "socket_buffer_full", 9602)
    };
    let counted = e.check(&report);
    assert!(counted > 0);
    assert_eq!(counted, kernel);
    drop(sock);
}

#[test]
fn unknown_vni_is_overlay_mismatch() {
    let t = Topology::new();
    // No IPv6 on the overlay: its MLD reports would have nowhere to go (NO_TX_TARGET).
    t.b.sh(
        "ip link add vx42 type vxlan id 42 dstport 4789 local 10.231.2.2 nolearning; \
         sysctl -qw net.ipv6.conf.vx42.disable_ipv6=1; ip link set vx42 up",
    );
    // VXLAN header for VNI 43: flags 0x08, VNI in bytes 4..7, then an inner Ethernet frame.
    static FRAME: [u8; 8 + 14 + 20] = {
        let mut f = [0u8; 42];
        f[0] = 0x08;
        f[6] = 43;
        f[20] = 0x08; // inner ethertype IPv4
        f
    };
    let obs = Observer::start(&["--netns", &t.b.name]);
    Udp::to(B4, 4789).data(&FRAME).count(3).send(&t.a);
    let report = obs.stop();
    let e = Expect {
        ifname: "b0",
        netns: t.b.inode(),
        ..Expect::routed(&t, "overlay_mismatch", 4789)
    };
    assert_eq!(e.check(&report), 3);
    assert!(evidence(&report, "overlay_mismatch").contains("VXLAN_VNI_NOT_FOUND"));
}

#[test]
fn blocking_ipsec_policy_is_xfrm_policy() {
    let t = Topology::new();
    t.r.sh("ip xfrm policy add src 10.231.1.0/24 dst 10.231.2.0/24 dir fwd action block");
    // A forward policy with action block counts as XfrmInPolBlock.
    let stat = |ns: &dropscope_tests::Netns| -> u64 {
        let text = ns.sh("cat /proc/net/xfrm_stat");
        let line = text
            .lines()
            .find(|l| l.starts_with("XfrmInPolBlock"))
            .expect("XfrmInPolBlock");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = stat(&t.r);
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9603).count(3).send(&t.a);
    let report = obs.stop();
    assert_eq!(
        Expect::routed(&t, "xfrm_policy", 9603).check(&report),
        stat(&t.r) - before
    );
    assert_eq!(report.count("xfrm_policy"), 3);
}

#[test]
fn own_address_as_source_is_martian_source() {
    let t = Topology::new();
    // A spoofs R's own address on the far side as its source.
    t.a.sh("ip addr add 10.231.2.1/32 dev a0");
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9604).from("10.231.2.1").count(2).send(&t.a);
    let report = obs.stop();
    let e = Expect {
        src: "10.231.2.1",
        ..Expect::routed(&t, "martian_source", 9604)
    };
    assert_eq!(e.check(&report), 2);
    assert_eq!(report.of("martian_source")[0]["reason"], "IP_LOCAL_SOURCE");
}

#[test]
fn corrupted_header_is_malformed_packet() {
    let t = Topology::new();
    let mac = t.r.mac("r0");
    let (report, kernel) = observe(&t.r, &[], (&t.r, "IpExtInCsumErrors"), || {
        dropscope_tests::traffic::corrupt_ipv4_frames(&t.a, "a0", mac, "10.231.1.2", B4, 3);
    });
    let e = Expect {
        dport: None,
        ..Expect::routed(&t, "malformed_packet", 0)
    };
    assert_eq!((e.check(&report), kernel), (3, 3));
    assert_eq!(report.of("malformed_packet")[0]["reason"], "IP_CSUM");
}
