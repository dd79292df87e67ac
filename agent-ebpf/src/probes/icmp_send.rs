//! `icmp:icmp_send`: the kernel answered a packet with an ICMP error. Paired in userspace with
//! the drop of the same packet, it tells a REJECT from a DROP and confirms "frag needed" was sent.
use agent_ebpf::EventKind;
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    maps::{scratch, send},
    packet,
};

#[inline(always)]
pub fn on_icmp_send(skb: u64, ty: u8, code: u8) {
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::IcmpSent as u8;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    packet::fill(ev, skb);
    // The ICMP message sent, not the offending packet's own ICMP header.
    ev.icmp_type = ty;
    ev.icmp_code = code;
    send(ev);
}
