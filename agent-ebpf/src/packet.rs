//! Reading the packet, its devices and their sysctls from an `sk_buff`, at offsets from BTF.
//!
//! Every read goes through `bpf_probe_read_kernel`, so a wrong pointer yields "unknown", never a
//! fault; an offset the running kernel does not have is skipped.
use agent_ebpf::{
    Event, ABSENT, DEV_WINDOW, FLAG_DEV, FLAG_DST, FLAG_FRAG, FLAG_IPV4, FLAG_IPV6, FLAG_L4,
    FLAG_SK_NETNS, SKB_WINDOW,
};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::map,
    maps::PerCpuArray,
};

use crate::maps::cfg;

/// Per-CPU buffers for windows of kernel structs read with one helper call each: helper calls
/// are most of a drop's cost, and the fields every drop needs sit close together.
#[map]
static WINDOWS: PerCpuArray<[u8; SKB_WINDOW as usize]> = PerCpuArray::with_max_entries(2, 0);

/// A span of a kernel struct copied into a per-CPU buffer; fields are taken from it by offset.
struct Window {
    buf: &'static [u8; SKB_WINDOW as usize],
    start: u32,
}

impl Window {
    /// Copies `len` bytes at `base + start` into buffer `slot`.
    #[inline(always)]
    fn read(slot: u32, base: u64, start: u32, len: u32) -> Option<Window> {
        if base == 0 || start == ABSENT {
            return None;
        }
        let buf = WINDOWS.get_ptr_mut(slot)?;
        // SAFETY: per-CPU buffer of this CPU; probe-read reports failures instead of faulting.
        let buf = unsafe { &mut *buf };
        let n = (len as usize).min(buf.len());
        unsafe { bpf_probe_read_kernel_buf((base + start as u64) as *const u8, &mut buf[..n]) }
            .ok()?;
        Some(Window { buf, start })
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, off: u32) -> Option<[u8; N]> {
        if off == ABSENT {
            return None;
        }
        let i = off.wrapping_sub(self.start) as usize;
        if i + N > self.buf.len() {
            return None;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[i..i + N]);
        Some(out)
    }

    #[inline(always)]
    fn u16(&self, off: u32) -> Option<u16> {
        self.bytes::<2>(off).map(u16::from_ne_bytes)
    }
    #[inline(always)]
    fn u32(&self, off: u32) -> Option<u32> {
        self.bytes::<4>(off).map(u32::from_ne_bytes)
    }
    #[inline(always)]
    fn u64(&self, off: u32) -> Option<u64> {
        self.bytes::<8>(off).map(u64::from_ne_bytes)
    }
}

/// A field of `base`, from its window when there is one, else with its own read.
macro_rules! field {
    ($win:expr, $ty:ident, $base:expr, $off:expr) => {
        match &$win {
            Some(w) => w.$ty($off),
            None => read::<$ty>($base, $off),
        }
    };
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// `skb->_skb_refdst` carries a "no reference" flag in bit 0.
const SKB_DST_PTRMASK: u64 = !1;

/// Reads a `T` at `base + off`, or `None` if the base is NULL, the offset absent or the read fails.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == ABSENT {
        return None;
    }
    // SAFETY: probe-read of kernel memory; failures are reported, not faults.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

#[inline(always)]
fn small(v: Option<i32>) -> i8 {
    match v {
        Some(v) if (0..=127).contains(&v) => v as i8,
        _ => -1,
    }
}

/// The devices of a packet, found by [`fill_key`] and reused by [`fill_rest`].
pub struct Devices {
    dev: u64,
    out: u64,
}

/// The route's device (`skb_dst(skb)->dev`), or 0.
#[inline(always)]
fn route_device(skb: u64) -> u64 {
    read::<u64>(skb_dst(skb), cfg().offsets.dst_dev).unwrap_or(0)
}

/// The packet's route (`skb_dst(skb)`, a `struct dst_entry *`), or 0.
#[inline(always)]
pub fn skb_dst(skb: u64) -> u64 {
    read::<u64>(skb, cfg().offsets.skb_refdst).unwrap_or(0) & SKB_DST_PTRMASK
}

/// The cheap part, needed for every drop: what the kernel-side filters and the aggregation
/// key look at (length, device index, netns, addresses, ports). The rest waits until the
/// event is known to be sent.
#[inline(always)]
pub fn fill_key(ev: &mut Event, skb: u64, no_dev: bool) -> Devices {
    let o = &cfg().offsets;
    ev.skb = skb;
    let sw = Window::read(0, skb, o.skb_window, SKB_WINDOW);
    ev.len = field!(sw, u32, skb, o.skb_len).unwrap_or(0);
    let dev = if no_dev {
        0
    } else {
        field!(sw, u64, skb, o.skb_dev).unwrap_or(0)
    };
    let mut out = 0;
    let ns_dev = if dev != 0 {
        dev
    } else {
        // Locally generated packets have no device yet: take the netns of the route's device.
        out = route_device(skb);
        out
    };
    let dw = Window::read(1, ns_dev, o.dev_window, DEV_WINDOW);
    if dev != 0 {
        ev.flags |= FLAG_DEV;
        ev.ifindex = field!(dw, u32, dev, o.dev_ifindex).unwrap_or(0);
    }
    let net = if ns_dev != 0 {
        field!(dw, u64, ns_dev, o.dev_nd_net).unwrap_or(0)
    } else {
        // Neither a device nor a route (e.g. a socket's packet before routing): its socket's.
        let sk = read::<u64>(skb, o.skb_sk).unwrap_or(0);
        let net = read::<u64>(sk, o.sk_net).unwrap_or(0);
        if net != 0 {
            ev.flags |= FLAG_SK_NETNS;
        }
        net
    };
    ev.netns = read::<u32>(net, o.net_inum).unwrap_or(0);
    ev.iif = field!(sw, u32, skb, o.skb_iif).unwrap_or(0);
    if cfg().filters.n_ifnames != 0 {
        // Only an interface filter needs the names this early.
        if out == 0 {
            out = route_device(skb);
        }
        ev.ifname = read::<[u8; 16]>(dev, o.dev_name).unwrap_or([0; 16]);
        ev.out_ifname = read::<[u8; 16]>(out, o.dev_name).unwrap_or([0; 16]);
        if out != 0 {
            ev.flags |= FLAG_DST;
        }
    }

    let proto = u16::from_be(field!(sw, u16, skb, o.skb_protocol).unwrap_or(0));
    ev.l3_proto = proto;
    let head = field!(sw, u64, skb, o.skb_head).unwrap_or(0);
    let nh = field!(sw, u16, skb, o.skb_network_header).unwrap_or(u16::MAX);
    if head != 0 && nh != u16::MAX {
        let l3 = head + nh as u64;
        if proto == ETH_P_IP {
            parse_ipv4(ev, l3);
        } else if proto == ETH_P_IPV6 {
            parse_ipv6(ev, l3);
        }
    }
    Devices { dev, out }
}

/// Everything else, for events that will be sent: mark, MTU, names, sysctls, route device.
#[inline(always)]
pub fn fill_rest(ev: &mut Event, skb: u64, devs: &Devices) {
    let o = &cfg().offsets;
    ev.mark = read::<u32>(skb, o.skb_mark).unwrap_or(0);
    if devs.dev != 0 {
        ev.mtu = read::<u32>(devs.dev, o.dev_mtu).unwrap_or(0);
        ev.ifname = read::<[u8; 16]>(devs.dev, o.dev_name).unwrap_or([0; 16]);
        fill_devconf(ev, devs.dev);
    }
    let out = if devs.out != 0 {
        devs.out
    } else {
        route_device(skb)
    };
    if out != 0 {
        ev.flags |= FLAG_DST;
        ev.out_ifindex = read::<u32>(out, o.dev_ifindex).unwrap_or(0);
        ev.out_mtu = read::<u32>(out, o.dev_mtu).unwrap_or(0);
        ev.out_ifname = read::<[u8; 16]>(out, o.dev_name).unwrap_or([0; 16]);
    }
}

/// Fills `ev` with everything known about `skb` (for rare events: no sampling to decide).
#[inline(always)]
pub fn fill(ev: &mut Event, skb: u64) {
    let devs = fill_key(ev, skb, false);
    fill_rest(ev, skb, &devs);
}

/// Forwarding and rp_filter of the device and of `all` in the device's netns.
#[inline(always)]
fn fill_devconf(ev: &mut Event, dev: u64) {
    let o = &cfg().offsets;
    let net = read::<u64>(dev, o.dev_nd_net).unwrap_or(0);
    let fwd_off = o.devconf_idx_forwarding.wrapping_mul(4);
    let rp_off = o.devconf_idx_rp_filter.wrapping_mul(4);
    if o.in_dev_cnf_data != ABSENT && o.devconf_idx_forwarding != ABSENT {
        let in_dev = read::<u64>(dev, o.dev_ip_ptr).unwrap_or(0);
        ev.dev_forwarding = small(read::<i32>(in_dev, o.in_dev_cnf_data.wrapping_add(fwd_off)));
        ev.dev_rp_filter = small(read::<i32>(in_dev, o.in_dev_cnf_data.wrapping_add(rp_off)));
        let all = read::<u64>(net, o.net_ipv4_devconf_all).unwrap_or(0);
        ev.all_forwarding = small(read::<i32>(all, o.ipv4_devconf_data.wrapping_add(fwd_off)));
        ev.all_rp_filter = small(read::<i32>(all, o.ipv4_devconf_data.wrapping_add(rp_off)));
    }
    let in6_dev = read::<u64>(dev, o.dev_ip6_ptr).unwrap_or(0);
    ev.dev6_forwarding = small(read::<i32>(in6_dev, o.in6_dev_cnf_forwarding));
    let all6 = read::<u64>(net, o.net_ipv6_devconf_all).unwrap_or(0);
    ev.all6_forwarding = small(read::<i32>(all6, o.ipv6_devconf_forwarding));
}

/// Bytes read at the network header: an IPv6 header (40) or an IPv4 header with up to 20
/// bytes of options, plus the first 4 bytes of L4 (ports, ICMP type/code), in one read.
const HEADERS: usize = 48;

#[inline(always)]
fn parse_ipv4(ev: &mut Event, l3: u64) {
    let Some(h) = read::<[u8; HEADERS]>(l3, 0) else {
        return;
    };
    if h[0] >> 4 != 4 {
        return;
    }
    ev.flags |= FLAG_IPV4;
    ev.ttl = h[8];
    ev.l4_proto = h[9];
    ev.saddr[..4].copy_from_slice(&h[12..16]);
    ev.daddr[..4].copy_from_slice(&h[16..20]);
    // Only the first fragment carries the L4 header.
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let frag_off = frag & 0x1fff;
    if frag & 0x2000 != 0 || frag_off != 0 {
        ev.flags |= FLAG_FRAG;
        ev.frag_off = frag_off.wrapping_mul(8);
    }
    if frag_off == 0 {
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if ihl + 4 <= HEADERS {
            parse_l4_bytes(ev, [h[ihl], h[ihl + 1], h[ihl + 2], h[ihl + 3]]);
        } else {
            parse_l4(ev, l3 + ihl as u64);
        }
    }
}

#[inline(always)]
fn parse_ipv6(ev: &mut Event, l3: u64) {
    let Some(h) = read::<[u8; HEADERS]>(l3, 0) else {
        return;
    };
    if h[0] >> 4 != 6 {
        return;
    }
    ev.flags |= FLAG_IPV6;
    ev.l4_proto = h[6];
    ev.ttl = h[7];
    ev.saddr.copy_from_slice(&h[8..24]);
    ev.daddr.copy_from_slice(&h[24..40]);
    if !is_ext_header(ev.l4_proto) {
        parse_l4_bytes(ev, [h[40], h[41], h[42], h[43]]);
        return;
    }
    // Extension headers (hop-by-hop, routing, fragment, destination options) come before
    // the upper layer: step over a few of them to find the real protocol and ports.
    let mut at = l3 + 40;
    let mut next = ev.l4_proto;
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext_header(next) {
            break;
        }
        // Every one of them starts with (next header, length); the fragment header is 8
        // bytes long and says where this fragment sits instead.
        let Some(e) = read::<[u8; 8]>(at, 0) else {
            return;
        };
        if next == IPPROTO_FRAGMENT {
            let off = u16::from_be_bytes([e[2], e[3]]);
            ev.flags |= FLAG_FRAG;
            ev.frag_off = off & 0xfff8;
            next = e[0];
            at += 8;
            if ev.frag_off != 0 {
                // A later fragment: no upper-layer header in it.
                ev.l4_proto = next;
                return;
            }
        } else {
            next = e[0];
            at += (e[1] as u64 + 1) * 8;
        }
    }
    ev.l4_proto = next;
    if !is_ext_header(next) {
        parse_l4(ev, at);
    }
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers stepped over before giving up on the upper layer.
const MAX_EXT_HEADERS: usize = 3;

#[inline(always)]
fn is_ext_header(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS
    )
}

#[inline(always)]
fn parse_l4(ev: &mut Event, l4: u64) {
    if let Some(h) = read::<[u8; 4]>(l4, 0) {
        parse_l4_bytes(ev, h);
    }
}

#[inline(always)]
fn parse_l4_bytes(ev: &mut Event, h: [u8; 4]) {
    match ev.l4_proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            ev.sport = u16::from_be_bytes([h[0], h[1]]);
            ev.dport = u16::from_be_bytes([h[2], h[3]]);
            ev.flags |= FLAG_L4;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            ev.icmp_type = h[0];
            ev.icmp_code = h[1];
            ev.flags |= FLAG_L4;
        }
        _ => {}
    }
}
