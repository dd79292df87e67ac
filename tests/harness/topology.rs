//! The reference topology: host A, router R, host B, two veth links.
//!
//! ```text
//! A a0 10.231.1.2 fd00:231:1::2 -- r0 10.231.1.1 [R] r1 10.231.2.1 -- b0 10.231.2.2 fd00:231:2::2 B
//! ```
use crate::netns::Netns;

pub struct Topology {
    pub a: Netns,
    pub r: Netns,
    pub b: Netns,
}

pub const A4: &str = "10.231.1.2";
pub const B4: &str = "10.231.2.2";
pub const A6: &str = "fd00:231:1::2";
pub const B6: &str = "fd00:231:2::2";

/// Lifts the host-wide ICMP limit where it is per namespace (6.0+). Before, it is a global
/// sysctl that namespaces do not have; its default (1000/s, burst 50) is far above what a test
/// sends, and a test must not change the host's.
const ICMP_GLOBAL_LIMIT: &str = "if [ -e /proc/sys/net/ipv4/icmp_msgs_per_sec ]; then \
     sysctl -qw net.ipv4.icmp_msgs_per_sec=100000; fi";

impl Topology {
    /// Builds the topology with forwarding on, deterministic ICMP, and warm ARP/ND caches.
    pub fn new() -> Self {
        let (a, r, b) = (Netns::new("a"), Netns::new("r"), Netns::new("b"));
        r.sh(&format!(
            "ip link add r0 type veth peer name a0 netns {a}; ip link add r1 type veth peer name b0 netns {b}",
            a = a.name,
            b = b.name
        ));
        r.sh(
            "ip addr add 10.231.1.1/24 dev r0; ip addr add 10.231.2.1/24 dev r1; \
             ip addr add fd00:231:1::1/64 dev r0 nodad; ip addr add fd00:231:2::1/64 dev r1 nodad; \
             ip link set r0 up; ip link set r1 up; \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
               net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0",
        );
        r.sh(ICMP_GLOBAL_LIMIT);
        a.sh(
            "ip addr add 10.231.1.2/24 dev a0; ip addr add fd00:231:1::2/64 dev a0 nodad; ip link set a0 up; \
             ip route add default via 10.231.1.1; ip -6 route add default via fd00:231:1::1",
        );
        b.sh(
            "ip addr add 10.231.2.2/24 dev b0; ip addr add fd00:231:2::2/64 dev b0 nodad; ip link set b0 up; \
             ip route add default via 10.231.2.1; ip -6 route add default via fd00:231:2::1; \
             sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0",
        );
        b.sh(ICMP_GLOBAL_LIMIT);
        // Warm neighbour caches so the measured packets are the only ones in flight.
        a.sh("ping -c1 -W2 10.231.2.2 >/dev/null && ping -6 -c1 -W2 fd00:231:2::2 >/dev/null");
        Topology { a, r, b }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
