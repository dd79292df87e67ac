//! `skb:kfree_skb`: every packet the kernel frees with a drop reason.
use agent_ebpf::{counter, EventKind, CTX_NETFILTER};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, maps::StackTrace, programs::tracing::StackIdContext, EbpfContext,
};

use crate::{
    maps::{admit, bump, cfg, deliver, scratch, wanted, STACKS},
    packet,
};

#[inline(always)]
pub fn on_drop<C: EbpfContext + StackIdContext>(ctx: &C, skb: u64, location: u64, reason: u32) {
    bump(counter::SEEN);
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::Drop as u8;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.location = location;
    ev.reason = reason;
    // Cheap reads first: a filtered-out or sampled-away drop costs only these and a count.
    let devs = packet::fill_key(ev, skb);
    crate::context::annotate(ev);
    if !wanted(ev) || !admit(ev) {
        return;
    }
    packet::fill_rest(ev, skb, &devs);
    // The hook of a netfilter drop, and the real caller of a NOT_SPECIFIED drop, are only in
    // the stack; take it for those reasons alone (it is the most expensive step here), and
    // not for a netfilter drop whose hook the nf_hook_slow probe already gave.
    let stack_for = &cfg().stack_reasons;
    let hook_known = ev.context & CTX_NETFILTER != 0;
    if (reason == stack_for[0] && !hook_known) || reason == stack_for[1] {
        ev.stack_id = stack_id(ctx, &STACKS);
    }
    deliver(ev);
}

#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, map: &StackTrace) -> i32 {
    ctx.get_stackid(map, 0).map(|id| id as i32).unwrap_or(-1)
}
