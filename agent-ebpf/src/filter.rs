//! Kernel-side filters: a filtered-out drop storm never reaches the ring buffer.
use agent_ebpf::{
    Cidr, FILTER_SLOTS, FLAG_DEV, FLAG_DST, FLAG_FRAG, FLAG_IPV4, FLAG_IPV6, FLAG_L4,
};

use crate::{maps::cfg, packet::Packet};

/// Whether a packet passes every configured filter list.
#[inline(always)]
pub fn passes(ev: &Packet) -> bool {
    let f = &cfg().filters;
    (f.n_netns == 0 || any_u32(&f.netns, f.n_netns, ev.netns))
        && (f.n_protos == 0
            || (ev.flags & (FLAG_IPV4 | FLAG_IPV6) != 0
                && any_u8(&f.protos, f.n_protos, ev.l4_proto)))
        && (f.n_ports == 0
            || (ev.flags & FLAG_L4 != 0
                && !matches!(ev.l4_proto, 1 | 58)
                && (any_u16(&f.ports, f.n_ports, ev.sport)
                    || any_u16(&f.ports, f.n_ports, ev.dport))))
        && (f.n_src == 0 || any_cidr(&f.src, f.n_src, &ev.saddr, ev.flags))
        && (f.n_dst == 0 || any_cidr(&f.dst, f.n_dst, &ev.daddr, ev.flags))
        && (f.n_ifnames == 0
            || (ev.flags & FLAG_DEV != 0 && any_name(&f.ifnames, f.n_ifnames, &ev.ifname))
            || (ev.flags & FLAG_DST != 0 && any_name(&f.ifnames, f.n_ifnames, &ev.out_ifname)))
        && expression_lists(ev)
}

/// The lists only a filter expression fills (`host`/`net`, port ranges, `ip`/`ip6`).
#[inline(always)]
fn expression_lists(ev: &Packet) -> bool {
    let f = &cfg().filters;
    (f.families == 0 || ev.flags & f.families != 0)
        && (f.n_addrs == 0
            || any_cidr(&f.addrs, f.n_addrs, &ev.saddr, ev.flags)
            || any_cidr(&f.addrs, f.n_addrs, &ev.daddr, ev.flags))
        && ((f.n_sport_ranges | f.n_dport_ranges | f.n_port_ranges) == 0
            || (has_ports(ev)
                && (f.n_sport_ranges == 0
                    || any_range(&f.sport_ranges, f.n_sport_ranges, ev.sport))
                && (f.n_dport_ranges == 0
                    || any_range(&f.dport_ranges, f.n_dport_ranges, ev.dport))
                && (f.n_port_ranges == 0
                    || any_range(&f.port_ranges, f.n_port_ranges, ev.sport)
                    || any_range(&f.port_ranges, f.n_port_ranges, ev.dport))))
}

/// Whether the packet carries TCP or UDP ports the way tcpdump's `port` sees them: parsed,
/// not an IPv4 fragment after the first (those have none), not an IPv6 fragment.
#[inline(always)]
fn has_ports(ev: &Packet) -> bool {
    ev.flags & FLAG_L4 != 0
        && matches!(ev.l4_proto, 6 | 17)
        && !(ev.flags & FLAG_IPV6 != 0 && ev.flags & FLAG_FRAG != 0)
}

#[inline(always)]
fn any_range(list: &[[u16; 2]; FILTER_SLOTS], n: u8, v: u16) -> bool {
    (0..FILTER_SLOTS).any(|i| i < n as usize && list[i][0] <= v && v <= list[i][1])
}

#[inline(always)]
fn any_u32(list: &[u32; FILTER_SLOTS], n: u8, v: u32) -> bool {
    (0..FILTER_SLOTS).any(|i| i < n as usize && list[i] == v)
}

#[inline(always)]
fn any_u16(list: &[u16; FILTER_SLOTS], n: u8, v: u16) -> bool {
    (0..FILTER_SLOTS).any(|i| i < n as usize && list[i] == v)
}

#[inline(always)]
fn any_u8(list: &[u8; FILTER_SLOTS], n: u8, v: u8) -> bool {
    (0..FILTER_SLOTS).any(|i| i < n as usize && list[i] == v)
}

#[inline(always)]
fn any_name(list: &[[u8; 16]; FILTER_SLOTS], n: u8, name: &[u8; 16]) -> bool {
    (0..FILTER_SLOTS).any(|i| i < n as usize && list[i] == *name)
}

#[inline(always)]
fn any_cidr(list: &[Cidr; FILTER_SLOTS], n: u8, addr: &[u8; 16], flags: u8) -> bool {
    (0..FILTER_SLOTS)
        .any(|i| i < n as usize && flags & list[i].family != 0 && in_prefix(&list[i], addr))
}

/// Whether `addr` starts with the first `prefix_len` bits of `c.addr`.
#[inline(always)]
fn in_prefix(c: &Cidr, addr: &[u8; 16]) -> bool {
    let mut bits = c.prefix_len as u32;
    for i in 0..16 {
        if bits == 0 {
            break;
        }
        let mask: u8 = if bits >= 8 {
            0xff
        } else {
            0xffu8 << (8 - bits)
        };
        if (addr[i] ^ c.addr[i]) & mask != 0 {
            return false;
        }
        bits = bits.saturating_sub(8);
    }
    true
}
