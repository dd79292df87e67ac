//! `icmp6_send`: the kernel is answering a packet with an ICMPv6 error. There is no ICMPv6
//! tracepoint, and `icmp6_send` is entered before its rate limit; the error is really sent
//! only when it reaches `icmpv6_push_pending_frames` inside that call. So the entry keeps
//! (skb, type, code) in a frame and the push reports it, as `icmp:icmp_send` does for IPv4.
use agent_ebpf::EventKind;

use crate::{
    context::{now, pop, push, top, Frame, Stack},
    maps::send,
    packet::{self, Probed},
};

/// Entry: `icmp6_send(skb, type, code, ...)`.
#[inline(always)]
pub fn enter(skb: u64, ty: u8, code: u8) {
    push(
        Stack::Icmp6,
        Frame {
            skb,
            aux: (u64::from(ty) << 8) | u64::from(code),
            ts_ns: now(),
            ifindex: 0,
            out_ifindex: 0,
            hook: 0,
            pf: 0,
            _pad: [0; 6],
            ifname: [0; 16],
        },
    );
}

/// `icmpv6_push_pending_frames`: the error built for the innermost `icmp6_send` leaves now.
/// (Echo replies and ping sockets push too, outside `icmp6_send`: no frame, nothing sent.)
#[inline(always)]
pub fn sent() {
    let Some(f) = top(Stack::Icmp6) else { return };
    let p = packet::parse::<Probed>(f.skb, false);
    send(EventKind::Icmp6Sent, &p, |ev| {
        ev.icmp_type = (f.aux >> 8) as u8;
        ev.icmp_code = f.aux as u8;
    });
}

/// Exit of `icmp6_send`.
#[inline(always)]
pub fn exit() {
    let _ = pop(Stack::Icmp6);
}
