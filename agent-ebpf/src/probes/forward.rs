//! `ip_forward`/`ip6_forward`: marks a packet as forwarded, with its ingress device, for drops
//! anywhere on the forwarding path (TTL, MTU, FORWARD chain, xfrm, egress qdisc). `ip_error`:
//! the route error behind a forwarding-disabled / no-route drop.
use crate::{
    context::{now, pop, push, read, set_route_error, Frame, Stack},
    maps::cfg,
};

/// Entry: `ip_forward(skb)` / `ip6_forward(skb)`.
#[inline(always)]
pub fn enter(skb: u64) {
    let o = &cfg().offsets;
    let dev = read::<u64>(skb, o.skb_dev).unwrap_or(0);
    push(
        Stack::Forward,
        Frame {
            skb,
            aux: 0,
            ts_ns: now(),
            ifindex: read::<u32>(dev, o.dev_ifindex).unwrap_or(0),
            out_ifindex: 0,
            hook: 0,
            pf: 0,
            _pad: [0; 6],
            ifname: read::<[u8; 16]>(dev, o.dev_name).unwrap_or([0; 16]),
        },
    );
}

/// Exit: forwarding of the packet is over (sent, queued or dropped).
#[inline(always)]
pub fn exit() {
    let _ = pop(Stack::Forward);
}

/// Entry: `ip_error(skb)`, which frees the packet after counting (and maybe answering) it.
#[inline(always)]
pub fn route_error(skb: u64) {
    let o = &cfg().offsets;
    if let Some(err) = read::<i16>(crate::packet::skb_dst(skb), o.dst_error) {
        set_route_error(skb, err as i32);
    }
}
