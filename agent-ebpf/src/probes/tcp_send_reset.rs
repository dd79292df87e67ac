//! `tcp:tcp_send_reset`: the kernel answered a packet with a TCP reset. Paired in userspace
//! with the drop of the packet that caused it (closed port: NO_SOCKET + reset).
use agent_ebpf::EventKind;
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    maps::{scratch, send},
    packet,
};

#[inline(always)]
pub fn on_reset(skb: u64) {
    // Resets for established sockets without an incoming packet carry no skb.
    if skb == 0 {
        return;
    }
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::RstSent as u8;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    packet::fill(ev, skb);
    send(ev);
}
