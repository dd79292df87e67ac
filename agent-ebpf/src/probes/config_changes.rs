//! Configuration changes made by processes: writes to `net.*` sysctls (a cgroup/sysctl program
//! on the cgroup v2 root sees every write through /proc/sys) and iptables-legacy table
//! replacements (the `setsockopt(IPT_SO_SET_REPLACE)` syscall). Configuration paths only:
//! nothing here runs per packet.
use agent_ebpf::{
    ChangeConfig, ChangeEvent, ABSENT, CHANGE_ANCESTORS, CHANGE_RING_BYTES, CHANGE_SYSCTL,
    CHANGE_XT_REPLACE,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user_str_bytes,
    },
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};

/// Filled in by userspace before load; frozen afterwards.
#[unsafe(no_mangle)]
static CHANGE_CONFIG: ChangeConfig = ChangeConfig::UNKNOWN;

#[inline(always)]
fn ccfg() -> &'static ChangeConfig {
    // SAFETY: a plain static read through a volatile load (see maps::cfg).
    unsafe { core::ptr::read_volatile(&&CHANGE_CONFIG) }
}

#[map]
pub static CHANGES: RingBuf = RingBuf::with_byte_size(CHANGE_RING_BYTES, 0);

/// Per-CPU scratch where a change event is built.
#[map]
static CHANGE_SCRATCH: PerCpuArray<ChangeEvent> = PerCpuArray::with_max_entries(1, 0);

/// Table replacements under way, by thread: the entry keeps the table name until the
/// syscall returns, and only a successful one is reported.
#[map]
static XT_PENDING: HashMap<u64, ChangeEvent> = HashMap::with_max_entries(256, 0);

#[inline(always)]
fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == ABSENT {
        return None;
    }
    // SAFETY: probe-read of kernel memory; failures are reported, not faults.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

/// A fresh event with who is making the change: process chain, namespace, cgroup.
#[inline(always)]
fn who(kind: u8) -> Option<&'static mut ChangeEvent> {
    let ev = CHANGE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let ev = unsafe { &mut *ev };
    let c = ccfg();
    ev.kind = kind;
    ev.family = 0;
    // SAFETY: helpers without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut task = unsafe { bpf_get_current_task() };
    let nsproxy = read::<u64>(task, c.task_nsproxy).unwrap_or(0);
    let net = read::<u64>(nsproxy, c.nsproxy_net_ns).unwrap_or(0);
    ev.netns = read::<u32>(net, c.net_inum).unwrap_or(0);
    for i in 0..CHANGE_ANCESTORS {
        ev.pids[i] = read::<u32>(task, c.task_tgid).unwrap_or(0);
        ev.comms[i] = read::<[u8; 16]>(task, c.task_comm).unwrap_or([0; 16]);
        task = read::<u64>(task, c.task_real_parent).unwrap_or(0);
    }
    ev.name = [0; 64];
    ev.old = [0; 32];
    ev.new = [0; 32];
    Some(ev)
}

/// A write to a sysctl: reported for `net.*` keys only. Never refuses the write.
#[inline(always)]
pub fn on_sysctl(ctx: &aya_ebpf::programs::SysctlContext) -> i32 {
    // SAFETY: the context points at the kernel's struct bpf_sysctl for this call.
    let write = unsafe { (*ctx.sysctl).write };
    if write == 0 {
        return 1;
    }
    let Some(ev) = who(CHANGE_SYSCTL) else {
        return 1;
    };
    let ptr = ctx.sysctl;
    // SAFETY: the sysctl helpers write at most the given lengths into our buffers.
    unsafe {
        aya_ebpf::helpers::generated::bpf_sysctl_get_name(
            ptr,
            ev.name.as_mut_ptr().cast(),
            ev.name.len() as _,
            0,
        );
    }
    if ev.name[..4] != *b"net/" {
        return 1;
    }
    unsafe {
        aya_ebpf::helpers::generated::bpf_sysctl_get_current_value(
            ptr,
            ev.old.as_mut_ptr().cast(),
            ev.old.len() as _,
        );
        aya_ebpf::helpers::generated::bpf_sysctl_get_new_value(
            ptr,
            ev.new.as_mut_ptr().cast(),
            ev.new.len() as _,
        );
    }
    let _ = CHANGES.output::<ChangeEvent>(ev, 0);
    1
}

/// `IPT_SO_SET_REPLACE` / `IP6T_SO_SET_REPLACE` (uapi: 64 at SOL_IP / SOL_IPV6).
const XT_SO_SET_REPLACE: u64 = 64;
const SOL_IP: u64 = 0;
const SOL_IPV6: u64 = 41;

/// Entry of setsockopt(2): keeps a table replacement until the call returns.
#[inline(always)]
pub fn on_setsockopt_enter(ctx: &aya_ebpf::programs::TracePointContext) {
    let c = ccfg();
    let field = |off: u32| -> u64 {
        if off == ABSENT {
            return u64::MAX;
        }
        // SAFETY: offsets from this kernel's tracefs format for this tracepoint.
        unsafe { ctx.read_at::<u64>(off as usize) }.unwrap_or(u64::MAX)
    };
    let (level, optname) = (field(c.tp_sso_level), field(c.tp_sso_optname));
    if optname != XT_SO_SET_REPLACE || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let Some(ev) = who(CHANGE_XT_REPLACE) else {
        return;
    };
    ev.family = if level == SOL_IP { 4 } else { 6 };
    let optval = field(c.tp_sso_optval);
    // struct ipt_replace starts with the table name (char name[XT_TABLE_MAXNAMELEN]).
    // SAFETY: user memory of the calling process, read with the checked helper.
    let _ = unsafe { bpf_probe_read_user_str_bytes(optval as *const u8, &mut ev.name[..32]) };
    let tid = bpf_get_current_pid_tgid();
    let _ = XT_PENDING.insert(&tid, ev, 0);
}

/// Exit of setsockopt(2): a replacement that succeeded is reported.
#[inline(always)]
pub fn on_setsockopt_exit(ctx: &aya_ebpf::programs::TracePointContext) {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: a value of this map, valid until removed below.
    let Some(ev) = (unsafe { XT_PENDING.get(&tid) }) else {
        return;
    };
    let off = ccfg().tp_sso_ret;
    let ret: i64 = if off == ABSENT {
        -1
    } else {
        // SAFETY: offset from this kernel's tracefs format for this tracepoint.
        unsafe { ctx.read_at::<i64>(off as usize) }.unwrap_or(-1)
    };
    if ret == 0 {
        let _ = CHANGES.output::<ChangeEvent>(ev, 0);
    }
    let _ = XT_PENDING.remove(&tid);
}
