//! dropscope's eBPF programs: entry points only; the work is in `probes/`.
//!
//! Each kernel hook exists in two forms: `tp_btf` (typed arguments, no tracefs needed) and the
//! classic tracepoint (fields at offsets read from tracefs), chosen by userspace at attach time.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod filter;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{btf_tracepoint, tracepoint},
        programs::{BtfTracePointContext, TracePointContext},
    };

    use crate::{
        maps::{cfg, enabled},
        probes,
    };

    /// `skb:kfree_skb` as a BTF tracepoint: (skb, location, reason[, rx_sk]).
    #[btf_tracepoint(function = "kfree_skb")]
    pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
        let skb: u64 = ctx.arg(0);
        let location: u64 = ctx.arg(1);
        // Kernels before 5.17 pass no reason; the verifier prunes this read there.
        let reason: u64 = if enabled(cfg().has_reason) {
            ctx.arg(2)
        } else {
            0
        };
        probes::kfree_skb::on_drop(&ctx, skb, location, reason as u32);
        0
    }

    /// An empty program on the same hook: the benchmark's floor (what any observer of this
    /// tracepoint pays before doing anything).
    #[btf_tracepoint(function = "kfree_skb")]
    pub fn kfree_skb_null(_ctx: BtfTracePointContext) -> i32 {
        0
    }

    /// `skb:kfree_skb` as a classic tracepoint (layout from tracefs).
    #[tracepoint(category = "skb", name = "kfree_skb")]
    pub fn kfree_skb_tp(ctx: TracePointContext) -> u32 {
        let o = &cfg().offsets;
        // SAFETY: offsets come from this kernel's tracefs format for this tracepoint.
        let skb: u64 = unsafe { ctx.read_at(o.tp_kfree_skbaddr as usize) }.unwrap_or(0);
        let location: u64 = unsafe { ctx.read_at(o.tp_kfree_location as usize) }.unwrap_or(0);
        let reason: u32 = if o.tp_kfree_reason == agent_ebpf::ABSENT {
            0
        } else {
            unsafe { ctx.read_at(o.tp_kfree_reason as usize) }.unwrap_or(0)
        };
        probes::kfree_skb::on_drop(&ctx, skb, location, reason);
        0
    }

    /// `icmp:icmp_send` as a BTF tracepoint: (skb, type, code).
    #[btf_tracepoint(function = "icmp_send")]
    pub fn icmp_send_btf(ctx: BtfTracePointContext) -> i32 {
        let skb: u64 = ctx.arg(0);
        let ty: u64 = ctx.arg(1);
        let code: u64 = ctx.arg(2);
        probes::icmp_send::on_icmp_send(skb, ty as u8, code as u8);
        0
    }

    /// `icmp:icmp_send` as a classic tracepoint (layout from tracefs).
    #[tracepoint(category = "icmp", name = "icmp_send")]
    pub fn icmp_send_tp(ctx: TracePointContext) -> u32 {
        let o = &cfg().offsets;
        // SAFETY: offsets come from this kernel's tracefs format for this tracepoint.
        let skb: u64 = unsafe { ctx.read_at(o.tp_icmp_skbaddr as usize) }.unwrap_or(0);
        let ty: i32 = unsafe { ctx.read_at(o.tp_icmp_type as usize) }.unwrap_or(0);
        let code: i32 = unsafe { ctx.read_at(o.tp_icmp_code as usize) }.unwrap_or(0);
        probes::icmp_send::on_icmp_send(skb, ty as u8, code as u8);
        0
    }

    /// `tcp:tcp_send_reset` as a BTF tracepoint: (sk, skb, reason) on 6.x.
    #[btf_tracepoint(function = "tcp_send_reset")]
    pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
        // Older kernels pass only the socket; the verifier prunes this read there.
        let skb: u64 = if enabled(cfg().rst_has_skb) {
            ctx.arg(1)
        } else {
            0
        };
        probes::tcp_send_reset::on_reset(skb);
        0
    }

    /// `tcp:tcp_send_reset` as a classic tracepoint (layout from tracefs).
    #[tracepoint(category = "tcp", name = "tcp_send_reset")]
    pub fn tcp_send_reset_tp(ctx: TracePointContext) -> u32 {
        let o = &cfg().offsets;
        if o.tp_rst_skbaddr != agent_ebpf::ABSENT {
            // SAFETY: offset from this kernel's tracefs format for this tracepoint.
            let skb: u64 = unsafe { ctx.read_at(o.tp_rst_skbaddr as usize) }.unwrap_or(0);
            probes::tcp_send_reset::on_reset(skb);
        }
        0
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// On the host this crate only provides the ABI library; the programs build for `bpfel`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
