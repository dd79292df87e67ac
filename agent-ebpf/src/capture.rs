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

use crate::maps::{cfg, EVENTS};

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

/// Sends `ev` with the first bytes of `skb`'s packet, from its link-layer header when the
/// skb has one, else from its network header. Returns false when nothing was sent (capture
/// off, the packet unreadable, or no room in the ring): the caller then sends `ev` alone.
#[inline(always)]
pub fn deliver_with_packet(ev: &Event, skb: u64) -> bool {
    let c = &cfg().capture;
    if c.snaplen == 0 {
        return false;
    }
    let o = &cfg().offsets;
    let (Some(head), Some(data)) = (read::<u64>(skb, o.skb_head), read::<u64>(skb, c.skb_data))
    else {
        return false;
    };
    if head == 0 || data < head || data - head > 0xffff {
        return false;
    }
    let data_off = (data - head) as u32;
    let mac = read::<u16>(skb, c.skb_mac_header).unwrap_or(UNSET);
    let network = read::<u16>(skb, o.skb_network_header).unwrap_or(UNSET);
    let paged = read::<u32>(skb, c.skb_data_len).unwrap_or(0);
    let headlen = ev.len.saturating_sub(paged);
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
        return false;
    }
    let mut n = (end - start).min(c.snaplen) as usize;
    if n > SNAPLEN_MAX as usize {
        n = SNAPLEN_MAX as usize;
    }
    let Some(rec) = CAPTURED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let rec = unsafe { &mut *rec };
    let src = (head + start as u64) as *const u8;
    // SAFETY: probe-read reports failures instead of faulting; n <= the buffer's length.
    if unsafe { bpf_probe_read_kernel_buf(src, &mut rec.bytes[..n]) }.is_err() {
        return false;
    }
    rec.ev = *ev;
    rec.head = PacketHead {
        start: start as u16,
        mac,
        network,
        caplen: n as u16,
        data: data_off,
        headlen,
    };
    // SAFETY: the record is plain bytes; FIXED + n <= size_of::<Captured>().
    let bytes =
        unsafe { core::slice::from_raw_parts((rec as *const Captured).cast::<u8>(), FIXED + n) };
    EVENTS.output::<[u8]>(bytes, 0).is_ok()
}
