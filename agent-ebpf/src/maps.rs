//! Maps and the load-time configuration global.
use agent_ebpf::{counter, Config, Event, Offsets, ABSENT, RING_BYTES, STACK_ENTRIES};
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf, StackTrace},
};

/// Filled in by userspace before load (`EbpfLoader::set_global`); frozen afterwards, so the
/// verifier treats its fields as constants and prunes branches on them.
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: Offsets {
        skb_len: ABSENT,
        skb_dev: ABSENT,
        skb_head: ABSENT,
        skb_network_header: ABSENT,
        skb_protocol: ABSENT,
        skb_mark: ABSENT,
        skb_refdst: ABSENT,
        dev_ifindex: ABSENT,
        dev_name: ABSENT,
        dev_mtu: ABSENT,
        dev_ip_ptr: ABSENT,
        dev_ip6_ptr: ABSENT,
        dev_nd_net: ABSENT,
        net_inum: ABSENT,
        net_ipv4_devconf_all: ABSENT,
        net_ipv6_devconf_all: ABSENT,
        in_dev_cnf_data: ABSENT,
        ipv4_devconf_data: ABSENT,
        devconf_idx_forwarding: ABSENT,
        devconf_idx_rp_filter: ABSENT,
        in6_dev_cnf_forwarding: ABSENT,
        ipv6_devconf_forwarding: ABSENT,
        dst_dev: ABSENT,
        tp_kfree_skbaddr: ABSENT,
        tp_kfree_location: ABSENT,
        tp_kfree_reason: ABSENT,
        tp_icmp_skbaddr: ABSENT,
        tp_icmp_type: ABSENT,
        tp_icmp_code: ABSENT,
    },
    stack_reasons: [ABSENT; 2],
    has_reason: 1,
    _pad: 0,
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

/// Reserves a ring-buffer record starting from an all-zero event; counts the loss if full.
#[inline(always)]
pub fn reserve() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<Event>> {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event::zeroed());
            Some(entry)
        }
        None => {
            bump(counter::LOST);
            None
        }
    }
}
