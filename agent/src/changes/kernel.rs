//! The kernel side of change watching: the cgroup/sysctl program on the cgroup v2 root and the
//! setsockopt syscall tracepoints, their layouts, and their records decoded into changes.
use std::{fs::File, path::Path};

use agent_ebpf::{ChangeConfig, ChangeEvent, ABSENT, CHANGE_SYSCTL, CHANGE_XT_REPLACE};
use aya::{
    programs::{links::CgroupAttachMode, CgroupSysctl, TracePoint},
    Ebpf,
};

use super::{
    process::{cgroup2_mount, CgroupIndex, Process},
    Change, ChangeKind,
};
use crate::kernel::{
    attach::{program, verbose, Attached},
    btf::KernelBtf,
    tracefs,
};

/// The layouts the change programs need: task and namespace structs from BTF, the
/// setsockopt tracepoints from tracefs (when mounted).
pub fn config(kernel: &KernelBtf, tracefs_root: Option<&Path>) -> ChangeConfig {
    let off = |s: &str, m: &str| kernel.offset_of(s, m).unwrap_or(ABSENT);
    let mut c = ChangeConfig {
        task_tgid: off("task_struct", "tgid"),
        task_comm: off("task_struct", "comm"),
        task_real_parent: off("task_struct", "real_parent"),
        task_nsproxy: off("task_struct", "nsproxy"),
        nsproxy_net_ns: off("nsproxy", "net_ns"),
        net_inum: off("net", "ns.inum"),
        ..ChangeConfig::UNKNOWN
    };
    if let Some(root) = tracefs_root {
        if let Ok(f) = tracefs::fields(root, "syscalls", "sys_enter_setsockopt") {
            let at = |n: &str| f.get(n).map_or(ABSENT, |f| f.offset);
            (c.tp_sso_level, c.tp_sso_optname, c.tp_sso_optval) =
                (at("level"), at("optname"), at("optval"));
        }
        if let Ok(f) = tracefs::fields(root, "syscalls", "sys_exit_setsockopt") {
            c.tp_sso_ret = f.get("ret").map_or(ABSENT, |f| f.offset);
        }
    }
    c
}

/// Attaches the change programs that this kernel and host allow; says for each what it got.
pub fn attach(ebpf: &mut Ebpf, config: &ChangeConfig) -> Vec<Attached> {
    vec![attach_sysctl(ebpf), attach_setsockopt(ebpf, config)]
}

fn attach_sysctl(ebpf: &mut Ebpf) -> Attached {
    let result = (|| -> anyhow::Result<String> {
        let root = cgroup2_mount().ok_or_else(|| {
            anyhow::anyhow!("no cgroup v2 hierarchy mounted (sysctl changes seen only through netlink: forwarding and rp_filter, without the process)")
        })?;
        let dir = File::open(&root)?;
        let prog: &mut CgroupSysctl = program(ebpf, "sysctl_write")?.try_into()?;
        // With bpf_link (5.7+) programs of a cgroup coexist whatever the mode, and the link
        // API refuses the ALLOW_MULTI flag; `Single` is the mode it takes.
        prog.load().map_err(verbose)?;
        prog.attach(dir, CgroupAttachMode::Single)
            .map_err(verbose)?;
        Ok(root.display().to_string())
    })();
    match result {
        Ok(root) => Attached {
            probe: "sysctl_write",
            mode: "cgroup_sysctl",
            note: Some(format!("on the cgroup v2 root {root}")),
        },
        Err(e) => Attached {
            probe: "sysctl_write",
            mode: "unavailable",
            note: Some(format!("{e:#}")),
        },
    }
}

fn attach_setsockopt(ebpf: &mut Ebpf, config: &ChangeConfig) -> Attached {
    if config.tp_sso_optname == ABSENT || config.tp_sso_ret == ABSENT {
        return Attached {
            probe: "xt_replace",
            mode: "unavailable",
            note: Some(
                "syscalls/sys_{enter,exit}_setsockopt not available (tracefs not mounted, or no syscall tracepoints)".into(),
            ),
        };
    }
    let result = (|| -> anyhow::Result<()> {
        for (name, event) in [
            ("setsockopt_exit", "sys_exit_setsockopt"),
            ("setsockopt_enter", "sys_enter_setsockopt"),
        ] {
            let prog: &mut TracePoint = program(ebpf, name)?.try_into()?;
            prog.load().map_err(verbose)?;
            prog.attach("syscalls", event).map_err(verbose)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Attached {
            probe: "xt_replace",
            mode: "tracepoint",
            note: None,
        },
        Err(e) => Attached {
            probe: "xt_replace",
            mode: "unavailable",
            note: Some(format!("{e:#}")),
        },
    }
}

/// A record of the CHANGES ring buffer, as a change.
pub fn decode(bytes: &[u8], cgroups: &mut CgroupIndex) -> Option<Change> {
    if bytes.len() < std::mem::size_of::<ChangeEvent>() {
        return None;
    }
    // SAFETY: length checked; ChangeEvent is plain old data valid for any bit pattern.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ChangeEvent>()) };
    let chain: Vec<(u32, String)> = ev
        .pids
        .iter()
        .zip(ev.comms.iter())
        .map(|(&pid, comm)| (pid, c_string(comm)))
        .collect();
    let process = Process::from_kernel(&chain, ev.cgroup_id, cgroups);
    let name = c_string(&ev.name);
    let (kind, key, old, new) = match ev.kind {
        CHANGE_SYSCTL => (
            ChangeKind::Sysctl,
            name.replace('/', "."),
            Some(c_string(&ev.old).trim().to_string()),
            Some(c_string(&ev.new).trim().to_string()),
        ),
        CHANGE_XT_REPLACE => (
            ChangeKind::IptablesLegacy,
            format!(
                "iptables-legacy.{} {name}",
                if ev.family == 6 { "ip6" } else { "ip" }
            ),
            None,
            None,
        ),
        _ => return None,
    };
    let detail = (kind == ChangeKind::IptablesLegacy).then(|| {
        format!(
            "table {name} replaced by {}",
            if ev.family == 6 {
                "ip6tables-legacy"
            } else {
                "iptables-legacy"
            }
        )
    });
    Some(Change {
        ts_ns: ev.ts_ns,
        netns: ev.netns,
        kind,
        key,
        old,
        new,
        detail,
        echoes: Vec::new(),
        process,
    })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut ChangeEvent)) -> Vec<u8> {
        // SAFETY: all-zero is a valid ChangeEvent.
        let mut ev: ChangeEvent = unsafe { std::mem::zeroed() };
        f(&mut ev);
        // SAFETY: POD viewed as bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&ev as *const ChangeEvent).cast::<u8>(),
                std::mem::size_of::<ChangeEvent>(),
            )
        }
        .to_vec()
    }

    fn put(dst: &mut [u8], s: &str) {
        dst[..s.len()].copy_from_slice(s.as_bytes());
    }

    #[test]
    fn a_sysctl_write_becomes_a_keyed_change_with_its_writer() {
        let bytes = raw(|e| {
            e.kind = CHANGE_SYSCTL;
            e.netns = 4026532000;
            e.pids = [0, 0, 0]; // a process long gone: no process claimed
            put(&mut e.name, "net/ipv4/conf/all/forwarding");
            put(&mut e.old, "1\n");
            put(&mut e.new, "0\n");
        });
        let c = decode(&bytes, &mut CgroupIndex::default()).unwrap();
        assert_eq!(
            (c.key.as_str(), c.old.as_deref(), c.new.as_deref()),
            ("net.ipv4.conf.all.forwarding", Some("1"), Some("0"))
        );
        assert!(c.process.is_none());
        let bytes = raw(|e| {
            e.kind = CHANGE_XT_REPLACE;
            e.family = 4;
            e.pids = [812, 800, 1];
            put(&mut e.comms[0], "iptables-legacy");
            put(&mut e.comms[1], "wrapper.sh");
            put(&mut e.comms[2], "systemd");
            put(&mut e.name, "filter");
        });
        let c = decode(&bytes, &mut CgroupIndex::default()).unwrap();
        assert_eq!(c.key, "iptables-legacy.ip filter");
        let p = c.process.unwrap();
        assert_eq!(
            p.to_string(),
            "iptables-legacy (pid 812) <- wrapper.sh (pid 800) <- systemd (pid 1)"
        );
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const SIZE: usize = std::mem::size_of::<ChangeEvent>();

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_bytes_of_any_length_never_panic(bytes in fuzz::bytes(SIZE + 64)) {
                let c = decode(&bytes, &mut CgroupIndex::default());
                if bytes.len() < SIZE {
                    prop_assert!(c.is_none(), "a short record decoded");
                }
            }

            #[test]
            fn prop_a_record_decodes_to_its_own_fields(
                mut bytes in prop::collection::vec(any::<u8>(), SIZE),
                kind in 0u8..4,
                cut in 0..SIZE,
            ) {
                bytes[std::mem::offset_of!(ChangeEvent, kind)] = kind;
                // Processes long gone: nothing is read from /proc for them.
                bytes[std::mem::offset_of!(ChangeEvent, pids)..][..4].fill(0);
                // SAFETY: POD, length checked by the strategy.
                let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ChangeEvent>()) };
                prop_assert!(decode(&bytes[..cut], &mut CgroupIndex::default()).is_none());
                let c = decode(&bytes, &mut CgroupIndex::default());
                let name = c_string(&ev.name);
                match kind {
                    CHANGE_SYSCTL => {
                        let c = c.unwrap();
                        let _ = c.what();
                        prop_assert_eq!(c.kind, ChangeKind::Sysctl);
                        prop_assert_eq!(c.key, name.replace('/', "."));
                        prop_assert_eq!(c.old, Some(c_string(&ev.old).trim().to_string()));
                        prop_assert_eq!(c.new, Some(c_string(&ev.new).trim().to_string()));
                        prop_assert_eq!((c.ts_ns, c.netns), (ev.ts_ns, ev.netns));
                        prop_assert!(c.process.is_none());
                    }
                    CHANGE_XT_REPLACE => {
                        let c = c.unwrap();
                        prop_assert_eq!(c.kind, ChangeKind::IptablesLegacy);
                        let suffix = format!(" {name}");
                        prop_assert!(c.key.ends_with(&suffix), "{}", c.key);
                        prop_assert_eq!((c.old, c.new), (None, None));
                    }
                    _ => prop_assert!(c.is_none()),
                }
            }
        }
    }
}
