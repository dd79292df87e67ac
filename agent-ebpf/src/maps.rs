//! Maps and the load-time configuration global.
use agent_ebpf::{
    agg_home, AggBucket, AggKey, AggSlot, Config, CpuState, Event, EventKind, Filters, Knobs,
    Offsets, AGG_BUCKETS, AGG_BUCKET_SLOTS, AGG_PROBES, RING_BYTES, STACK_ENTRIES,
};
use aya_ebpf::{
    macros::map,
    maps::{ring_buf::RingBufEntry, Array, PerCpuArray, RingBuf, StackTrace},
};

use crate::packet::Packet;

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

/// This CPU's counters (see [`CpuState`]).
#[map]
pub static COUNTERS: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// What userspace sets at run time (see [`Knobs`]).
#[map]
pub static KNOBS: Array<Knobs> = Array::with_max_entries(1, 0);

/// This CPU's counters.
#[inline(always)]
pub fn state() -> Option<&'static mut CpuState> {
    // SAFETY: per-CPU value of this CPU, valid for the program's run (no atomics needed).
    COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Which counter of [`CpuState`] to add one to.
#[derive(Clone, Copy)]
pub enum Counter {
    Lost,
    Filtered,
    AggFull,
}

/// Adds one to a counter of this CPU.
#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(s) = state() {
        match counter {
            Counter::Lost => s.lost += 1,
            Counter::Filtered => s.filtered += 1,
            Counter::AggFull => s.agg_full += 1,
        }
    }
}

/// Whether `location` is where `skb->dev` is no device (see [`Knobs::no_dev_start`]).
#[inline(always)]
pub fn dev_unusable_at(location: u64) -> bool {
    match KNOBS.get(0) {
        Some(k) => location >= k.no_dev_start && location < k.no_dev_end,
        None => false,
    }
}

/// Exact drop counts by key, per CPU (see [`AggSlot`]): open addressing in a per-CPU array,
/// with the key hashed in the program, instead of a hash map whose lookups and inserts are
/// helper calls that hash and lock. When a key finds no slot, its drops are delivered uncounted
/// by key and `AGG_FULL` says so.
#[map]
pub static AGG: PerCpuArray<AggBucket> = PerCpuArray::with_max_entries(AGG_BUCKETS, 0);

/// Whether the context probes may have recorded frames (userspace loads them with --context).
#[inline(always)]
pub fn context_on() -> bool {
    enabled(cfg().context)
}

/// The key as the three words it is made of (little-endian layout, no padding).
#[inline(always)]
fn words(key: &AggKey) -> [u64; 3] {
    // SAFETY: AggKey is #[repr(C)], 24 bytes, 8-aligned, every bit pattern valid.
    unsafe { core::ptr::read(key as *const AggKey as *const [u64; 3]) }
}

/// This CPU's slot for `key`, claiming a free one if needed.
#[inline(always)]
pub fn agg_slot(key: &AggKey) -> Option<&'static mut AggSlot> {
    let w = words(key);
    let home = agg_home(&w);
    let bucket = AGG.get_ptr_mut(home / AGG_BUCKET_SLOTS)?;
    // SAFETY: per-CPU value of this CPU, valid for the program's run.
    let bucket = unsafe { &mut *bucket };
    for i in 0..AGG_PROBES {
        let at = (home.wrapping_add(i) & (AGG_BUCKET_SLOTS - 1)) as usize;
        let slot = bucket.slots.get_mut(at)?;
        let have = words(&slot.key);
        if have == w {
            return Some(slot);
        }
        if have[0] == 0 {
            // A free slot (no drop has location 0): the key's from now on. The location goes
            // in last, so a reader that sees it (x86 keeps stores in order) sees the rest.
            let at = &mut slot.key as *mut AggKey as *mut u64;
            // SAFETY: three words inside this CPU's slot.
            unsafe {
                core::ptr::write_volatile(at.add(1), w[1]);
                core::ptr::write_volatile(at.add(2), w[2]);
                core::ptr::write_volatile(at, w[0]);
            }
            return Some(slot);
        }
    }
    None
}

/// Counts a drop that passed the filters under its slot (exactly) and says whether its event
/// fits the per-key sampling budget; what does not fit is counted, per key, as sampled out.
/// Without a slot (table full) the event is sent, uncounted by key.
#[inline(always)]
pub fn admit(slot: &mut Option<&'static mut AggSlot>, len: u32) -> bool {
    let Some(slot) = slot else {
        bump(Counter::AggFull);
        return true;
    };
    let val = &mut slot.val;
    val.packets += 1;
    val.bytes += len as u64;
    let budget = cfg().sample_per_sec;
    if budget == 0 {
        return true;
    }
    // Over the budget (a storm), reading the clock for every drop would cost more than the
    // rest: the window is checked once per tick (jiffies is a plain load), which ends it at
    // most a tick late.
    if val.sent >= budget {
        // SAFETY: no preconditions (inlined by the verifier on 64-bit).
        let tick = unsafe { aya_ebpf::helpers::bpf_jiffies64() } as u32;
        if tick == val.tick {
            val.sampled_out += 1;
            return false;
        }
        val.tick = tick;
    }
    let now = now();
    if now.wrapping_sub(val.window_ns) >= 1_000_000_000 {
        val.window_ns = now;
        val.sent = 0;
    }
    if val.sent >= budget {
        val.sampled_out += 1;
        return false;
    }
    val.sent += 1;
    true
}

/// CLOCK_MONOTONIC (events' timestamps, sampling windows, context frames' ages).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// A blank event reserved in the ring buffer (see [`blank`]), or `None` (counted as lost) when
/// it is full.
#[inline(always)]
pub fn reserve() -> Option<RingBufEntry<Event>> {
    let mut entry = match EVENTS.reserve::<Event>(0) {
        Some(e) => e,
        None => {
            bump(Counter::Lost);
            return None;
        }
    };
    blank(entry.as_mut_ptr());
    Some(entry)
}

/// Writes an event with nothing known into `at`: zeroed word by word (a bulk fill is a byte
/// loop in BPF), then the fields whose "unknown" is not zero.
#[inline(always)]
pub fn blank(at: *mut Event) {
    let words = at as *mut u64;
    for i in 0..core::mem::size_of::<Event>() / 8 {
        // SAFETY: inside the caller's record, which is 8-aligned and a multiple of 8 long.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte is initialised now, and zero is a valid Event.
    let ev = unsafe { &mut *at };
    ev.stack_id = -1;
    ev.dev_forwarding = -1;
    ev.all_forwarding = -1;
    ev.dev_rp_filter = -1;
    ev.all_rp_filter = -1;
    ev.dev6_forwarding = -1;
    ev.all6_forwarding = -1;
}

/// The event inside a reserved entry (written by [`reserve`]).
#[inline(always)]
pub fn event(entry: &mut RingBufEntry<Event>) -> &mut Event {
    // SAFETY: `reserve` initialised it.
    unsafe { entry.assume_init_mut() }
}

/// Sends an event about `p` (ICMP errors, resets: no sampling, rare) if it passes the
/// filters; `extra` adds what its probe knows.
#[inline(always)]
pub fn send(kind: EventKind, p: &Packet, extra: impl FnOnce(&mut Event)) {
    if !crate::filter::passes(p) {
        bump(Counter::Filtered);
        return;
    }
    let Some(mut entry) = reserve() else { return };
    let ev = event(&mut entry);
    ev.kind = kind as u8;
    ev.ts_ns = now();
    crate::packet::fill_event(ev, p);
    extra(ev);
    entry.submit(0);
}
