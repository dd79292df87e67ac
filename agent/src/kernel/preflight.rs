//! Checks that dropscope may load BPF programs, before anything is attempted.
use anyhow::{bail, Result};
use caps::{CapSet, Capability};

/// Fails with one clear line unless the process has CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON.
pub fn check_privileges() -> Result<()> {
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    if has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
    {
        return Ok(());
    }
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        bail!("running as root but without CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN): a container or systemd unit dropped them; grant them");
    }
    bail!("dropscope needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF programs: run it with sudo");
}

/// Fails with one clear line unless the process has CAP_SYS_ADMIN (needed to `why`).
pub fn check_privileges_for(command: &str, why: &str) -> Result<()> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false) {
        return Ok(());
    }
    bail!("dropscope {command} needs root (CAP_SYS_ADMIN) to {why}: run it with sudo");
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (before 5.11).
/// Failing is fine on newer kernels, which account BPF memory to the cgroup instead.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}
