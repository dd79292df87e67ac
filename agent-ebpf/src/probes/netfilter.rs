//! `nf_hook_slow`: the hook, family and devices of a packet inside netfilter, for a drop there.
use crate::{
    context::{now, push, read, Frame, Stack},
    maps::cfg,
};

/// Entry: `nf_hook_slow(skb, state, ...)`.
#[inline(always)]
pub fn enter(skb: u64, state: u64) {
    let o = &cfg().offsets;
    let dev_index = |dev: u64| read::<u32>(dev, o.dev_ifindex).unwrap_or(0);
    push(
        Stack::Netfilter,
        Frame {
            skb,
            aux: 0,
            ts_ns: now(),
            ifindex: dev_index(read::<u64>(state, o.nf_state_in).unwrap_or(0)),
            out_ifindex: dev_index(read::<u64>(state, o.nf_state_out).unwrap_or(0)),
            hook: read::<u8>(state, o.nf_state_hook).unwrap_or(u8::MAX),
            pf: read::<u8>(state, o.nf_state_pf).unwrap_or(0),
            _pad: [0; 6],
            ifname: [0; 16],
        },
    );
}

/// Exit: the packet has passed (or died in) the hook.
#[inline(always)]
pub fn exit() {
    let _ = crate::context::pop(Stack::Netfilter);
}
