//! Kernels with and without drop reasons (they arrived in 5.17). Each test states the answer
//! the running kernel allows, told by `kernel_has_drop_reasons` (its BTF, read independently of
//! dropscope): with reasons the cause from the reason; without them the cause only where the
//! location and the event's own values prove it, else `unclassified` with the location, never
//! a confident wrong cause. `cargo xtask vm-test --core --kernel 5.10` runs these there.
use dropscope_tests::{kernel_has_drop_reasons, topology::B4, traffic::Udp, Observer, Topology};

use crate::{evidence, observe, Expect};

#[test]
// vm-test: core
// vm-test: no-reasons
fn attach_record_says_whether_the_kernel_gives_drop_reasons() {
    let t = Topology::new();
    let report = Observer::start(&["--netns", &t.r.name]).stop();
    let attach = report.attach();
    let limits: Vec<&str> = attach["limits"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if kernel_has_drop_reasons() {
        assert!(attach["drop_reasons"].as_u64().unwrap() > 10, "{attach}");
        assert!(limits.is_empty(), "{attach}");
    } else {
        assert_eq!(attach["drop_reasons"], 0, "{attach}");
        assert!(
            limits
                .iter()
                .any(|l| l.contains("no drop reasons")
                    && l.contains("enum skb_drop_reason is missing")),
            "the attach record must say what this kernel lacks: {attach}"
        );
    }
}

#[test]
// vm-test: no-reasons
fn forwarding_off_is_named_with_or_without_drop_reasons() {
    let t = Topology::new();
    t.r.sh("sysctl -qw net.ipv4.ip_forward=0");
    // Only this flow: on a kernel without reasons, housekeeping drops the reason would call
    // benign are unclassified, and are not what this test is about.
    let (report, kernel) = observe(
        &t.r,
        &["--proto", "udp", "--port", "9100"],
        (&t.r, "IpInAddrErrors"),
        || {
            Udp::to(B4, 9100).count(3).send(&t.a);
        },
    );
    let counted = Expect::routed(&t, "forwarding_disabled", 9100).check(&report);
    assert_eq!((counted, kernel), (3, 3));
    let first = report.of("forwarding_disabled")[0];
    assert_eq!(first["location"], "ip_error");
    let ev = evidence(&report, "forwarding_disabled");
    assert!(ev.contains("net.ipv4.conf.r0.forwarding=0"), "{ev}");
    if kernel_has_drop_reasons() {
        assert_eq!(first["reason"], "IP_INADDRERRORS");
    } else {
        assert_eq!(first["reason"], "UNKNOWN");
        assert!(ev.contains("this kernel gives no drop reasons"), "{ev}");
    }
}

#[test]
// vm-test: no-reasons
fn no_route_needs_the_reason_else_it_is_unclassified_at_ip_error() {
    let t = Topology::new();
    let (report, kernel) = observe(
        &t.r,
        &["--proto", "udp", "--port", "9101"],
        (&t.r, "IpExtInNoRoutes"),
        || {
            Udp::to("10.231.77.7", 9101).count(2).send(&t.a);
        },
    );
    // Forwarding is on, so ip_error means some route refused the packet: without the reason
    // dropscope must not guess which.
    let cause = if kernel_has_drop_reasons() {
        "no_route"
    } else {
        "unclassified"
    };
    let e = Expect {
        dst: "10.231.77.7",
        ..Expect::routed(&t, cause, 9101)
    };
    assert_eq!((e.check(&report), kernel), (2, 2));
    let first = report.of(cause)[0];
    assert_eq!(first["location"], "ip_error");
    if !kernel_has_drop_reasons() {
        assert_eq!(first["reason"], "UNKNOWN");
        let ev = evidence(&report, cause);
        assert!(ev.contains("kernel reason UNKNOWN at ip_error"), "{ev}");
    }
}

#[test]
// vm-test: no-reasons
fn closed_udp_port_needs_the_reason_else_it_is_unclassified_with_its_location() {
    let t = Topology::new();
    let (report, noports) = observe(
        &t.b,
        &["--proto", "udp", "--port", "9102"],
        (&t.b, "UdpNoPorts"),
        || {
            Udp::to(B4, 9102).count(3).send(&t.a);
        },
    );
    let cause = if kernel_has_drop_reasons() {
        "no_listener"
    } else {
        "unclassified"
    };
    let e = Expect {
        ifname: "b0",
        netns: t.b.inode(),
        ..Expect::routed(&t, cause, 9102)
    };
    assert_eq!((e.check(&report), noports), (3, 3));
    if !kernel_has_drop_reasons() {
        let first = report.of(cause)[0];
        assert_eq!(first["reason"], "UNKNOWN");
        // Where 5.10 frees it: __udp4_lib_rcv, or udp_rcv when the compiler inlined it there.
        let location = first["location"].as_str().unwrap();
        assert!(
            ["__udp4_lib_rcv", "udp_rcv"].contains(&location),
            "{first:#}"
        );
        let ev = evidence(&report, cause);
        assert!(ev.contains(&format!("UNKNOWN at {location}")), "{ev}");
    }
}
