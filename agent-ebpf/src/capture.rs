//! The dropped packet's first bytes (`--pcap`, `serve`'s flight recorder).
//!
//! Read only for drop events that are being delivered (after the filters and the sampling
//! budget said so): a drop that is only counted never gets here. The event and the bytes
//! leave in one ring record, the [`Event`] first (so a reader that ignores the rest sees a
//! plain event), then a [`PacketHead`] and `caplen` bytes.
use agent_ebpf::{Event, PacketHead, ABSENT, SNAPLEN_MAX};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::map,
    maps::PerCpuArray,
};

use crate::maps::{blank, bump, cfg, Counter, EVENTS};

/// One ring record: the event, where its bytes come from, the bytes.
#[repr(C)]
pub struct Captured {
    ev: Event,
    head: PacketHead,
    bytes: [u8; SNAPLEN_MAX as usize],
}

const FIXED: usize = core::mem::size_of::<Event>() + core::mem::size_of::<PacketHead>();
/// `skb->mac_header` / `network_header` when not set (`(u16)~0U`).
const UNSET: u16 = u16::MAX;
/// The farthest a link-layer header may start before the network header to be taken as one
/// (Ethernet is 14 bytes, 18 or 22 with VLAN tags).
const MAX_LINK_HEADER: u16 = 64;

#[map]
static CAPTURED: PerCpuArray<Captured> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == ABSENT {
        return None;
    }
    // SAFETY: probe-read of kernel memory; failures are reported, not faults.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

/// With capture on, sends a delivered drop's event, built by `build` in this CPU's capture
/// record, followed by the first bytes of `skb`'s packet (`len`: `skb->len`), from its
/// link-layer header when the skb has one, else from its network header. Returns `None` when
/// capture is off or the packet is unreadable: the caller then builds the event alone in place
/// in the ring buffer, without this record's copy. `Some(false)`: the ring buffer had no room
/// (counted as lost).
#[inline(always)]
pub fn send_with_packet(skb: u64, len: u32, build: impl FnOnce(&mut Event)) -> Option<bool> {
    if cfg().capture.snaplen == 0 {
        return None;
    }
    let rec = CAPTURED.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let rec = unsafe { &mut *rec };
    // One size for the record (the bytes are copied first), as the verifier of older kernels
    // (6.1) tracks a size chosen between two expressions less well.
    let n = copy_packet(rec, skb, len)?;
    blank(&mut rec.ev);
    build(&mut rec.ev);
    // SAFETY: the record is plain bytes; FIXED + n <= size_of::<Captured>().
    let bytes =
        unsafe { core::slice::from_raw_parts((rec as *const Captured).cast::<u8>(), FIXED + n) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        bump(Counter::Lost);
        return Some(false);
    }
    Some(true)
}

/// Copies the packet's first bytes and where they come from into `rec`; returns how many
/// (`None`: the packet is unreadable).
#[inline(always)]
fn copy_packet(rec: &mut Captured, skb: u64, len: u32) -> Option<usize> {
    let c = &cfg().capture;
    let o = &cfg().offsets;
    let (Some(head), Some(data)) = (read::<u64>(skb, o.skb_head), read::<u64>(skb, c.skb_data))
    else {
        return None;
    };
    if head == 0 || data < head || data - head > 0xffff {
        return None;
    }
    let data_off = (data - head) as u32;
    let mac = read::<u16>(skb, c.skb_mac_header).unwrap_or(UNSET);
    let network = read::<u16>(skb, o.skb_network_header).unwrap_or(UNSET);
    let paged = read::<u32>(skb, c.skb_data_len).unwrap_or(0);
    let headlen = len.saturating_sub(paged);
    let start = if mac != UNSET
        && (network == UNSET || (mac <= network && network - mac <= MAX_LINK_HEADER))
    {
        mac as u32
    } else if network != UNSET {
        network as u32
    } else {
        data_off
    };
    // Only the linear area is read: bytes past it belong to other memory.
    let end = data_off + headlen;
    if start >= end {
        return None;
    }
    let mut n = (end - start).min(c.snaplen) as usize;
    if n > SNAPLEN_MAX as usize {
        n = SNAPLEN_MAX as usize;
    }
    let src = (head + start as u64) as *const u8;
    // SAFETY: probe-read reports failures instead of faulting; n <= the buffer's length.
    if unsafe { bpf_probe_read_kernel_buf(src, &mut rec.bytes[..n]) }.is_err() {
        return None;
    }
    rec.head = PacketHead {
        start: start as u16,
        mac,
        network,
        caplen: n as u16,
        data: data_off,
        headlen,
    };
    Some(n)
}
