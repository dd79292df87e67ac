//! Maps and the load-time configuration global.
use agent_ebpf::{
    counter, AggKey, AggVal, Config, Event, Filters, Offsets, AGG_ENTRIES, RING_BYTES,
    STACK_ENTRIES,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};

/// Filled in by userspace before load (`EbpfLoader::set_global`); frozen afterwards, so the
/// verifier treats its fields as constants and prunes branches on them.
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: Offsets::UNKNOWN,
    has_reason: 1,
    rst_has_skb: 0,
    sample_per_sec: 0,
    context: 0,
    xt_skb_arg: 0,
    xt_table_arg: 0,
    filters: Filters::NONE,
    capture: agent_ebpf::Capture::OFF,
};

/// The configuration as the verifier sees it: a read from the frozen `.rodata` map.
#[inline(always)]
pub fn cfg() -> &'static Config {
    // SAFETY: CONFIG is a plain static. Reading its address through a volatile load stops the
    // compiler from folding the compiled-in defaults, without copying the struct to the stack.
    unsafe { core::ptr::read_volatile(&&CONFIG) }
}

/// A `Config` flag (u32 in the ABI for alignment) as a bool.
#[inline(always)]
pub fn enabled(flag: u32) -> bool {
    flag != 0
}

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// `[start, end)` of the code of the function where `skb->dev` of a freed packet holds
/// something else (fragments purged from a reassembly queue keep their rbtree node there),
/// written by userspace once it has read the kernel's symbols; `[0, 0]` until then.
#[map]
pub static NO_DEV_AT: Array<[u64; 2]> = Array::with_max_entries(1, 0);

/// Whether `location` is inside [`NO_DEV_AT`].
#[inline(always)]
pub fn dev_unusable_at(location: u64) -> bool {
    match NO_DEV_AT.get(0) {
        Some(r) => location >= r[0] && location < r[1],
        None => false,
    }
}

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

/// Exact drop counts by key, per CPU (see [`AggKey`]). A plain hash, not LRU: LRU upkeep
/// costs every drop, and keys are few (reason x location x device x netns x protocol). When
/// it is full, new keys are delivered uncounted and `AGG_FULL` says so.
#[map]
pub static AGG: PerCpuHashMap<AggKey, AggVal> = PerCpuHashMap::with_max_entries(AGG_ENTRIES, 0);

/// Whether an event passes the kernel-side filters (counting it when it does not).
#[inline(always)]
pub fn wanted(ev: &Event) -> bool {
    let pass = crate::filter::passes(ev);
    if !pass {
        bump(counter::FILTERED);
    }
    pass
}

/// Sends a finished event if it passes the filters.
#[inline(always)]
pub fn send(ev: &Event) {
    if wanted(ev) {
        output(ev);
    }
}

#[inline(always)]
fn output(ev: &Event) -> bool {
    if EVENTS.output::<Event>(ev, 0).is_err() {
        bump(counter::LOST);
        return false;
    }
    true
}

/// For drops that passed the filters: counts the drop under its key (exactly) and says
/// whether its event fits the per-key sampling budget; what does not fit is counted, per key,
/// as sampled out.
#[inline(always)]
pub fn admit(ev: &Event) -> bool {
    let key = AggKey::of(ev);
    let val = match AGG.get_ptr_mut(&key) {
        Some(v) => v,
        None => {
            let _ = AGG.insert(&key, &AggVal::default(), 0);
            match AGG.get_ptr_mut(&key) {
                Some(v) => v,
                // The table is full: still deliver the event, uncounted by key.
                None => {
                    bump(counter::AGG_FULL);
                    return true;
                }
            }
        }
    };
    // SAFETY: per-CPU value of this CPU, valid for the program's run.
    let val = unsafe { &mut *val };
    val.packets += 1;
    val.bytes += ev.len as u64;
    let budget = cfg().sample_per_sec as u64;
    if budget != 0 {
        if ev.ts_ns.wrapping_sub(val.window_ns) >= 1_000_000_000 {
            val.window_ns = ev.ts_ns;
            val.sent = 0;
        }
        if val.sent >= budget {
            val.sampled_out += 1;
            return false;
        }
        val.sent += 1;
    }
    true
}

/// Sends an admitted drop event; a full ring buffer is counted against its key.
#[inline(always)]
pub fn deliver(ev: &Event) {
    if !output(ev) {
        if let Some(val) = AGG.get_ptr_mut(&AggKey::of(ev)) {
            // SAFETY: per-CPU value of this CPU.
            unsafe { (*val).lost += 1 };
        }
    }
}
