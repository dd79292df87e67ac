//! The ABI shared by the eBPF programs and the userspace agent.
//!
//! Everything the kernel side needs to know about the running kernel (struct member offsets,
//! tracepoint field offsets, drop-reason values) arrives in [`Config`], resolved by userspace from
//! the kernel's own BTF and tracefs. Nothing here is specific to one kernel version.
//!
//! Every type is `#[repr(C)]`, has no padding holes that differ between targets, and is shared
//! byte for byte through a `.rodata` global or a ring buffer.
#![no_std]

/// Marker for "this offset or value does not exist on the running kernel".
pub const ABSENT: u32 = u32::MAX;

/// Declares [`Offsets`] from one list: each offset read from a BTF struct member is named once,
/// with its struct and member path, and the resolver, the "all unknown" value and the struct
/// follow from it.
macro_rules! offsets {
    (
        from_btf { $( $(#[$m1:meta])* $f1:ident = $s:literal $p:literal, )* }
        elsewhere { $( $(#[$m2:meta])* $f2:ident, )* }
    ) => {
        /// Struct member offsets (bytes) and tracepoint layouts, resolved in userspace from BTF
        /// and tracefs.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Offsets {
            $( $(#[$m1])* pub $f1: u32, )*
            $( $(#[$m2])* pub $f2: u32, )*
        }

        impl Offsets {
            /// Every offset unknown: what the programs assume until userspace fills them in.
            pub const UNKNOWN: Offsets = Offsets { $( $f1: ABSENT, )* $( $f2: ABSENT, )* };

            /// (struct, member path) of every offset read straight from BTF.
            pub const FROM_BTF: &'static [(&'static str, &'static str)] = &[ $( ($s, $p), )* ];

            /// Fills every offset read straight from BTF with `member(struct, path)`.
            pub fn fill_from_btf(&mut self, mut member: impl FnMut(&str, &str) -> u32) {
                $( self.$f1 = member($s, $p); )*
            }
        }
    };
}

offsets! {
    from_btf {
        skb_len = "sk_buff" "len",
        skb_dev = "sk_buff" "dev",
        skb_head = "sk_buff" "head",
        skb_network_header = "sk_buff" "network_header",
        skb_protocol = "sk_buff" "protocol",
        skb_mark = "sk_buff" "mark",
        skb_refdst = "sk_buff" "_skb_refdst",
        /// The device the packet was received on (kept while it is forwarded).
        skb_iif = "sk_buff" "skb_iif",
        /// The socket: the namespace of locally generated packets that have neither a device
        /// nor a route yet.
        skb_sk = "sk_buff" "sk",
        dev_ifindex = "net_device" "ifindex",
        dev_name = "net_device" "name",
        dev_mtu = "net_device" "mtu",
        dev_ip_ptr = "net_device" "ip_ptr",
        dev_ip6_ptr = "net_device" "ip6_ptr",
        net_inum = "net" "ns.inum",
        net_ipv4_devconf_all = "net" "ipv4.devconf_all",
        net_ipv6_devconf_all = "net" "ipv6.devconf_all",
        /// `cnf.data[0]` of an in_device, `data[0]` of an ipv4_devconf.
        in_dev_cnf_data = "in_device" "cnf.data",
        ipv4_devconf_data = "ipv4_devconf" "data",
        in6_dev_cnf_forwarding = "inet6_dev" "cnf.forwarding",
        ipv6_devconf_forwarding = "ipv6_devconf" "forwarding",
        dst_dev = "dst_entry" "dev",
        /// The route's error (ip_error's context probe).
        dst_error = "dst_entry" "error",
        // nf_hook_slow's context probe
        nf_state_hook = "nf_hook_state" "hook",
        nf_state_pf = "nf_hook_state" "pf",
        nf_state_in = "nf_hook_state" "in",
        nf_state_out = "nf_hook_state" "out",
        // nft_do_chain's verdict probe
        nft_pktinfo_skb = "nft_pktinfo" "skb",
        nft_chain_table = "nft_chain" "table",
        nft_chain_name = "nft_chain" "name",
        nft_table_name = "nft_table" "name",
        /// ipt_do_table's verdict probe: the name is inline.
        xt_table_name = "xt_table" "name",
    }
    elsewhere {
        /// `sock_common.skc_net` inside its `possible_net_t`.
        sk_net,
        /// `net_device.nd_net` inside its `possible_net_t`.
        dev_nd_net,
        /// Index into `ipv4_devconf.data[]` of FORWARDING and RP_FILTER (IPV4_DEVCONF_X - 1).
        devconf_idx_forwarding,
        devconf_idx_rp_filter,
        // Classic `skb:kfree_skb` tracepoint layout (fallback when tp_btf is unavailable).
        tp_kfree_skbaddr,
        tp_kfree_location,
        tp_kfree_reason,
        // Classic `icmp:icmp_send` tracepoint layout.
        tp_icmp_skbaddr,
        tp_icmp_type,
        tp_icmp_code,
        // Classic `tcp:tcp_send_reset` tracepoint layout.
        tp_rst_skbaddr,
        /// Start of a [`SKB_WINDOW`]-byte span of `sk_buff` holding len, dev, protocol, head
        /// and network_header (read with one helper call instead of five), or [`ABSENT`].
        skb_window,
        /// Start of a [`DEV_WINDOW`]-byte span of `net_device` holding ifindex and nd_net.
        dev_window,
    }
}

/// Bytes of `sk_buff` read at once for the fields every drop needs.
pub const SKB_WINDOW: u32 = 256;
/// Bytes of `net_device` read at once for ifindex and the netns pointer.
pub const DEV_WINDOW: u32 = 64;

impl Offsets {
    /// The offsets the drop probe's `tp_btf` program reads without checking for ABSENT (every
    /// supported kernel has them), by name.
    pub fn required(&self) -> [(&'static str, u32); 9] {
        [
            ("sk_buff.len", self.skb_len),
            ("sk_buff.dev", self.skb_dev),
            ("sk_buff.protocol", self.skb_protocol),
            ("sk_buff.head", self.skb_head),
            ("sk_buff.network_header", self.skb_network_header),
            ("sk_buff.skb_iif", self.skb_iif),
            ("net_device.ifindex", self.dev_ifindex),
            ("net_device.nd_net", self.dev_nd_net),
            ("net.ns.inum", self.net_inum),
        ]
    }

}

/// What drops are counted by in the kernel: everything the cause of a drop depends on
/// that is cheap to key on. Userspace classifies each key from its sampled events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AggKey {
    pub location: u64,
    pub reason: u32,
    pub netns: u32,
    pub ifindex: u32,
    /// [`FLAG_IPV4`] / [`FLAG_IPV6`] or 0.
    pub family: u8,
    pub l4_proto: u8,
    /// The netfilter hook the drop happened in plus one, when a context probe saw it (0 otherwise):
    /// drops at different hooks share a location (`nf_hook_slow`) but not a cause.
    pub nf_hook: u8,
    pub _pad: u8,
}

impl AggKey {
    /// The key of an event (the same computation on both sides).
    pub fn of(ev: &Event) -> AggKey {
        AggKey {
            location: ev.location,
            reason: ev.reason,
            netns: ev.netns,
            ifindex: ev.ifindex,
            family: ev.flags & (FLAG_IPV4 | FLAG_IPV6),
            l4_proto: ev.l4_proto,
            nf_hook: if ev.context & CTX_NETFILTER != 0 {
                ev.nf_hook.wrapping_add(1)
            } else {
                0
            },
            _pad: 0,
        }
    }
}

/// Per-CPU counts of one [`AggKey`]: exact packets and bytes, and how many of them were
/// not sent as events (over the sampling budget, or no room in the ring buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AggVal {
    pub packets: u64,
    pub bytes: u64,
    /// Drops not sent as events because the sampling budget was spent (not "benign").
    pub sampled_out: u64,
    pub lost: u64,
    /// Start of the current one-second sampling window (ktime ns) and events sent in it.
    pub window_ns: u64,
    pub sent: u32,
    /// Low bits of `jiffies` when the window was last checked: over the budget, the clock is
    /// read again only once the tick has moved on.
    pub tick: u32,
}

/// Slots of the aggregation table, per CPU (a power of two): how many kinds of drop each CPU
/// can count exactly.
pub const AGG_ENTRIES: u32 = 16384;
/// Slots per element of the `AGG` per-CPU array (a power of two): one map lookup per drop,
/// and few per-CPU allocations when the map is created.
pub const AGG_BUCKET_SLOTS: u32 = 64;
/// Elements of the `AGG` per-CPU array.
pub const AGG_BUCKETS: u32 = AGG_ENTRIES / AGG_BUCKET_SLOTS;
/// Slots of its bucket tried for a key before the table counts as full for it: the key's
/// home slot and the ones after it (wrapping inside the bucket).
pub const AGG_PROBES: u32 = 4;

/// One slot of the aggregation table: the key that owns it (location 0: free) and its counts.
/// A key lives in the first slot of `agg_home(key) ..` (AGG_PROBES slots) that is free or
/// already its own, so it may sit in different slots on different CPUs: readers match slots by
/// key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AggSlot {
    pub key: AggKey,
    pub val: AggVal,
}

/// One element of the `AGG` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggBucket {
    pub slots: [AggSlot; AGG_BUCKET_SLOTS as usize],
}

impl AggKey {
    /// The key as three words, for hashing and comparing without byte loops.
    #[inline(always)]
    pub fn words(&self) -> [u64; 3] {
        [
            self.location,
            self.reason as u64 | (self.netns as u64) << 32,
            self.ifindex as u64
                | (self.family as u64) << 32
                | (self.l4_proto as u64) << 40
                | (self.nf_hook as u64) << 48,
        ]
    }
}

/// The home slot of a key in the aggregation table, 0..AGG_ENTRIES (multiply-xorshift over
/// its words): bucket `home / AGG_BUCKET_SLOTS`, slot `home % AGG_BUCKET_SLOTS`.
#[inline(always)]
pub fn agg_home(words: &[u64; 3]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = words[0].wrapping_mul(K);
    h = (h ^ (h >> 29) ^ words[1]).wrapping_mul(K);
    h = (h ^ (h >> 29) ^ words[2]).wrapping_mul(K);
    ((h >> 32) as u32) & (AGG_ENTRIES - 1)
}

/// An address prefix for the kernel-side filters (`--src`, `--dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// IPv4 addresses use the first 4 bytes.
    pub addr: [u8; 16],
    pub prefix_len: u8,
    /// [`FLAG_IPV4`] or [`FLAG_IPV6`].
    pub family: u8,
    pub _pad: [u8; 2],
}

impl Cidr {
    pub const NONE: Cidr = Cidr {
        addr: [0; 16],
        prefix_len: 0,
        family: 0,
        _pad: [0; 2],
    };
}

/// Capacity of each kernel-side filter list; longer lists are filtered in userspace only.
pub const FILTER_SLOTS: usize = 8;

/// Filters applied in the kernel before an event is produced. Within a list values are
/// alternatives; lists must all match; an empty list (count 0) matches everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filters {
    pub src: [Cidr; FILTER_SLOTS],
    pub dst: [Cidr; FILTER_SLOTS],
    pub netns: [u32; FILTER_SLOTS],
    pub ports: [u16; FILTER_SLOTS],
    pub protos: [u8; FILTER_SLOTS],
    pub ifnames: [[u8; 16]; FILTER_SLOTS],
    pub n_src: u8,
    pub n_dst: u8,
    pub n_netns: u8,
    pub n_ports: u8,
    pub n_protos: u8,
    pub n_ifnames: u8,
    pub _pad: [u8; 2],
    // Lists only a filter expression fills (tcpdump's `host`, `net`, `port`, `portrange`,
    // `ip`, `ip6`); the flags above never use them.
    /// Source or destination in one of these prefixes.
    pub addrs: [Cidr; FILTER_SLOTS],
    /// Inclusive port ranges `[lo, hi]` the source port, the destination port, or either port
    /// must fall in. Only TCP and UDP packets that carry ports match: not ICMP, not IPv4
    /// fragments after the first, no IPv6 fragment (as in tcpdump).
    pub sport_ranges: [[u16; 2]; FILTER_SLOTS],
    pub dport_ranges: [[u16; 2]; FILTER_SLOTS],
    pub port_ranges: [[u16; 2]; FILTER_SLOTS],
    pub n_addrs: u8,
    pub n_sport_ranges: u8,
    pub n_dport_ranges: u8,
    pub n_port_ranges: u8,
    /// [`FLAG_IPV4`] | [`FLAG_IPV6`]: only packets of these families; 0 = any.
    pub families: u8,
    pub _pad2: [u8; 3],
}

impl Filters {
    /// No filter: everything passes.
    pub const NONE: Filters = Filters {
        src: [Cidr::NONE; FILTER_SLOTS],
        dst: [Cidr::NONE; FILTER_SLOTS],
        netns: [0; FILTER_SLOTS],
        ports: [0; FILTER_SLOTS],
        protos: [0; FILTER_SLOTS],
        ifnames: [[0; 16]; FILTER_SLOTS],
        n_src: 0,
        n_dst: 0,
        n_netns: 0,
        n_ports: 0,
        n_protos: 0,
        n_ifnames: 0,
        _pad: [0; 2],
        addrs: [Cidr::NONE; FILTER_SLOTS],
        sport_ranges: [[0; 2]; FILTER_SLOTS],
        dport_ranges: [[0; 2]; FILTER_SLOTS],
        port_ranges: [[0; 2]; FILTER_SLOTS],
        n_addrs: 0,
        n_sport_ranges: 0,
        n_dport_ranges: 0,
        n_port_ranges: 0,
        families: 0,
        _pad2: [0; 3],
    };
}

/// The most packet bytes a drop event can carry (`--snaplen`).
pub const SNAPLEN_MAX: u32 = 512;

/// What the drop probe copies of a delivered drop's packet (`--pcap`, the flight recorder),
/// and where in `sk_buff` to find it (offsets from BTF; [`ABSENT`] if missing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capture {
    /// Bytes to copy, at most [`SNAPLEN_MAX`]; 0 copies nothing (the event goes out alone).
    pub snaplen: u32,
    /// `sk_buff.data` (pointer), `sk_buff.data_len` (paged bytes), `sk_buff.mac_header`.
    pub skb_data: u32,
    pub skb_data_len: u32,
    pub skb_mac_header: u32,
}

impl Capture {
    pub const OFF: Capture = Capture {
        snaplen: 0,
        skb_data: ABSENT,
        skb_data_len: ABSENT,
        skb_mac_header: ABSENT,
    };
}

/// Follows an [`Event`] in the same ring record when the packet was captured; `caplen`
/// packet bytes follow it. Offsets are from `skb->head`; `u16::MAX` = header not set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketHead {
    /// Where the copied bytes start: the MAC header when it was set and lies just before
    /// the network header, else the network header, else `data`.
    pub start: u16,
    pub mac: u16,
    pub network: u16,
    pub caplen: u16,
    /// `skb->data - skb->head`.
    pub data: u32,
    /// Bytes of the packet in the linear area from `data` (`len - data_len`).
    pub headlen: u32,
}

const _: () = assert!(core::mem::size_of::<PacketHead>() == 16);

/// Load-time configuration of the eBPF programs (a `.rodata` global named `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub offsets: Offsets,
    /// Whether the tp_btf program may read the `reason` argument (absent before 5.17).
    pub has_reason: u32,
    /// Whether `tcp_send_reset`'s tp_btf arguments include the incoming skb (6.x: sk, skb, ...).
    pub rst_has_skb: u32,
    /// Drop events sent per aggregation key per second per CPU; 0 = all of them.
    pub sample_per_sec: u32,
    /// Whether context probes (nf_hook_slow, ip_forward, ...) may be attached: drops then look
    /// up what those probes recorded about the packet. 0 skips the lookups entirely.
    pub context: u32,
    /// Parameter positions of `skb` and of the table in `ipt_do_table`/`ip6t_do_table`
    /// (their order changed in 5.16), from BTF.
    pub xt_skb_arg: u32,
    pub xt_table_arg: u32,
    pub filters: Filters,
    /// Packet bytes for delivered drop events (off unless `--pcap` or `serve`'s recorder).
    pub capture: Capture,
}

/// Which probe produced an [`Event`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A packet freed through `kfree_skb` with a drop reason.
    Drop = 1,
    /// The kernel sent an ICMP error about a packet (REJECT, frag-needed, unreachable).
    IcmpSent = 2,
    /// The kernel answered a packet with a TCP reset (closed port, aborted connection).
    RstSent = 3,
    /// The kernel sent an ICMPv6 error about a packet (packet too big, unreachable, ...).
    Icmp6Sent = 4,
}

/// Packet and device facts read at drop time; `flags` says which parts are valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    /// `skb` pointer, only used to pair an ICMP error with the drop of the same packet.
    pub skb: u64,
    /// Address of the function that freed the packet (symbolized in userspace).
    pub location: u64,
    pub reason: u32,
    pub netns: u32,
    pub ifindex: u32,
    pub mtu: u32,
    /// Device the routing decision sends the packet to (`skb_dst(skb)->dev`).
    pub out_ifindex: u32,
    pub out_mtu: u32,
    pub len: u32,
    pub mark: u32,
    pub stack_id: i32,
    /// `ETH_P_*` in host order, as in the tracepoint's `protocol`.
    pub l3_proto: u16,
    pub sport: u16,
    pub dport: u16,
    pub l4_proto: u8,
    pub kind: u8,
    pub ttl: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Device and netns-wide sysctl values seen by the kernel; -1 when unreadable.
    pub dev_forwarding: i8,
    pub all_forwarding: i8,
    pub dev_rp_filter: i8,
    pub all_rp_filter: i8,
    pub dev6_forwarding: i8,
    pub all6_forwarding: i8,
    pub flags: u8,
    /// IPv4 fragment offset (bytes) of a fragment ([`FLAG_FRAG`]); IPv6 likewise from the
    /// fragment header.
    pub frag_off: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub ifname: [u8; 16],
    pub out_ifname: [u8; 16],
    // What the context probes recorded about this packet; `context` says which parts are valid.
    /// Ingress device of a forwarded packet (at `ip_forward`/`ip6_forward`).
    pub in_ifindex: u32,
    /// The route's error (`dst->error`, e.g. -EHOSTUNREACH) when `ip_error` handled the packet.
    pub route_error: i32,
    /// Devices of the netfilter hook (`nf_hook_state` in/out), 0 when none.
    pub nf_in_ifindex: u32,
    pub nf_out_ifindex: u32,
    /// Netfilter hook number and protocol family (`nf_hook_state` hook/pf), named from BTF.
    pub nf_hook: u8,
    pub nf_pf: u8,
    /// [`CTX_FORWARD`] | [`CTX_NETFILTER`] | [`CTX_RULESET`] | [`CTX_ROUTE_ERROR`].
    pub context: u8,
    /// [`ENGINE_NFT`] or [`ENGINE_XT`] for a ruleset verdict.
    pub rs_engine: u8,
    /// `skb->skb_iif`: the device the packet arrived on (0 for locally generated packets).
    pub iif: u32,
    pub in_ifname: [u8; 16],
    /// Table and chain (nftables; x_tables has no chain names in the kernel) that returned DROP.
    pub rs_table: [u8; 32],
    pub rs_chain: [u8; 32],
}

/// [`Event::context`]: the packet was being forwarded (`in_*` fields valid).
pub const CTX_FORWARD: u8 = 1 << 0;
/// [`Event::context`]: the packet was inside a netfilter hook (`nf_*` fields valid).
pub const CTX_NETFILTER: u8 = 1 << 1;
/// [`Event::context`]: a ruleset returned DROP for the packet (`rs_*` fields valid).
pub const CTX_RULESET: u8 = 1 << 2;
/// [`Event::context`]: `ip_error` handled the packet (`route_error` valid).
pub const CTX_ROUTE_ERROR: u8 = 1 << 3;
/// [`Event::rs_engine`]: nftables (`nft_do_chain`).
pub const ENGINE_NFT: u8 = 1;
/// [`Event::rs_engine`]: x_tables, i.e. iptables-legacy (`ipt_do_table`/`ip6t_do_table`).
pub const ENGINE_XT: u8 = 2;

/// [`Event::flags`]: an IPv4 header was parsed (`saddr`/`daddr` hold it in the first 4 bytes).
pub const FLAG_IPV4: u8 = 1 << 0;
/// [`Event::flags`]: an IPv6 header was parsed.
pub const FLAG_IPV6: u8 = 1 << 1;
/// [`Event::flags`]: ports (TCP/UDP) or ICMP type/code were parsed.
pub const FLAG_L4: u8 = 1 << 2;
/// [`Event::flags`]: the packet had a device.
pub const FLAG_DEV: u8 = 1 << 3;
/// [`Event::flags`]: the packet had a route (`out_*` fields valid).
pub const FLAG_DST: u8 = 1 << 4;
/// [`Event::flags`]: the packet is an IP fragment (`frag_off` valid; only the first fragment,
/// offset 0, carries ports).
pub const FLAG_FRAG: u8 = 1 << 5;
/// [`Event::flags`]: the namespace came from the packet's socket (no device, no route).
pub const FLAG_SK_NETNS: u8 = 1 << 6;

// The ring buffer record has no implicit padding: both sides see the same bytes.
const _: () = assert!(core::mem::size_of::<Event>() == 248);
const _: () = assert!(core::mem::size_of::<AggSlot>() == 72);
const _: () = assert!(AGG_ENTRIES.is_power_of_two() && AGG_BUCKET_SLOTS.is_power_of_two());

/// This CPU's counters (the single element of the `COUNTERS` per-CPU array): one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuState {
    /// Events the ring buffer had no room for.
    pub lost: u64,
    /// Drops seen by the probe (delivered or not).
    pub seen: u64,
    /// Drops the kernel-side filters left out (never sent to userspace).
    pub filtered: u64,
    /// Drops whose key did not fit the aggregation table (their counts are not exact).
    pub agg_full: u64,
}

/// Set by userspace at run time (the single element of the `KNOBS` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Knobs {
    /// `[start, end)` of the code of the function where `skb->dev` of a freed packet holds
    /// something else (fragments purged from a reassembly queue keep their rbtree node there);
    /// `[0, 0)` until userspace has read the kernel's symbols.
    pub no_dev_start: u64,
    pub no_dev_end: u64,
}

/// Size of one value of the eBPF side's `FRAMES` per-CPU array (the context probes' frame
/// stacks), so userspace can empty them.
pub const FRAMES_VALUE_SIZE: usize = 232;
/// Indices in `FRAMES` of the stacks of the probes attached on demand (forwarding, netfilter
/// hooks, rulesets); the ICMPv6 stack's probe stays attached.
pub const HOT_FRAME_STACKS: [u32; 3] = [0, 1, 2];

/// Byte size of the ring buffer carrying [`Event`]s.
pub const RING_BYTES: u32 = 1 << 22;
/// Entries in the stack-trace map.
pub const STACK_ENTRIES: u32 = 4096;

impl Event {
    /// An all-zero event (also what the eBPF side starts from).
    pub const fn zeroed() -> Self {
        Event {
            ts_ns: 0,
            skb: 0,
            location: 0,
            reason: 0,
            netns: 0,
            ifindex: 0,
            mtu: 0,
            out_ifindex: 0,
            out_mtu: 0,
            len: 0,
            mark: 0,
            stack_id: -1,
            l3_proto: 0,
            sport: 0,
            dport: 0,
            l4_proto: 0,
            kind: 0,
            ttl: 0,
            icmp_type: 0,
            icmp_code: 0,
            dev_forwarding: -1,
            all_forwarding: -1,
            dev_rp_filter: -1,
            all_rp_filter: -1,
            dev6_forwarding: -1,
            all6_forwarding: -1,
            flags: 0,
            frag_off: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            ifname: [0; 16],
            out_ifname: [0; 16],
            in_ifindex: 0,
            route_error: 0,
            nf_in_ifindex: 0,
            nf_out_ifindex: 0,
            nf_hook: 0,
            nf_pf: 0,
            context: 0,
            rs_engine: 0,
            iif: 0,
            in_ifname: [0; 16],
            rs_table: [0; 32],
            rs_chain: [0; 32],
        }
    }
}

/// Layouts the configuration-change programs read (a `.rodata` global `CHANGE_CONFIG`),
/// resolved in userspace from BTF (task and namespace structs) and tracefs (the setsockopt
/// syscall tracepoints). Separate from [`Config`]: these programs never see a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeConfig {
    // struct task_struct, struct nsproxy, struct net
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_real_parent: u32,
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub net_inum: u32,
    // syscalls:sys_enter_setsockopt / sys_exit_setsockopt
    pub tp_sso_level: u32,
    pub tp_sso_optname: u32,
    pub tp_sso_optval: u32,
    pub tp_sso_ret: u32,
}

impl ChangeConfig {
    pub const UNKNOWN: ChangeConfig = ChangeConfig {
        task_tgid: ABSENT,
        task_comm: ABSENT,
        task_real_parent: ABSENT,
        task_nsproxy: ABSENT,
        nsproxy_net_ns: ABSENT,
        net_inum: ABSENT,
        tp_sso_level: ABSENT,
        tp_sso_optname: ABSENT,
        tp_sso_optval: ABSENT,
        tp_sso_ret: ABSENT,
    };
}

/// [`ChangeEvent::kind`]: a write to a `net.*` sysctl through /proc/sys.
pub const CHANGE_SYSCTL: u8 = 1;
/// [`ChangeEvent::kind`]: an x_tables (iptables-legacy) table was replaced.
pub const CHANGE_XT_REPLACE: u8 = 2;

/// Levels of the process chain recorded with a change (the writer, its parent, ...).
pub const CHANGE_ANCESTORS: usize = 3;

/// A configuration change made by a process, seen in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub ts_ns: u64,
    /// cgroup v2 id of the writer (its container and pod).
    pub cgroup_id: u64,
    /// The writer's network namespace (the namespace a `net.*` sysctl belongs to).
    pub netns: u32,
    /// [`CHANGE_SYSCTL`] or [`CHANGE_XT_REPLACE`].
    pub kind: u8,
    /// For [`CHANGE_XT_REPLACE`]: 4 (iptables) or 6 (ip6tables).
    pub family: u8,
    pub _pad: [u8; 2],
    /// Process ids of the writer and its ancestors (0 past the top).
    pub pids: [u32; CHANGE_ANCESTORS],
    pub _pad2: u32,
    /// Their command names.
    pub comms: [[u8; 16]; CHANGE_ANCESTORS],
    /// Sysctl path under /proc/sys ("net/ipv4/conf/all/forwarding"), or the table name.
    pub name: [u8; 64],
    /// Value before and after the write (sysctls only).
    pub old: [u8; 32],
    pub new: [u8; 32],
}

const _: () = assert!(core::mem::size_of::<ChangeEvent>() == 216);

/// Byte size of the ring buffer carrying [`ChangeEvent`]s.
pub const CHANGE_RING_BYTES: u32 = 1 << 16;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, no pointers, every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Filters {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::AggVal {}
    unsafe impl aya::Pod for super::AggSlot {}
    unsafe impl aya::Pod for super::AggBucket {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::Knobs {}
    unsafe impl aya::Pod for super::ChangeConfig {}
    unsafe impl aya::Pod for super::ChangeEvent {}
    unsafe impl aya::Pod for super::PacketHead {}
}
