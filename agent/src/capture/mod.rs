//! The dropped packets themselves: `--pcap FILE` and `serve`'s flight recorder.
//!
//! The drop probe copies the first `--snaplen` bytes of each packet whose event it delivers
//! (never of drops it only counts) into the same ring record as the event. Userspace writes
//! them as pcapng: one interface block per device, network namespace and kind of link-layer
//! header, a comment on each packet with what dropscope knows about the drop, and the drop
//! time as the packet's timestamp.
pub mod file;
pub mod pcapng;
pub mod recorder;

use std::{collections::HashMap, sync::Arc};

use agent_ebpf::{Event, PacketHead, ABSENT, SNAPLEN_MAX};

use crate::{
    causes::Verdict,
    events::{Answer, DropEvent},
    kernel::btf::KernelBtf,
    output::{Clock, Summary},
};
use pcapng::Direction;

/// Default `--snaplen`.
pub const DEFAULT_SNAPLEN: u32 = 128;
/// Smallest `--snaplen`: an Ethernet header plus an IPv6 header and the ports.
pub const MIN_SNAPLEN: u32 = 64;
pub use agent_ebpf::SNAPLEN_MAX as MAX_SNAPLEN;

const UNSET: u16 = u16::MAX;
const ETH_HLEN: usize = 14;

/// The kernel side's settings for `snaplen` bytes per delivered drop, offsets from BTF.
pub fn kernel_config(kernel: &KernelBtf, snaplen: u32) -> agent_ebpf::Capture {
    let off = |p| kernel.offset_of("sk_buff", p).unwrap_or(ABSENT);
    agent_ebpf::Capture {
        snaplen: snaplen.min(SNAPLEN_MAX),
        skb_data: off("data"),
        skb_data_len: off("data_len"),
        skb_mac_header: off("mac_header"),
    }
}

/// The bytes the kernel copied of one dropped packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub head: PacketHead,
    /// `skb->protocol` (host order), from the event.
    pub l3_proto: u16,
    pub bytes: Vec<u8>,
}

impl Packet {
    /// The packet that follows the event in a ring record, if the kernel sent one.
    pub fn after_event(record: &[u8]) -> Option<Packet> {
        let ev_len = std::mem::size_of::<Event>();
        let head_len = std::mem::size_of::<PacketHead>();
        let tail = record.get(ev_len..)?;
        if tail.len() < head_len {
            return None;
        }
        // SAFETY: length checked; PacketHead is plain old data valid for any bit pattern.
        let head = unsafe { std::ptr::read_unaligned(tail.as_ptr().cast::<PacketHead>()) };
        let bytes = tail
            .get(head_len..head_len + head.caplen as usize)?
            .to_vec();
        let ev = crate::events::parse(record)?;
        Some(Packet {
            head,
            l3_proto: ev.l3_proto,
            bytes,
        })
    }

    /// The packet as an Ethernet frame, and whether its link-layer header is the one the
    /// kernel had (otherwise one is made up: zero addresses, the packet's EtherType).
    /// `len` is `skb->len`, from `data` on. Returns (frame, original length, real header).
    pub fn frame(&self, len: u32) -> (Vec<u8>, u32, bool) {
        let h = &self.head;
        let packet_end = u64::from(h.data) + u64::from(len);
        let orig = |from: u16| packet_end.saturating_sub(u64::from(from)) as u32;
        if self.real_ethernet() {
            return (self.bytes.clone(), orig(h.start), true);
        }
        // From the network header on (skip what came before it, if anything did).
        let (skip, from) = if h.network != UNSET && h.network >= h.start {
            ((h.network - h.start) as usize, h.network)
        } else {
            (0, h.start)
        };
        let body = self.bytes.get(skip..).unwrap_or_default();
        let mut frame = Vec::with_capacity(ETH_HLEN + body.len());
        frame.extend_from_slice(&[0; 12]);
        frame.extend_from_slice(&self.l3_proto.to_be_bytes());
        frame.extend_from_slice(body);
        (frame, ETH_HLEN as u32 + orig(from), false)
    }

    /// Whether the copied bytes start with an Ethernet header (with up to two VLAN tags)
    /// that leads to the network header.
    fn real_ethernet(&self) -> bool {
        let h = &self.head;
        if h.mac == UNSET || h.start != h.mac {
            return false;
        }
        let ether_type = |at: usize| {
            self.bytes
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let link_len = if h.network == UNSET {
            ETH_HLEN
        } else {
            h.network.wrapping_sub(h.mac) as usize
        };
        match link_len {
            14 => ether_type(12) == Some(self.l3_proto),
            18 | 22 => {
                matches!(ether_type(12), Some(0x8100 | 0x88a8))
                    && ether_type(link_len - 2) == Some(self.l3_proto)
            }
            _ => false,
        }
    }
}

/// What a pcapng interface block stands for: a device in a network namespace, and whether
/// its packets carry the link-layer header the kernel had or a made-up one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interface {
    pub ifname: Option<String>,
    pub ifindex: u32,
    pub netns: u32,
    pub netns_name: Option<String>,
    pub real_link_header: bool,
}

impl Interface {
    /// `r0@dr-r`, `r0@4026532246 (no link-layer header)`, `no-device@dr-a`.
    pub fn name(&self) -> String {
        let ns = self
            .netns_name
            .clone()
            .unwrap_or_else(|| self.netns.to_string());
        let dev = self.ifname.as_deref().unwrap_or("no-device");
        if self.real_link_header {
            format!("{dev}@{ns}")
        } else {
            format!("{dev}@{ns} (no link-layer header)")
        }
    }

    pub fn description(&self) -> String {
        let dev = match &self.ifname {
            Some(n) => format!("device {n} (ifindex {})", self.ifindex),
            None => "no device".to_string(),
        };
        let ns = match &self.netns_name {
            Some(n) => format!("network namespace {n} (inode {})", self.netns),
            None => format!("network namespace inode {}", self.netns),
        };
        let link = if self.real_link_header {
            "Ethernet header as the kernel had it"
        } else {
            "the kernel had no link-layer header: the Ethernet header (zero addresses) is made up by dropscope"
        };
        format!("packets dropped by the kernel: {dev} in {ns}; {link}")
    }

    pub fn block(&self, snaplen: u32) -> Vec<u8> {
        pcapng::interface(
            pcapng::LINKTYPE_ETHERNET,
            snaplen + ETH_HLEN as u32,
            &self.name(),
            &self.description(),
            &os(),
        )
    }
}

/// The interface block of a file without packets: libpcap (tcpdump) refuses a file that
/// has no interface at all.
pub fn no_interface_block(snaplen: u32) -> Vec<u8> {
    pcapng::interface(
        pcapng::LINKTYPE_ETHERNET,
        snaplen + ETH_HLEN as u32,
        "none",
        "no dropped packet was written",
        &os(),
    )
}

/// One dropped packet, ready to be written.
#[derive(Debug, Clone)]
pub struct Entry {
    pub interface: Interface,
    pub cause: String,
    /// Wall-clock time of the drop, ns since the epoch.
    pub ts_ns: u64,
    pub frame: Vec<u8>,
    pub orig_len: u32,
    pub comment: String,
    pub direction: Option<Direction>,
}

impl Entry {
    pub fn block(&self, interface: u32) -> Vec<u8> {
        pcapng::packet(
            interface,
            self.ts_ns,
            &self.frame,
            self.orig_len,
            &self.comment,
            self.direction,
        )
    }

    /// Bytes it keeps in memory (the flight recorder's bound).
    pub fn size(&self) -> usize {
        self.frame.len() + self.comment.len() + std::mem::size_of::<Entry>()
    }
}

/// Builds entries from drops: names namespaces once each, converts kernel time to wall time.
pub struct Entries {
    clock: Clock,
    names: HashMap<u32, Option<String>>,
}

impl Entries {
    pub fn new(clock: Clock) -> Self {
        Entries {
            clock,
            names: HashMap::new(),
        }
    }

    pub fn entry(
        &mut self,
        d: &DropEvent,
        packet: &Packet,
        v: &Verdict,
        answer: Option<Answer>,
        netns_name: &mut dyn FnMut(u32) -> Option<String>,
    ) -> Entry {
        let name = self
            .names
            .entry(d.netns)
            .or_insert_with(|| netns_name(d.netns))
            .clone();
        let (frame, orig_len, real) = packet.frame(d.len);
        let interface = Interface {
            ifname: d.dev.map(|dev| dev.name().to_string()),
            ifindex: d.dev.map_or(0, |dev| dev.ifindex),
            netns: d.netns,
            netns_name: name.clone(),
            real_link_header: real,
        };
        let ts = self.clock.wall(d.ts_ns).timestamp_nanos_opt().unwrap_or(0);
        Entry {
            interface,
            cause: v.cause.clone(),
            ts_ns: u64::try_from(ts).unwrap_or(0),
            frame,
            orig_len,
            comment: comment(d, v, answer, name.as_deref()),
            direction: direction(d),
        }
    }
}

/// Whether the packet was on its way in or out where it died (`None`: unknown).
fn direction(d: &DropEvent) -> Option<Direction> {
    let dev = d.dev?;
    let forwarded_out = d
        .context
        .forwarded_from
        .is_some_and(|from| from.ifindex != dev.ifindex);
    if d.is_local_out() || d.iif.is_some() || forwarded_out {
        Some(Direction::Outbound)
    } else {
        Some(Direction::Inbound)
    }
}

/// The per-packet comment: `key=value` fields separated by "; ", the evidence last.
pub fn comment(d: &DropEvent, v: &Verdict, answer: Option<Answer>, netns_name: Option<&str>) -> String {
    let a = &v.attribution;
    let mut parts = vec![
        format!("cause={} ({})", v.cause, v.title),
        format!("reason={}", d.reason),
        format!("location={}", d.location),
    ];
    if let Some(hook) = a.hook {
        parts.push(format!("hook={hook}"));
    }
    if let Some(engine) = &a.engine {
        parts.push(format!("engine={engine}"));
    }
    if let Some(rule) = &a.rule {
        // The rule without the counter movement of the drop it was found for.
        let rule = rule.rsplit_once(" (+").map_or(rule.as_str(), |(r, _)| r);
        parts.push(format!("rule={rule}"));
    } else if let (Some(t), c) = (&a.nf_table, &a.nf_chain) {
        parts.push(match c {
            Some(c) => format!("table={t} chain={c}"),
            None => format!("table={t}"),
        });
    }
    if let Some(dev) = d.ingress() {
        parts.push(format!("in={}", dev.name()));
    }
    if let Some(out) = d
        .out
        .filter(|o| Some(o.ifindex) != d.ingress().map(|i| i.ifindex))
    {
        parts.push(format!("out={}", out.name()));
    }
    parts.push(match netns_name {
        Some(n) => format!("netns={n} ({})", d.netns),
        None => format!("netns={}", d.netns),
    });
    if let Some(pod) = &d.pod {
        parts.push(format!("pod={pod}"));
    }
    match answer {
        Some(Answer::Icmp(t, c)) => parts.push(format!("icmp_sent={t}/{c}")),
        Some(Answer::Icmp6(t, c)) => parts.push(format!("icmp6_sent={t}/{c}")),
        Some(Answer::TcpReset) => parts.push("tcp_reset_sent".into()),
        None => {}
    }
    if v.benign {
        parts.push("benign".into());
    }
    parts.push(format!("evidence={}", v.evidence.replace('\n', " ")));
    parts.join("; ")
}

/// Written versus total packets per cause, for the summary and the file's own comment.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// Where the packets went: a file path, `-` (standard output) or the recorder.
    pub target: String,
    pub snaplen: u32,
    pub written: u64,
    /// (cause, drops reported, packets written), most drops first.
    pub causes: Vec<(String, u64, u64)>,
}

impl Totals {
    pub fn new(
        target: &str,
        snaplen: u32,
        written: &HashMap<String, u64>,
        summary: &Summary,
    ) -> Self {
        let mut causes: Vec<(String, u64, u64)> = summary
            .causes
            .iter()
            .map(|(c, t)| (c.clone(), t.count, written.get(c).copied().unwrap_or(0)))
            .collect();
        // Causes hidden from the report (benign) have packets only with --all; those counted
        // there appear above. Anything written under a cause the summary lacks is listed too.
        for (c, n) in written {
            if !causes.iter().any(|(k, _, _)| k == c) {
                causes.push((c.clone(), *n, *n));
            }
        }
        Totals {
            target: target.to_string(),
            snaplen,
            written: written.values().sum(),
            causes,
        }
    }

    /// "netfilter_drop 5 of 5, no_listener 20 of 180 (160 sampled away in the kernel)".
    pub fn text(&self) -> String {
        if self.causes.is_empty() {
            return "no drops".into();
        }
        self.causes
            .iter()
            .map(|(c, total, written)| {
                if written == total {
                    format!("{c} {written} of {total}")
                } else {
                    format!(
                        "{c} {written} of {total} ({} not written: sampled away in the kernel, or no bytes)",
                        total.saturating_sub(*written)
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The operating system, for the file's header: "Linux 6.18.44-...".
pub fn os() -> String {
    format!("Linux {}", crate::session::kernel_release())
}

/// Receives every drop dropscope reports, with its packet when the kernel sent one.
pub trait PacketTap {
    /// One reported drop; `packet` is `None` when the kernel sent no bytes with it.
    fn packet(
        &mut self,
        d: &DropEvent,
        packet: Option<&Arc<Packet>>,
        v: &Verdict,
        answer: Option<Answer>,
        netns_name: &mut dyn FnMut(u32) -> Option<String>,
    );
    /// Bytes per packet the kernel should copy.
    fn snaplen(&self) -> u32;
    /// Where the packets go, for the attach line: a path, `-`, or a URL.
    fn target(&self) -> String;
    /// Periodically: makes what was written so far readable. An error ends the session.
    fn flush(&mut self) -> anyhow::Result<()>;
    /// At the end, with the session's totals: completes the output.
    fn finish(&mut self, summary: &Summary) -> anyhow::Result<Option<Totals>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(head: PacketHead, l3_proto: u16, bytes: Vec<u8>) -> Packet {
        Packet {
            head,
            l3_proto,
            bytes,
        }
    }

    fn ipv4() -> Vec<u8> {
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        ip
    }

    #[test]
    fn a_received_frame_keeps_its_ethernet_header() {
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        frame.extend(ipv4());
        // Received: mac at 64, network at 78, data already past the IP header (UDP at 98).
        let head = PacketHead {
            start: 64,
            mac: 64,
            network: 78,
            caplen: frame.len() as u16,
            data: 98,
            headlen: 8,
        };
        let (bytes, orig, real) = packet(head, 0x0800, frame.clone()).frame(8);
        assert!(real);
        assert_eq!(bytes, frame);
        assert_eq!(orig, 14 + 20 + 8);
    }

    #[test]
    fn a_packet_without_link_header_gets_a_made_up_one() {
        // Locally generated, before the neighbour layer: no MAC header.
        let head = PacketHead {
            start: 80,
            mac: UNSET,
            network: 80,
            caplen: 28,
            data: 80,
            headlen: 28,
        };
        let (bytes, orig, real) = packet(head, 0x0800, ipv4()).frame(28);
        assert!(!real);
        assert_eq!(
            &bytes[..14],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00]
        );
        assert_eq!(&bytes[14..], &ipv4()[..]);
        assert_eq!(orig, 14 + 28);
        // A MAC header that does not lead to the network header is not Ethernet (a tunnel
        // device, or a stale offset): the bytes before the network header are skipped.
        let mut junk = vec![9; 4];
        junk.extend(ipv4());
        let head = PacketHead {
            start: 76,
            mac: 76,
            network: 80,
            caplen: 32,
            data: 80,
            headlen: 28,
        };
        let (bytes, _, real) = packet(head, 0x0800, junk).frame(28);
        assert!(!real);
        assert_eq!(&bytes[14..], &ipv4()[..]);
    }

    #[test]
    fn vlan_tagged_frames_are_ethernet() {
        let mut frame = vec![
            2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0x00, 0, 5, 0x08, 0x00,
        ];
        frame.extend(ipv4());
        let head = PacketHead {
            start: 60,
            mac: 60,
            network: 78,
            caplen: frame.len() as u16,
            data: 78,
            headlen: 28,
        };
        assert!(packet(head, 0x0800, frame).frame(28).2);
    }

    #[test]
    fn a_record_without_packet_bytes_has_no_packet() {
        let ev = Event::zeroed();
        // SAFETY: Event is POD.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        assert!(Packet::after_event(bytes).is_none());
        let mut rec = bytes.to_vec();
        let head = PacketHead {
            caplen: 3,
            ..Default::default()
        };
        // SAFETY: PacketHead is POD.
        rec.extend_from_slice(unsafe {
            std::slice::from_raw_parts((&head as *const PacketHead).cast::<u8>(), 16)
        });
        rec.extend_from_slice(&[1, 2]);
        assert!(Packet::after_event(&rec).is_none(), "truncated bytes");
        rec.push(3);
        assert_eq!(Packet::after_event(&rec).unwrap().bytes, [1, 2, 3]);
    }

    #[test]
    fn the_comment_says_what_dropscope_knows() {
        let d = DropEvent::example("NETFILTER_DROP", "nft_do_chain");
        let mut v = crate::output::DropRecord::example("netfilter_drop", 1, None)
            .verdict
            .as_ref()
            .clone();
        v.attribution.hook = Some("forward");
        v.attribution.rule =
            Some("[nftables table inet t chain fw: handle 4 drop] (+3 packets)".into());
        let c = comment(&d, &v, Some(Answer::Icmp(3, 3)), Some("dr-r"));
        assert_eq!(
            c,
            "cause=netfilter_drop (title); reason=NETFILTER_DROP; location=nft_do_chain; hook=forward; \
             rule=[nftables table inet t chain fw: handle 4 drop]; in=r0; netns=dr-r (42); icmp_sent=3/3; evidence=evidence"
        );
    }
}
