//! Reading the packet, its devices and their sysctls from an `sk_buff`, at offsets from BTF.
//!
//! Two ways to read kernel memory, chosen per program by a [`Reader`]:
//! - [`Typed`]: plain loads. Only for pointers whose type the verifier knows (a `tp_btf`
//!   program's `skb` argument and the struct pointers read from it: `skb->dev`,
//!   `dev->nd_net`, `skb->sk`). The offsets come from the frozen `.rodata` config, so the
//!   verifier sees constants and checks each load against the kernel's BTF; a NULL or stale
//!   pointer reads as zero (these loads are exception-handled). One instruction each.
//! - [`Probed`]: `bpf_probe_read_kernel`, for everything else (the classic tracepoint's
//!   untyped `skb`, the route, the packet's bytes). A helper call each, so the fields every
//!   drop needs are read in windows.
//!
//! Either way a wrong pointer yields "unknown", never a fault; an offset the running kernel
//! does not have is skipped.
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

/// A field of `base`, from its window when there is one, else with its own read.
macro_rules! field {
    ($win:expr, $ty:ident, $base:expr, $off:expr) => {
        match &$win {
            Some(w) => w.$ty($off),
            None => read::<$ty>($base, $off),
        }
    };
}
/// How a program reads the kernel structs its hook hands it.
pub trait Reader {
    /// A `T` (at most 8 bytes, a scalar or a pointer) at `base + off`.
    fn get<T: Copy>(base: u64, off: u32) -> Option<T>;
    /// A field every supported kernel has (userspace refuses to load the programs when BTF
    /// lacks one): no check for an absent offset.
    #[inline(always)]
    fn get_required<T: Copy>(base: u64, off: u32) -> T
    where
        T: Default,
    {
        Self::get(base, off).unwrap_or_default()
    }
    /// A required field through a pointer the verifier wants checked for NULL first (one
    /// marked `__rcu` in BTF, like `possible_net_t.net`).
    #[inline(always)]
    fn get_checked<T: Copy + Default>(base: u64, off: u32) -> T {
        if base == 0 {
            return T::default();
        }
        Self::get_required(base, off)
    }
    /// The `sk_buff` fields every drop needs.
    fn skb_fields(skb: u64) -> SkbFields;
    /// The `net_device` fields every drop needs: ifindex and its netns (`struct net *`).
    fn dev_fields(dev: u64) -> (Option<u32>, u64);
}

/// Plain loads through typed pointers (see the module documentation).
pub struct Typed;

/// `bpf_probe_read_kernel` (see the module documentation).
pub struct Probed;

impl Reader for Typed {
    #[inline(always)]
    fn get<T: Copy>(base: u64, off: u32) -> Option<T> {
        if off == ABSENT {
            return None;
        }
        // No NULL check: a load through NULL (or any bad pointer) reads zero here, and a
        // check the verifier cannot resolve would double the paths it explores after it.
        // SAFETY: the verifier checks this load against the type of `base` (BTF) and the
        // kernel turns a fault into a zero.
        Some(unsafe { core::ptr::read_volatile((base + off as u64) as *const T) })
    }

    #[inline(always)]
    fn get_required<T: Copy + Default>(base: u64, off: u32) -> T {
        // SAFETY: as in `get`; the offset exists (checked by userspace before loading).
        unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
    }

    #[inline(always)]
    fn skb_fields(skb: u64) -> SkbFields {
        let o = &cfg().offsets;
        SkbFields {
            len: Self::get_required(skb, o.skb_len),
            dev: Self::get_required(skb, o.skb_dev),
            protocol: Self::get_required(skb, o.skb_protocol),
            head: Self::get_required(skb, o.skb_head),
            network_header: Self::get_required(skb, o.skb_network_header),
            iif: Self::get_required(skb, o.skb_iif),
        }
    }

    #[inline(always)]
    fn dev_fields(dev: u64) -> (Option<u32>, u64) {
        let o = &cfg().offsets;
        (
            Some(Self::get_required(dev, o.dev_ifindex)),
            Self::get_required(dev, o.dev_nd_net),
        )
    }
}

impl Reader for Probed {
    #[inline(always)]
    fn get<T: Copy>(base: u64, off: u32) -> Option<T> {
        read(base, off)
    }

    #[inline(always)]
    fn skb_fields(skb: u64) -> SkbFields {
        let o = &cfg().offsets;
        let sw = Window::read(0, skb, o.skb_window, SKB_WINDOW);
        SkbFields {
            len: field!(sw, u32, skb, o.skb_len).unwrap_or(0),
            dev: field!(sw, u64, skb, o.skb_dev).unwrap_or(0),
            protocol: field!(sw, u16, skb, o.skb_protocol).unwrap_or(0),
            head: field!(sw, u64, skb, o.skb_head).unwrap_or(0),
            network_header: field!(sw, u16, skb, o.skb_network_header).unwrap_or(u16::MAX),
            iif: field!(sw, u32, skb, o.skb_iif).unwrap_or(0),
        }
    }

    #[inline(always)]
    fn dev_fields(dev: u64) -> (Option<u32>, u64) {
        let o = &cfg().offsets;
        let dw = Window::read(1, dev, o.dev_window, DEV_WINDOW);
        (
            field!(dw, u32, dev, o.dev_ifindex),
            field!(dw, u64, dev, o.dev_nd_net).unwrap_or(0),
        )
    }
}

/// The `sk_buff` fields every drop needs.
pub struct SkbFields {
    len: u32,
    dev: u64,
    /// Network byte order, as in the struct.
    protocol: u16,
    head: u64,
    network_header: u16,
    iif: u32,
}

/// What the filters and the aggregation key look at, and what an event then reports; built
/// before an event is known to be sent (in a per-CPU map for the drop probe), copied into an
/// event only when one is. Every field is written with plain stores: bulk copies and fills
/// become byte loops in BPF, which a drop storm would pay for every packet.
#[repr(C)]
pub struct Packet {
    pub skb: u64,
    /// `skb->dev` (0 when there is none, or where it holds something else).
    pub dev: u64,
    /// The route's device when it was needed already (0: not looked up yet, or none).
    pub out: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Only read this early when an interface filter needs them.
    pub ifname: [u8; 16],
    pub out_ifname: [u8; 16],
    /// The first bytes at the network header, as read.
    pub hdr: [u64; HEADER_WORDS],
    pub len: u32,
    pub ifindex: u32,
    pub netns: u32,
    pub iif: u32,
    pub l3_proto: u16,
    pub sport: u16,
    pub dport: u16,
    pub frag_off: u16,
    pub flags: u8,
    pub l4_proto: u8,
    pub ttl: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad: [u8; 3],
}

// The tail zeroed as two words in parse_into starts at l3_proto.
const _: () =
    assert!(core::mem::offset_of!(Packet, l3_proto) + 16 == core::mem::size_of::<Packet>());
const _: () = assert!(core::mem::offset_of!(Packet, l3_proto) % 8 == 0);

impl Packet {
    pub const EMPTY: Packet = Packet {
        skb: 0,
        dev: 0,
        out: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        ifname: [0; 16],
        out_ifname: [0; 16],
        hdr: [0; HEADER_WORDS],
        len: 0,
        ifindex: 0,
        netns: 0,
        iif: 0,
        l3_proto: 0,
        sport: 0,
        dport: 0,
        frag_off: 0,
        flags: 0,
        l4_proto: 0,
        ttl: 0,
        icmp_type: 0,
        icmp_code: 0,
        _pad: [0; 3],
    };

    /// A header byte.
    #[inline(always)]
    fn h(&self, i: usize) -> u8 {
        (self.hdr[i / 8] >> ((i % 8) * 8)) as u8
    }

    /// A big-endian 16-bit header field.
    #[inline(always)]
    fn h16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.h(i), self.h(i + 1)])
    }
}

/// Copies 16 bytes as two loads and two stores (both 8-aligned in their structs).
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let from = src.as_ptr() as *const u64;
    // SAFETY: 16 bytes at 8-aligned offsets of #[repr(C)] structs.
    let (lo, hi) = unsafe { (from.read_volatile(), from.add(1).read_volatile()) };
    set16(dst, lo, hi);
}

/// Writes two words over 16 bytes (an address or a name), as two stores.
#[inline(always)]
pub fn set16(dst: &mut [u8; 16], lo: u64, hi: u64) {
    let at = dst.as_mut_ptr() as *mut u64;
    // SAFETY: 16 bytes at an 8-aligned offset of a #[repr(C)] struct.
    unsafe {
        at.write_volatile(lo);
        at.add(1).write_volatile(hi);
    }
}

/// Per-CPU buffers for windows of kernel structs read with one helper call each: helper calls
/// are most of a probe-read drop's cost, and the fields every drop needs sit close together.
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

/// A 16-byte name (`net_device.name`) as two 8-byte reads (plain loads cannot be wider).
#[inline(always)]
fn name_into<R: Reader>(dst: &mut [u8; 16], dev: u64) {
    let off = cfg().offsets.dev_name;
    if dev == 0 || off == ABSENT {
        set16(dst, 0, 0);
        return;
    }
    let a: u64 = R::get(dev, off).unwrap_or(0);
    let b: u64 = R::get(dev, off.wrapping_add(8)).unwrap_or(0);
    set16(dst, a, b);
}

#[inline(always)]
fn small(v: Option<i32>) -> i8 {
    match v {
        Some(v) if (0..=127).contains(&v) => v as i8,
        _ => -1,
    }
}

/// The route's device (`skb_dst(skb)->dev`), or 0. The route is an integer in `sk_buff`
/// (`_skb_refdst`), untyped for the verifier: probe-read.
#[inline(always)]
fn route_device(skb: u64) -> u64 {
    read::<u64>(skb_dst(skb), cfg().offsets.dst_dev).unwrap_or(0)
}

/// The packet's route (`skb_dst(skb)`, a `struct dst_entry *`), or 0.
#[inline(always)]
pub fn skb_dst(skb: u64) -> u64 {
    read::<u64>(skb, cfg().offsets.skb_refdst).unwrap_or(0) & SKB_DST_PTRMASK
}

/// The cheap part, needed for every drop: what the kernel-side filters and the aggregation key
/// look at (length, device index, netns, addresses, ports). The rest waits until an event is
/// known to be sent.
#[inline(always)]
pub fn parse<R: Reader>(skb: u64, no_dev: bool) -> Packet {
    let mut p = Packet::EMPTY;
    parse_into::<R>(&mut p, skb, no_dev);
    p
}

/// [`parse`] into `p` (which may live in a map: the stack is small).
#[inline(always)]
pub fn parse_into<R: Reader>(p: &mut Packet, skb: u64, no_dev: bool) {
    let o = &cfg().offsets;
    p.skb = skb;
    p.out = 0;
    p.netns = 0;
    // l3_proto .. the end: two words (adjacent small stores would become a memset call).
    let tail = &mut p.l3_proto as *mut u16 as *mut u64;
    // SAFETY: the last 16 bytes of the #[repr(C)] struct, 8-aligned.
    unsafe {
        tail.write_volatile(0);
        tail.add(1).write_volatile(0);
    }
    set16(&mut p.saddr, 0, 0);
    set16(&mut p.daddr, 0, 0);
    let f = R::skb_fields(skb);
    p.len = f.len;
    p.iif = f.iif;
    p.dev = if no_dev { 0 } else { f.dev };
    p.ifindex = 0;
    let net = if p.dev != 0 {
        let (ifindex, net) = R::dev_fields(p.dev);
        p.flags |= FLAG_DEV;
        p.ifindex = ifindex.unwrap_or(0);
        net
    } else {
        // Locally generated packets have no device yet: the netns of the route's device...
        p.out = route_device(skb);
        if p.out != 0 {
            Probed::dev_fields(p.out).1
        } else {
            // ... or, with neither (a socket's packet before routing), of its socket.
            let sk: u64 = R::get(skb, o.skb_sk).unwrap_or(0);
            let net: u64 = if o.sk_net == ABSENT {
                0
            } else {
                R::get_checked(sk, o.sk_net)
            };
            if net != 0 {
                p.flags |= FLAG_SK_NETNS;
            }
            net
        }
    };
    p.netns = if p.out != 0 {
        read::<u32>(net, o.net_inum).unwrap_or(0)
    } else {
        R::get_checked::<u32>(net, o.net_inum)
    };
    if cfg().filters.n_ifnames != 0 {
        // Only an interface filter needs the names this early.
        if p.out == 0 {
            p.out = route_device(skb);
        }
        name_into::<R>(&mut p.ifname, p.dev);
        name_into::<Probed>(&mut p.out_ifname, p.out);
        if p.out != 0 {
            p.flags |= FLAG_DST;
        }
    }

    let proto = u16::from_be(f.protocol);
    p.l3_proto = proto;
    // A network header offset of ~0 means "not set" (skb_network_header_was_set()).
    if f.head != 0 && f.network_header != u16::MAX {
        let l3 = f.head + f.network_header as u64;
        if proto == ETH_P_IP {
            parse_ipv4(p, l3);
        } else if proto == ETH_P_IPV6 {
            parse_ipv6(p, l3);
        }
    }
}

/// Copies a packet into an event and adds everything else: mark, MTU, names, sysctls, route
/// device (probe-reads: events are few, sampling bounds them).
#[inline(always)]
pub fn fill_event(ev: &mut Event, p: &Packet) {
    ev.skb = p.skb;
    ev.len = p.len;
    ev.ifindex = p.ifindex;
    ev.netns = p.netns;
    ev.iif = p.iif;
    ev.l3_proto = p.l3_proto;
    ev.sport = p.sport;
    ev.dport = p.dport;
    ev.frag_off = p.frag_off;
    ev.flags = p.flags;
    ev.l4_proto = p.l4_proto;
    ev.ttl = p.ttl;
    ev.icmp_type = p.icmp_type;
    ev.icmp_code = p.icmp_code;
    copy16(&mut ev.saddr, &p.saddr);
    copy16(&mut ev.daddr, &p.daddr);

    let o = &cfg().offsets;
    ev.mark = read::<u32>(p.skb, o.skb_mark).unwrap_or(0);
    if p.dev != 0 {
        ev.mtu = read::<u32>(p.dev, o.dev_mtu).unwrap_or(0);
        ev.ifname = read::<[u8; 16]>(p.dev, o.dev_name).unwrap_or([0; 16]);
        fill_devconf(ev, p.dev);
    }
    let out = if p.out != 0 {
        p.out
    } else {
        route_device(p.skb)
    };
    if out != 0 {
        ev.flags |= FLAG_DST;
        ev.out_ifindex = read::<u32>(out, o.dev_ifindex).unwrap_or(0);
        ev.out_mtu = read::<u32>(out, o.dev_mtu).unwrap_or(0);
        ev.out_ifname = read::<[u8; 16]>(out, o.dev_name).unwrap_or([0; 16]);
    }
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
pub const HEADER_WORDS: usize = HEADERS / 8;

/// Reads the network header into `p.hdr`; false if it cannot be read.
#[inline(always)]
fn read_header(p: &mut Packet, l3: u64) -> bool {
    // SAFETY: probe-read into our own buffer of exactly that size.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            p.hdr.as_mut_ptr().cast(),
            HEADERS as u32,
            l3 as *const core::ffi::c_void,
        ) == 0
    }
}

#[inline(always)]
fn parse_ipv4(p: &mut Packet, l3: u64) {
    if !read_header(p, l3) || p.h(0) >> 4 != 4 {
        return;
    }
    p.flags |= FLAG_IPV4;
    p.ttl = p.h(8);
    p.l4_proto = p.h(9);
    // Source at bytes 12..16, destination at 16..20: the upper half of word 1, the lower of 2.
    set16(&mut p.saddr, p.hdr[1] >> 32, 0);
    set16(&mut p.daddr, p.hdr[2] & 0xffff_ffff, 0);
    // Only the first fragment carries the L4 header.
    let frag = p.h16(6);
    let frag_off = frag & 0x1fff;
    if frag & 0x2000 != 0 || frag_off != 0 {
        p.flags |= FLAG_FRAG;
        p.frag_off = frag_off.wrapping_mul(8);
    }
    if frag_off == 0 {
        let ihl = ((p.h(0) & 0x0f) as usize) * 4;
        if ihl == 20 {
            let l4 = (p.hdr[2] >> 32) as u32;
            parse_l4_word(p, l4);
        } else {
            parse_l4(p, l3 + ihl as u64);
        }
    }
}

#[inline(always)]
fn parse_ipv6(p: &mut Packet, l3: u64) {
    if !read_header(p, l3) || p.h(0) >> 4 != 6 {
        return;
    }
    p.flags |= FLAG_IPV6;
    p.l4_proto = p.h(6);
    p.ttl = p.h(7);
    // Source at bytes 8..24, destination at 24..40.
    set16(&mut p.saddr, p.hdr[1], p.hdr[2]);
    set16(&mut p.daddr, p.hdr[3], p.hdr[4]);
    if !is_ext_header(p.l4_proto) {
        let l4 = p.hdr[5] as u32;
        parse_l4_word(p, l4);
        return;
    }
    parse_ipv6_ext(p, l3);
}

/// Extension headers (hop-by-hop, routing, fragment, destination options) come before the
/// upper layer: steps over a few of them to find the real protocol and ports.
#[inline(always)]
fn parse_ipv6_ext(p: &mut Packet, l3: u64) {
    let mut at = l3 + 40;
    let mut next = p.l4_proto;
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext_header(next) {
            break;
        }
        // Every one of them starts with (next header, length); the fragment header is 8
        // bytes long and says where this fragment sits instead.
        let Some(e) = read::<u64>(at, 0) else {
            return;
        };
        let byte = |i: u32| (e >> (i * 8)) as u8;
        if next == IPPROTO_FRAGMENT {
            let off = u16::from_be_bytes([byte(2), byte(3)]);
            p.flags |= FLAG_FRAG;
            p.frag_off = off & 0xfff8;
            next = byte(0);
            at += 8;
            if p.frag_off != 0 {
                // A later fragment: no upper-layer header in it.
                p.l4_proto = next;
                return;
            }
        } else {
            next = byte(0);
            at += (byte(1) as u64 + 1) * 8;
        }
    }
    p.l4_proto = next;
    if !is_ext_header(next) {
        parse_l4(p, at);
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
fn parse_l4(p: &mut Packet, l4: u64) {
    if let Some(w) = read::<u32>(l4, 0) {
        parse_l4_word(p, w);
    }
}

/// Ports, or ICMP type and code, from the first 4 bytes of L4 (as loaded, little-endian).
#[inline(always)]
fn parse_l4_word(p: &mut Packet, w: u32) {
    let b = w.to_le_bytes();
    match p.l4_proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            p.sport = u16::from_be_bytes([b[0], b[1]]);
            p.dport = u16::from_be_bytes([b[2], b[3]]);
            p.flags |= FLAG_L4;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            p.icmp_type = b[0];
            p.icmp_code = b[1];
            p.flags |= FLAG_L4;
        }
        _ => {}
    }
}
