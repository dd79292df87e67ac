//! What the context probes (nf_hook_slow, ip_forward, ip_error, the ruleset verdicts) know
//! about the packet being processed on this CPU, for the drop probe to pick up.
//!
//! Entry probes push a frame and exit probes pop it; a drop inside looks for its own `skb` in
//! the frames. Frames are per CPU and stacked because the hooks nest (a REJECT inside FORWARD
//! sends an ICMP error through OUTPUT before the forwarded packet is freed). A frame older
//! than [`STALE_NS`] is ignored: a task preempted inside a hook can leave a frame behind on a
//! CPU it no longer runs on, and its skb address may later be reused.
use agent_ebpf::{
    Event, CTX_FORWARD, CTX_NETFILTER, CTX_ROUTE_ERROR, CTX_RULESET, ENGINE_NFT, ENGINE_XT,
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::map,
    maps::PerCpuArray,
};

use crate::maps::{cfg, enabled};
pub use crate::packet::read;

const DEPTH: usize = 4;
const STALE_NS: u64 = 50_000_000;

/// One packet inside a hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    pub skb: u64,
    /// Probe-specific pointer kept for the exit side (the ruleset of a verdict probe).
    pub aux: u64,
    pub ts_ns: u64,
    pub ifindex: u32,
    pub out_ifindex: u32,
    pub hook: u8,
    pub pf: u8,
    pub _pad: [u8; 6],
    pub ifname: [u8; 16],
}

impl Frame {
    /// Copies the frame word by word (a bulk copy is a byte loop in BPF).
    #[inline(always)]
    pub fn copy_to(&self, dst: &mut Frame) {
        let (from, to) = (
            self as *const Frame as *const u64,
            dst as *mut Frame as *mut u64,
        );
        for i in 0..core::mem::size_of::<Frame>() / 8 {
            // SAFETY: both are whole, 8-aligned frames.
            unsafe { to.add(i).write_volatile(from.add(i).read_volatile()) };
        }
    }
}

#[repr(C)]
pub struct Frames {
    depth: u32,
    _pad: u32,
    slots: [Frame; DEPTH],
}

/// Which stack a probe uses.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Stack {
    Forward = 0,
    Netfilter = 1,
    Ruleset = 2,
    Icmp6 = 3,
}

// Userspace empties the hot stacks by size and index (agent_ebpf::FRAMES_VALUE_SIZE,
// HOT_FRAME_STACKS).
const _: () = assert!(core::mem::size_of::<Frames>() == agent_ebpf::FRAMES_VALUE_SIZE);
const _: () = assert!(
    Stack::Forward as u32 == agent_ebpf::HOT_FRAME_STACKS[0]
        && Stack::Netfilter as u32 == agent_ebpf::HOT_FRAME_STACKS[1]
        && Stack::Ruleset as u32 == agent_ebpf::HOT_FRAME_STACKS[2]
);

#[map]
static FRAMES: PerCpuArray<Frames> = PerCpuArray::with_max_entries(4, 0);

/// The last "this packet dies" facts, set just before the packet is freed.
#[repr(C)]
pub struct Last {
    rs_skb: u64,
    rs_ts_ns: u64,
    rs_table: [u8; 32],
    route_error: i32,
    _pad: u32,
    err_skb: u64,
    err_ts_ns: u64,
}

#[map]
static LAST: PerCpuArray<Last> = PerCpuArray::with_max_entries(1, 0);

/// Slot `i` of a stack, if `i` is in bounds.
#[inline(always)]
fn slot(f: &mut Frames, i: usize) -> Option<&mut Frame> {
    f.slots.get_mut(i)
}

#[inline(always)]
fn frames(stack: Stack) -> Option<&'static mut Frames> {
    // SAFETY: per-CPU slot of this CPU, valid for the program's run.
    FRAMES.get_ptr_mut(stack as u32).map(|p| unsafe { &mut *p })
}

/// Pushes a frame for `skb`; a full stack keeps counting depth so pops stay balanced.
#[inline(always)]
pub fn push(stack: Stack, frame: Frame) {
    let Some(f) = frames(stack) else { return };
    let depth = f.depth as usize;
    if let Some(s) = slot(f, depth) {
        *s = frame;
    }
    // A depth this large means pops were missed (e.g. probes attached mid-call): start over.
    f.depth = if depth >= 2 * DEPTH {
        0
    } else {
        depth as u32 + 1
    };
}

/// Pops the innermost frame, returning it when it was stored.
#[inline(always)]
pub fn pop(stack: Stack) -> Option<Frame> {
    let f = frames(stack)?;
    if f.depth == 0 {
        return None;
    }
    f.depth -= 1;
    // Read back rather than reuse `depth - 1`: the compiler would bounds-check the old value,
    // which older verifiers cannot relate to the index.
    // SAFETY: a plain u32 in this CPU's map value.
    let depth = unsafe { core::ptr::read_volatile(&f.depth) } as usize;
    let s = slot(f, depth)?;
    let frame = *s;
    s.skb = 0;
    Some(frame)
}

/// The innermost live frame of `stack`, if it is younger than [`STALE_NS`].
#[inline(always)]
pub fn top(stack: Stack) -> Option<Frame> {
    let f = frames(stack)?;
    let depth = f.depth as usize;
    if depth == 0 || depth > DEPTH {
        return None;
    }
    let s = slot(f, depth - 1)?;
    (s.skb != 0 && now().wrapping_sub(s.ts_ns) < STALE_NS).then_some(*s)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The innermost live frame of `stack` for `skb` (with `hook` == `tag` when given).
#[inline(always)]
fn find(stack: Stack, skb: u64, now: u64, tag: Option<u8>) -> Option<&'static Frame> {
    let f = frames(stack)?;
    let depth = (f.depth as usize).min(DEPTH);
    for i in (0..DEPTH).rev() {
        if i < depth {
            let s = &f.slots[i];
            if s.skb == skb
                && now.saturating_sub(s.ts_ns) < STALE_NS
                && tag.is_none_or(|t| s.hook == t)
            {
                return Some(s);
            }
        }
    }
    None
}

/// What nf_hook_slow's probe recorded about `skb`: the hook is part of a drop's key.
#[inline(always)]
pub fn netfilter(skb: u64) -> Option<&'static Frame> {
    // Outside a netfilter hook (most drops) the stack is empty: no clock read for the age.
    if frames(Stack::Netfilter)?.depth == 0 {
        return None;
    }
    find(Stack::Netfilter, skb, crate::maps::now(), None)
}

/// Copies a NUL-terminated kernel string into `out` (empty when unreadable).
#[inline(always)]
fn read_str(src: u64, out: &mut [u8; 32]) {
    if src != 0 {
        // SAFETY: probe-read of a kernel string; failures leave the buffer as it was.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(src as *const u8, out) };
    }
}

/// Records that an x_tables table (its inline `name` at `table_name`) returned DROP for `skb`,
/// which is freed right after.
#[inline(always)]
pub fn set_ruleset_drop(skb: u64, table_name: u64) {
    let Some(last) = LAST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot of this CPU.
    let last = unsafe { &mut *last };
    last.rs_skb = skb;
    last.rs_ts_ns = now();
    last.rs_table = [0; 32];
    read_str(table_name, &mut last.rs_table);
}

/// Records the route error of a packet `ip_error` is about to free.
#[inline(always)]
pub fn set_route_error(skb: u64, error: i32) {
    let Some(last) = LAST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot of this CPU.
    let last = unsafe { &mut *last };
    last.err_skb = skb;
    last.err_ts_ns = now();
    last.route_error = error;
}

/// Adds what the context probes know about `ev.skb` to a drop event that will be sent; `nf`
/// is what [`netfilter`] found for its key.
#[inline(always)]
pub fn annotate(ev: &mut Event, nf: Option<Frame>, now: u64) {
    if !enabled(cfg().context) {
        return;
    }
    let skb = ev.skb;
    let t = now;
    if let Some(f) = nf {
        ev.context |= CTX_NETFILTER;
        ev.nf_hook = f.hook;
        ev.nf_pf = f.pf;
        ev.nf_in_ifindex = f.ifindex;
        ev.nf_out_ifindex = f.out_ifindex;
    }
    if let Some(f) = find(Stack::Forward, skb, t, None) {
        ev.context |= CTX_FORWARD;
        ev.in_ifindex = f.ifindex;
        ev.in_ifname = f.ifname;
    }
    // nftables frees the packet inside nft_do_chain: its base chain is still on the stack.
    if let Some(f) = find(Stack::Ruleset, skb, t, Some(ENGINE_NFT)) {
        let o = &cfg().offsets;
        ev.context |= CTX_RULESET;
        ev.rs_engine = ENGINE_NFT;
        let table = read::<u64>(f.aux, o.nft_chain_table).unwrap_or(0);
        read_str(
            read::<u64>(table, o.nft_table_name).unwrap_or(0),
            &mut ev.rs_table,
        );
        read_str(
            read::<u64>(f.aux, o.nft_chain_name).unwrap_or(0),
            &mut ev.rs_chain,
        );
    }
    let Some(last) = LAST.get_ptr(0) else { return };
    // SAFETY: per-CPU slot of this CPU.
    let last = unsafe { &*last };
    if ev.context & CTX_RULESET == 0
        && last.rs_skb == skb
        && t.saturating_sub(last.rs_ts_ns) < STALE_NS
    {
        ev.context |= CTX_RULESET;
        ev.rs_engine = ENGINE_XT;
        ev.rs_table = last.rs_table;
    }
    if last.err_skb == skb && t.saturating_sub(last.err_ts_ns) < STALE_NS {
        ev.context |= CTX_ROUTE_ERROR;
        ev.route_error = last.route_error;
    }
}
