//! The event model: typed drops and replies, as the decoder (`decode.rs`) makes them from
//! ring-buffer records. No kernel numbers past here: reasons and locations are names,
//! addresses are `IpAddr`s, unknown values are `None`.
mod decode;

pub use decode::{parse, Decoder};
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use agent_ebpf::AggKey;

use crate::pods::PodRef;

/// IP version of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// The packet's addresses and L4 identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub family: Family,
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP ports, when parsed.
    pub ports: Option<(u16, u16)>,
    /// ICMP/ICMPv6 type and code of the packet itself, when parsed.
    pub icmp: Option<(u8, u8)>,
}

impl Flow {
    /// "tcp", "udp", "icmp", "icmpv6" or the protocol number.
    pub fn proto_name(&self) -> String {
        proto_name(self.proto).map_or_else(|| self.proto.to_string(), str::to_string)
    }
}

/// The name of an IP protocol number dropscope knows.
pub fn proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        47 => "gre",
        50 => "esp",
        132 => "sctp",
        _ => return None,
    })
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ports, self.family) {
            (Some((sp, dp)), Family::Ipv4) => write!(f, "{}:{sp} -> {}:{dp}", self.src, self.dst)?,
            (Some((sp, dp)), Family::Ipv6) => {
                write!(f, "[{}]:{sp} -> [{}]:{dp}", self.src, self.dst)?
            }
            (None, _) => write!(f, "{} -> {}", self.src, self.dst)?,
        }
        write!(f, " {}", self.proto_name())?;
        if let Some((t, c)) = self.icmp {
            write!(f, " {t}/{c}")?;
        }
        Ok(())
    }
}

/// A network device as seen at drop time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device {
    pub ifindex: u32,
    name: [u8; 16],
    pub mtu: u32,
}

impl Device {
    pub fn new(ifindex: u32, name: [u8; 16], mtu: u32) -> Self {
        Device { ifindex, name, mtu }
    }

    pub fn name(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        std::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Forwarding and rp_filter values the kernel itself used (None when unreadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sysctls {
    pub dev_forwarding: Option<u8>,
    pub all_forwarding: Option<u8>,
    pub dev_rp_filter: Option<u8>,
    pub all_rp_filter: Option<u8>,
    pub dev6_forwarding: Option<u8>,
    pub all6_forwarding: Option<u8>,
}

impl Sysctls {
    /// rp_filter as the kernel applies it: the maximum of `all` and the device.
    pub fn effective_rp_filter(&self) -> Option<u8> {
        match (self.dev_rp_filter, self.all_rp_filter) {
            (Some(d), Some(a)) => Some(d.max(a)),
            (d, a) => d.or(a),
        }
    }
}

/// A packet the kernel dropped.
#[derive(Debug, Clone)]
pub struct DropEvent {
    pub ts_ns: u64,
    pub skb: u64,
    pub reason: Arc<str>,
    pub location: Arc<str>,
    pub netns: u32,
    /// `skb->dev`: ingress on receive paths, egress on transmit paths.
    pub dev: Option<Device>,
    /// The device the route sends the packet to.
    pub out: Option<Device>,
    pub len: u32,
    /// `skb->mark`; `None` where that memory holds something else (see [`Decoder`]).
    pub mark: Option<u32>,
    pub ttl: Option<u8>,
    pub flow: Option<Flow>,
    /// Byte offset of an IP fragment in its packet (`Some(0)`: the first fragment).
    pub fragment: Option<u16>,
    /// `skb->skb_iif` when it differs from `dev`: the packet arrived there and is now on
    /// its way out (forwarded or bridged). Named by the pipeline (`arrived_on`).
    pub iif: Option<u32>,
    /// The device `iif` names, in the drop's namespace.
    pub arrived_on: Option<Device>,
    pub sysctls: Sysctls,
    pub stack_id: Option<u32>,
    /// The key the kernel counted this drop under.
    pub agg: AggKey,
    /// What the context probes saw (empty without them).
    pub context: Context,
    /// The pod the drop is attributed to (set by the pipeline; `None`: no pod, or unknown).
    pub pod: Option<Arc<PodRef>>,
    /// The packet's first bytes, when the kernel sent them (`--pcap`, the flight recorder).
    /// The pipeline takes them out before it keeps the drop.
    pub packet: Option<Arc<crate::capture::Packet>>,
}

impl DropEvent {
    /// The device the packet came in on: for a forwarded packet the one it arrived on, even
    /// when it died on the way out (where `skb->dev` is already the egress device).
    pub fn ingress(&self) -> Option<Device> {
        self.context.forwarded_from.or(self.arrived_on).or(self.dev)
    }

    /// Whether the packet was generated on this host and never received: no arrival
    /// device, and no device or the route's own device.
    pub fn is_local_out(&self) -> bool {
        self.iif.is_none() && (self.dev.is_none() || self.dev == self.out)
    }
}

/// What the context probes (nf_hook_slow, ip_forward, ip_error, ruleset verdicts) recorded
/// about a dropped packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The packet was being forwarded; the device it arrived on.
    pub forwarded_from: Option<Device>,
    /// The packet died inside a netfilter hook.
    pub netfilter: Option<NfHook>,
    /// The ruleset that returned DROP.
    pub ruleset: Option<Ruleset>,
    /// The route's error when `ip_error` handled the packet (`dst->error`, a positive errno:
    /// 113 = EHOSTUNREACH, also what forwarding disabled sets).
    pub route_error: Option<i32>,
}

/// A netfilter hook as `nf_hook_slow` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NfHook {
    /// prerouting, input, forward, output, postrouting, ingress, bridge, arp.
    pub hook: Option<&'static str>,
    /// ipv4, ipv6, bridge, arp, netdev, inet.
    pub family: Option<&'static str>,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
}

/// The rule set whose verdict dropped the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// "nftables" (also iptables-nft) or "iptables-legacy".
    pub engine: &'static str,
    pub table: String,
    /// Base chain (nftables only: x_tables keeps no chain names in the kernel).
    pub chain: Option<String>,
}

#[cfg(test)]
impl DropEvent {
    /// A UDP packet 10.0.0.1:40000 -> 10.9.0.1:80 dropped on `r0` (ifindex 3, netns 42).
    pub fn example(reason: &str, location: &str) -> DropEvent {
        let mut name = [0u8; 16];
        name[..2].copy_from_slice(b"r0");
        DropEvent {
            ts_ns: 0,
            skb: 0,
            reason: Arc::from(reason),
            location: Arc::from(location),
            netns: 42,
            dev: Some(Device::new(3, name, 1500)),
            out: None,
            len: 60,
            mark: None,
            ttl: Some(64),
            flow: Some(Flow {
                family: Family::Ipv4,
                proto: 17,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.9.0.1".parse().unwrap(),
                ports: Some((40000, 80)),
                icmp: None,
            }),
            fragment: None,
            iif: None,
            arrived_on: None,
            sysctls: Sysctls::default(),
            stack_id: None,
            agg: Default::default(),
            context: Default::default(),
            pod: None,
            packet: None,
        }
    }
}

/// How the kernel answered a packet it is about to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// An ICMP error (type, code).
    Icmp(u8, u8),
    /// An ICMPv6 error (type, code).
    Icmp6(u8, u8),
    /// A TCP reset.
    TcpReset,
}

/// The kernel answered a packet (an ICMP error or a TCP reset).
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub ts_ns: u64,
    pub skb: u64,
    pub answer: Answer,
    /// The packet answered (pairs the answer with that packet's drop).
    pub flow: Option<Flow>,
}

/// A decoded ring-buffer record.
#[derive(Debug, Clone)]
pub enum Record {
    Drop(DropEvent),
    Reply(Reply),
}

