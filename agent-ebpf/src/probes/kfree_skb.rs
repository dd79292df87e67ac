//! `skb:kfree_skb`: every packet the kernel frees with a drop reason.
use agent_ebpf::{counter, EventKind};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, maps::StackTrace, programs::tracing::StackIdContext, EbpfContext,
};

use crate::{
    maps::{admit, bump, deliver, dev_unusable_at, scratch, wanted, STACKS},
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
    let devs = packet::fill_key(ev, skb, dev_unusable_at(location));
    crate::context::annotate(ev);
    if !wanted(ev) || !admit(ev) {
        return;
    }
    packet::fill_rest(ev, skb, &devs);
    // Where the packet died is often only in the stack (the hook that ran a netfilter verdict,
    // the tunnel that encapsulated it, the caller of a NOT_SPECIFIED free). It is the most
    // expensive step here, paid by delivered events only, which sampling bounds per key.
    ev.stack_id = stack_id(ctx, &STACKS);
    // --pcap / the flight recorder: the packet's first bytes travel with the event.
    if !crate::capture::deliver_with_packet(ev, skb) {
        deliver(ev);
    }
}

#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, map: &StackTrace) -> i32 {
    ctx.get_stackid(map, 0).map(|id| id as i32).unwrap_or(-1)
}
