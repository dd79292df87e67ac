//! dropscope's eBPF programs: entry points only; the work is in `probes/`.
//!
//! Each kernel hook exists in two forms: `tp_btf` (typed arguments, no tracefs needed) and the
//! classic tracepoint (fields at offsets read from tracefs), chosen by userspace at attach time.
//! Context probes (netfilter hooks, forwarding, ruleset verdicts) exist as fentry/fexit and as
//! kprobe/kretprobe pairs; userspace attaches the best pair the kernel allows, or none.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod context;
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
        packet::{Probed, Typed},
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
        // The skb argument is typed for the verifier: its fields are read with plain loads.
        probes::kfree_skb::on_drop::<Typed, _>(&ctx, skb, location, reason as u32);
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
        probes::kfree_skb::on_drop::<Probed, _>(&ctx, skb, location, reason);
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

/// Configuration changes: who changed the settings drops depend on (no packet passes here).
#[cfg(target_arch = "bpf")]
mod change_programs {
    use aya_ebpf::{
        macros::{cgroup_sysctl, tracepoint},
        programs::{SysctlContext, TracePointContext},
    };

    use crate::probes::config_changes;

    /// Every sysctl write in the cgroup tree it is attached to (the cgroup v2 root).
    #[cgroup_sysctl]
    pub fn sysctl_write(ctx: SysctlContext) -> i32 {
        config_changes::on_sysctl(&ctx)
    }

    #[tracepoint(category = "syscalls", name = "sys_enter_setsockopt")]
    pub fn setsockopt_enter(ctx: TracePointContext) -> u32 {
        config_changes::on_setsockopt_enter(&ctx);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_exit_setsockopt")]
    pub fn setsockopt_exit(ctx: TracePointContext) -> u32 {
        config_changes::on_setsockopt_exit(&ctx);
        0
    }
}

/// Context probes: what the packet was going through when it was dropped.
#[cfg(target_arch = "bpf")]
mod context_programs {
    use aya_ebpf::{
        macros::{fentry, fexit, kprobe, kretprobe},
        programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
    };

    use crate::{maps::cfg, probes};

    #[fentry(function = "nf_hook_slow")]
    pub fn nf_hook_slow_fentry(ctx: FEntryContext) -> i32 {
        probes::netfilter::enter(ctx.arg(0), ctx.arg(1));
        0
    }

    #[fexit(function = "nf_hook_slow")]
    pub fn nf_hook_slow_fexit(_ctx: FExitContext) -> i32 {
        probes::netfilter::exit();
        0
    }

    #[kprobe]
    pub fn nf_hook_slow_kprobe(ctx: ProbeContext) -> u32 {
        probes::netfilter::enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0));
        0
    }

    #[kretprobe]
    pub fn nf_hook_slow_kretprobe(_ctx: RetProbeContext) -> u32 {
        probes::netfilter::exit();
        0
    }

    #[fentry(function = "ip_forward")]
    pub fn ip_forward_fentry(ctx: FEntryContext) -> i32 {
        probes::forward::enter(ctx.arg(0));
        0
    }

    #[fexit(function = "ip_forward")]
    pub fn ip_forward_fexit(_ctx: FExitContext) -> i32 {
        probes::forward::exit();
        0
    }

    #[fentry(function = "ip6_forward")]
    pub fn ip6_forward_fentry(ctx: FEntryContext) -> i32 {
        probes::forward::enter(ctx.arg(0));
        0
    }

    #[fexit(function = "ip6_forward")]
    pub fn ip6_forward_fexit(_ctx: FExitContext) -> i32 {
        probes::forward::exit();
        0
    }

    /// kprobe mode serves ip_forward and ip6_forward alike (one program, two attachments).
    #[kprobe]
    pub fn forward_kprobe(ctx: ProbeContext) -> u32 {
        probes::forward::enter(ctx.arg(0).unwrap_or(0));
        0
    }

    #[kretprobe]
    pub fn forward_kretprobe(_ctx: RetProbeContext) -> u32 {
        probes::forward::exit();
        0
    }

    #[fentry(function = "icmp6_send")]
    pub fn icmp6_send_fentry(ctx: FEntryContext) -> i32 {
        let (skb, ty, code): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
        probes::icmp6_send::enter(skb, ty as u8, code as u8);
        0
    }

    #[fexit(function = "icmp6_send")]
    pub fn icmp6_send_fexit(_ctx: FExitContext) -> i32 {
        probes::icmp6_send::exit();
        0
    }

    #[fentry(function = "icmpv6_push_pending_frames")]
    pub fn icmp6_push_fentry(_ctx: FEntryContext) -> i32 {
        probes::icmp6_send::sent();
        0
    }

    #[kprobe]
    pub fn icmp6_send_kprobe(ctx: ProbeContext) -> u32 {
        let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
        probes::icmp6_send::enter(arg(0), arg(1) as u8, arg(2) as u8);
        0
    }

    #[kretprobe]
    pub fn icmp6_send_kretprobe(_ctx: RetProbeContext) -> u32 {
        probes::icmp6_send::exit();
        0
    }

    #[kprobe]
    pub fn icmp6_push_kprobe(_ctx: ProbeContext) -> u32 {
        probes::icmp6_send::sent();
        0
    }

    #[fentry(function = "ip_error")]
    pub fn ip_error_fentry(ctx: FEntryContext) -> i32 {
        probes::forward::route_error(ctx.arg(0));
        0
    }

    #[kprobe]
    pub fn ip_error_kprobe(ctx: ProbeContext) -> u32 {
        probes::forward::route_error(ctx.arg(0).unwrap_or(0));
        0
    }

    #[fentry(function = "nft_do_chain")]
    pub fn nft_do_chain_fentry(ctx: FEntryContext) -> i32 {
        probes::ruleset::nft_enter(ctx.arg(0), ctx.arg(1));
        0
    }

    #[fexit(function = "nft_do_chain")]
    pub fn nft_do_chain_fexit(_ctx: FExitContext) -> i32 {
        let _ = probes::ruleset::exit();
        0
    }

    #[kprobe]
    pub fn nft_do_chain_kprobe(ctx: ProbeContext) -> u32 {
        probes::ruleset::nft_enter(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0));
        0
    }

    #[kretprobe]
    pub fn nft_do_chain_kretprobe(_ctx: RetProbeContext) -> u32 {
        let _ = probes::ruleset::exit();
        0
    }

    /// The position of `skb` and of the table moved in 5.16; both come from BTF. All three
    /// arguments are read at constant offsets first: the verifier rejects a context read at
    /// a computed offset.
    #[inline(always)]
    fn xt_args(args: [u64; 3]) -> (u64, u64) {
        let c = cfg();
        let pick = |n: u32| {
            if n == 0 {
                args[0]
            } else if n == 1 {
                args[1]
            } else {
                args[2]
            }
        };
        (pick(c.xt_skb_arg), pick(c.xt_table_arg))
    }

    #[fexit(function = "ipt_do_table")]
    pub fn ipt_do_table_fexit(ctx: FExitContext) -> i32 {
        let verdict: u32 = ctx.ret().unwrap_or(1);
        let (skb, table) = xt_args([ctx.arg(0), ctx.arg(1), ctx.arg(2)]);
        probes::ruleset::xt_verdict(skb, table, verdict);
        0
    }

    #[fexit(function = "ip6t_do_table")]
    pub fn ip6t_do_table_fexit(ctx: FExitContext) -> i32 {
        let verdict: u32 = ctx.ret().unwrap_or(1);
        let (skb, table) = xt_args([ctx.arg(0), ctx.arg(1), ctx.arg(2)]);
        probes::ruleset::xt_verdict(skb, table, verdict);
        0
    }

    /// Shared by ipt_do_table and ip6t_do_table in kprobe mode.
    #[kprobe]
    pub fn xt_do_table_kprobe(ctx: ProbeContext) -> u32 {
        let arg = |n| ctx.arg(n).unwrap_or(0);
        let (skb, table) = xt_args([arg(0), arg(1), arg(2)]);
        probes::ruleset::xt_enter(skb, table);
        0
    }

    #[kretprobe]
    pub fn xt_do_table_kretprobe(ctx: RetProbeContext) -> u32 {
        if let Some(f) = probes::ruleset::exit() {
            probes::ruleset::xt_verdict(f.skb, f.aux, ctx.ret());
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
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host this crate only provides the ABI library; the programs build for `bpfel`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
