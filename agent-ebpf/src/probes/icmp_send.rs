//! `icmp:icmp_send`: the kernel answered a packet with an ICMP error. Paired in userspace with
//! the drop of the same packet, it tells a REJECT from a DROP and confirms "frag needed" was sent.
use agent_ebpf::EventKind;

use crate::{
    maps::send,
    packet::{self, Probed},
};

#[inline(always)]
pub fn on_icmp_send(skb: u64, ty: u8, code: u8) {
    let p = packet::parse::<Probed>(skb, false);
    send(EventKind::IcmpSent, &p, |ev| {
        // The ICMP message sent, not the offending packet's own ICMP header.
        ev.icmp_type = ty;
        ev.icmp_code = code;
    });
}
