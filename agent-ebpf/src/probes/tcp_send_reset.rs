//! `tcp:tcp_send_reset`: the kernel answered a packet with a TCP reset. Paired in userspace
//! with the drop of the packet that caused it (closed port: NO_SOCKET + reset).
use agent_ebpf::EventKind;

use crate::{
    maps::send,
    packet::{self, Probed},
};

#[inline(always)]
pub fn on_reset(skb: u64) {
    // Resets for established sockets without an incoming packet carry no skb.
    if skb == 0 {
        return;
    }
    let p = packet::parse::<Probed>(skb, false);
    send(EventKind::RstSent, &p, |_| {});
}
