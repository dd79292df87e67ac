//! `skb:kfree_skb`: every packet the kernel frees with a drop reason.
//!
//! This runs for every drop, so it does the least it can before it knows whether an event will
//! be sent: the packet's key fields go to the stack (plain loads through the typed `skb` where
//! the hook provides one), the filters look at them there, the count goes to this CPU's slot of
//! the aggregation table, and only an event that fits the sampling budget is built, in place in
//! the ring buffer, with everything else (names, sysctls, context, stack); with capture on, in
//! the capture record instead, followed by the packet's first bytes.
use agent_ebpf::{AggKey, Event, EventKind, FLAG_IPV4, FLAG_IPV6};
use aya_ebpf::{macros::map, maps::PerCpuArray, programs::tracing::StackIdContext, EbpfContext};

use crate::{
    context::{self, Frame},
    maps::{admit, agg_slot, context_on, dev_unusable_at, event, now, reserve, state, STACKS},
    packet::{self, Packet, Reader},
};

#[inline(always)]
pub fn on_drop<R: Reader, C: EbpfContext + StackIdContext>(
    ctx: &C,
    skb: u64,
    location: u64,
    reason: u32,
) {
    let Some(state) = state() else { return };
    state.seen += 1;
    // SAFETY: this CPU's scratch value, ours for the program's run.
    let Some(a) = SCRATCH.get_ptr_mut(0).map(|a| unsafe { &mut *a }) else {
        return;
    };
    packet::parse_into::<R>(&mut a.p, skb, dev_unusable_at(location));
    a.has_nf = 0;
    if !crate::filter::passes(&a.p) {
        state.filtered += 1;
        return;
    }
    // Drops at different netfilter hooks share a location (nf_hook_slow) but not a cause: the
    // hook is part of the key where nf_hook_slow's probe is attached.
    if context_on() {
        if let Some(f) = context::netfilter(skb) {
            f.copy_to(&mut a.nf);
            a.has_nf = 1;
        }
    }
    a.key = AggKey {
        location,
        reason,
        netns: a.p.netns,
        ifindex: a.p.ifindex,
        family: a.p.flags & (FLAG_IPV4 | FLAG_IPV6),
        l4_proto: a.p.l4_proto,
        nf_hook: if a.has_nf != 0 {
            a.nf.hook.wrapping_add(1)
        } else {
            0
        },
        _pad: 0,
    };
    let mut slot = agg_slot(&a.key);
    if !admit(&mut slot, a.p.len) {
        return;
    }
    // Where the packet died is often only in the stack (the hook that ran a netfilter verdict,
    // the tunnel that encapsulated it, the caller of a NOT_SPECIFIED free). It is the most
    // expensive step here, paid by sent events only, which sampling bounds per key.
    a.stack_id = ctx
        .get_stackid(&STACKS, 0)
        .map(|id| id as i32)
        .unwrap_or(-1);
    if dropscope_send_drop(a) == 0 {
        if let Some(s) = slot {
            s.val.lost += 1;
        }
    }
}

/// Per-CPU room for a drop's packet facts and key (the stack is too small for them and the
/// verifier's paths).
#[map]
static SCRATCH: PerCpuArray<Admitted> = PerCpuArray::with_max_entries(1, 0);

/// What an admitted drop's event is built from, by value (the verifier sees a global
/// function's pointer argument as plain memory: no pointers to follow inside).
#[repr(C)]
pub struct Admitted {
    pub p: Packet,
    pub key: AggKey,
    /// What nf_hook_slow's probe recorded (valid when `has_nf` is 1).
    pub nf: Frame,
    pub has_nf: u32,
    pub stack_id: i32,
}

/// Builds and sends the event of an admitted drop; 0 when the ring buffer had no room.
///
/// A global function: the verifier checks it once, on its own, instead of once for every
/// path that reaches it (the packet parser's branches multiply those), and most drops of a
/// storm never run it, so the code they do run stays together.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dropscope_send_drop(a: *const Admitted) -> i32 {
    // The verifier treats the argument as possibly NULL.
    if a.is_null() {
        return 0;
    }
    // SAFETY: the caller passes its own, initialised value.
    let a = unsafe { &*a };
    // --pcap / the flight recorder: the packet's first bytes travel with the event.
    if let Some(sent) = crate::capture::send_with_packet(a.p.skb, a.p.len, |ev| build(ev, a)) {
        return sent as i32;
    }
    let Some(mut entry) = reserve() else {
        return 0;
    };
    build(event(&mut entry), a);
    entry.submit(0);
    1
}

/// Fills a blank event from an admitted drop.
#[inline(always)]
fn build(ev: &mut Event, a: &Admitted) {
    ev.kind = EventKind::Drop as u8;
    ev.ts_ns = now();
    ev.location = a.key.location;
    ev.reason = a.key.reason;
    ev.stack_id = a.stack_id;
    packet::fill_event(ev, &a.p);
    // The netfilter part comes from `nf`, so the event agrees with its key (userspace maps
    // events to keys with AggKey::of).
    let nf = (a.has_nf != 0).then_some(a.nf);
    context::annotate(ev, nf, ev.ts_ns);
}
