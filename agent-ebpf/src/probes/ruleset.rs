//! The ruleset that dropped the packet: nftables frees a dropped packet inside `nft_do_chain`,
//! so its base chain is kept in a frame for the drop to find; x_tables returns `NF_DROP` from
//! `ipt_do_table`/`ip6t_do_table` and the packet is freed right after, so the verdict is
//! recorded on return.
use agent_ebpf::{ENGINE_NFT, ENGINE_XT};

use crate::{
    context::{now, pop, push, read, set_ruleset_drop, Frame, Stack},
    maps::cfg,
};

/// `NF_DROP` (uapi netfilter.h); the low byte of a verdict is the verdict proper, the rest
/// may carry an errno (`NF_DROP_ERR`).
const NF_DROP: u32 = 0;
const NF_VERDICT_MASK: u32 = 0xff;

#[inline(always)]
fn frame(skb: u64, aux: u64, engine: u8) -> Frame {
    Frame {
        skb,
        aux,
        ts_ns: now(),
        ifindex: 0,
        out_ifindex: 0,
        hook: engine,
        pf: 0,
        _pad: [0; 6],
        ifname: [0; 16],
    }
}

/// Entry: `nft_do_chain(pkt, priv)`, `pkt` a `struct nft_pktinfo *`, `priv` the base chain.
#[inline(always)]
pub fn nft_enter(pkt: u64, chain: u64) {
    let skb = read::<u64>(pkt, cfg().offsets.nft_pktinfo_skb).unwrap_or(0);
    push(Stack::Ruleset, frame(skb, chain, ENGINE_NFT));
}

/// Exit of `nft_do_chain`, or of an x_tables table in kprobe mode (which then needs the
/// arguments its entry kept).
#[inline(always)]
pub fn exit() -> Option<Frame> {
    pop(Stack::Ruleset)
}

/// kprobe mode: the entry of `ipt_do_table` keeps what the return probe cannot see.
#[inline(always)]
pub fn xt_enter(skb: u64, table: u64) {
    push(Stack::Ruleset, frame(skb, table, ENGINE_XT));
}

/// An x_tables table (`struct xt_table *`) returned `verdict` for `skb`.
#[inline(always)]
pub fn xt_verdict(skb: u64, table: u64, verdict: u32) {
    if verdict & NF_VERDICT_MASK != NF_DROP {
        return;
    }
    let o = &cfg().offsets;
    let name = if table != 0 && o.xt_table_name != agent_ebpf::ABSENT {
        table + o.xt_table_name as u64
    } else {
        0
    };
    set_ruleset_drop(skb, name);
}
