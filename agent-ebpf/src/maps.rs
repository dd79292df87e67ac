//! Maps and the load-time configuration global.
use agent_ebpf::{counter, Config, Event, Filters, Offsets, ABSENT, RING_BYTES, STACK_ENTRIES};
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf, StackTrace},
};

/// Filled in by userspace before load (`EbpfLoader::set_global`); frozen afterwards, so the
/// verifier treats its fields as constants and prunes branches on them.
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: Offsets::UNKNOWN,
    stack_reasons: [ABSENT; 2],
    has_reason: 1,
    rst_has_skb: 0,
    filters: Filters::NONE,
};

/// The configuration as the verifier sees it: a read from the frozen `.rodata` map.
#[inline(always)]
pub fn cfg() -> &'static Config {
    // SAFETY: CONFIG is a plain static. Reading its address through a volatile load stops the
    // compiler from folding the compiled-in defaults, without copying the struct to the stack.
    unsafe { core::ptr::read_volatile(&&CONFIG) }
}

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Adds one to a per-CPU counter (no atomics needed: the slot belongs to this CPU).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *slot += 1 };
    }
}

/// Per-CPU scratch space where an event is built and filtered before it costs a ring-buffer slot.
#[map]
pub static SCRATCH: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed event in this CPU's scratch slot.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Event> {
    let ev = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let ev = unsafe { &mut *ev };
    *ev = Event::zeroed();
    Some(ev)
}

/// Sends a finished event if it passes the filters; counts it as filtered or lost otherwise.
#[inline(always)]
pub fn send(ev: &Event) {
    if !crate::filter::passes(ev) {
        bump(counter::FILTERED);
        return;
    }
    if EVENTS.output::<Event>(ev, 0).is_err() {
        bump(counter::LOST);
    }
}
