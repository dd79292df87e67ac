//! The optional context probes: what a packet was going through when it was dropped
//! (netfilter hook, forwarding, route error, the ruleset that returned DROP).
//!
//! Each probe tries fentry/fexit, then kprobe/kretprobe, by actually attaching, and records
//! the mode it got and why better ones were refused. None of them is required: without them
//! the drop tracepoint still classifies every drop (from its reason, location and stack).
use std::path::Path;

use aya::{
    programs::{FEntry, FExit, KProbe},
    Btf, Ebpf,
};

use super::{
    attach::{program, retrying, verbose, Attached},
    btf::{FunctionHome, KernelBtf},
};

/// Which modes the context probes may use (`--context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextMode {
    /// fentry/fexit where the kernel allows it, else kprobe/kretprobe, else none.
    Auto,
    /// fentry/fexit only.
    Fentry,
    /// kprobe/kretprobe only (skips fentry, e.g. to compare or to avoid trampolines).
    Kprobe,
    /// No context probes: the drop tracepoint alone (what kernels with neither allow).
    Off,
}

/// One kernel function of a probe and its programs in each mode.
struct Target {
    function: &'static str,
    /// Runs before the function (None: the exit program alone sees all it needs).
    fentry: Option<&'static str>,
    /// Runs after the function (None: nothing to do there).
    fexit: Option<&'static str>,
    /// The same in kprobe mode (a program may serve several functions).
    kprobe: Option<&'static str>,
    kretprobe: Option<&'static str>,
}

/// A context probe: the functions it watches, attached all in one mode or not at all.
struct Probe {
    name: &'static str,
    targets: &'static [Target],
}

const PROBES: [Probe; 6] = [
    Probe {
        name: "nf_hook_slow",
        targets: &[Target {
            function: "nf_hook_slow",
            fentry: Some("nf_hook_slow_fentry"),
            fexit: Some("nf_hook_slow_fexit"),
            kprobe: Some("nf_hook_slow_kprobe"),
            kretprobe: Some("nf_hook_slow_kretprobe"),
        }],
    },
    Probe {
        name: "ip_forward",
        targets: &[
            Target {
                function: "ip_forward",
                fentry: Some("ip_forward_fentry"),
                fexit: Some("ip_forward_fexit"),
                kprobe: Some("forward_kprobe"),
                kretprobe: Some("forward_kretprobe"),
            },
            Target {
                function: "ip6_forward",
                fentry: Some("ip6_forward_fentry"),
                fexit: Some("ip6_forward_fexit"),
                kprobe: Some("forward_kprobe"),
                kretprobe: Some("forward_kretprobe"),
            },
        ],
    },
    Probe {
        name: "ip_error",
        targets: &[Target {
            function: "ip_error",
            fentry: Some("ip_error_fentry"),
            fexit: None,
            kprobe: Some("ip_error_kprobe"),
            kretprobe: None,
        }],
    },
    Probe {
        name: "nft_do_chain",
        targets: &[Target {
            function: "nft_do_chain",
            fentry: Some("nft_do_chain_fentry"),
            fexit: Some("nft_do_chain_fexit"),
            kprobe: Some("nft_do_chain_kprobe"),
            kretprobe: Some("nft_do_chain_kretprobe"),
        }],
    },
    Probe {
        name: "ipt_do_table",
        targets: &[
            Target {
                function: "ipt_do_table",
                fentry: None,
                fexit: Some("ipt_do_table_fexit"),
                kprobe: Some("xt_do_table_kprobe"),
                kretprobe: Some("xt_do_table_kretprobe"),
            },
            Target {
                function: "ip6t_do_table",
                fentry: None,
                fexit: Some("ip6t_do_table_fexit"),
                kprobe: Some("xt_do_table_kprobe"),
                kretprobe: Some("xt_do_table_kretprobe"),
            },
        ],
    },
    // ICMPv6 errors (there is no tracepoint): the call keeps the packet it answers, the push
    // inside it says the error really left (after the rate limit). Both or neither.
    Probe {
        name: "icmp6_send",
        targets: &[
            Target {
                function: "icmp6_send",
                fentry: Some("icmp6_send_fentry"),
                fexit: Some("icmp6_send_fexit"),
                kprobe: Some("icmp6_send_kprobe"),
                kretprobe: Some("icmp6_send_kretprobe"),
            },
            Target {
                function: "icmpv6_push_pending_frames",
                fentry: Some("icmp6_push_fentry"),
                fexit: None,
                kprobe: Some("icmp6_push_kprobe"),
                kretprobe: None,
            },
        ],
    },
];

/// Attaches every context probe in the best mode `mode` allows.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kernel: &KernelBtf,
    mode: ContextMode,
) -> Vec<Attached> {
    let mut refused = Refused::default();
    PROBES
        .iter()
        .map(|p| attach_probe(ebpf, btf, kernel, p, mode, &mut refused))
        .collect()
}

/// Refusals that hold for every probe (lockdown, no kprobes): found once, not retried.
#[derive(Default)]
struct Refused {
    fentry: Option<String>,
    kprobe: Option<String>,
}

fn attach_probe(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kernel: &KernelBtf,
    probe: &Probe,
    mode: ContextMode,
    refused: &mut Refused,
) -> Attached {
    let unavailable = |note: String| Attached {
        probe: probe.name,
        mode: "unavailable",
        note: Some(note),
    };
    if mode == ContextMode::Off {
        return unavailable("disabled (--context off)".into());
    }
    // Functions this kernel does not have at all (e.g. ip6t_do_table without ip6_tables).
    // A probe whose functions only make sense together needs them all.
    let present: Vec<&Target> = probe
        .targets
        .iter()
        .filter(|t| kernel.function_home(t.function) != FunctionHome::Missing)
        .collect();
    let absent: Vec<&str> = probe
        .targets
        .iter()
        .filter(|t| !present.iter().any(|p| p.function == t.function))
        .map(|t| t.function)
        .collect();
    let mut notes: Vec<String> = absent
        .iter()
        .map(|f| format!("{f}: not in this kernel's BTF (module not loaded?)"))
        .collect();
    if present.is_empty() {
        return unavailable(notes.join("; "));
    }
    if let Some(why) = &refused.fentry {
        notes.push(format!("fentry: {why}"));
    } else if matches!(mode, ContextMode::Auto | ContextMode::Fentry) {
        match attach_fentry(ebpf, btf, kernel, &present) {
            Ok(()) => {
                return Attached {
                    probe: probe.name,
                    mode: "fentry",
                    note: (!notes.is_empty()).then(|| notes.join("; ")),
                }
            }
            Err(e) => {
                let why = e.to_string();
                if why.contains("EPERM") {
                    refused.fentry = Some(why.clone());
                }
                notes.push(format!("fentry: {why}"));
            }
        }
    } else {
        notes.push("fentry: skipped (--context kprobe)".into());
    }
    if let Some(why) = &refused.kprobe {
        notes.push(format!("kprobe: {why}"));
    } else if matches!(mode, ContextMode::Auto | ContextMode::Kprobe) {
        match attach_kprobe(ebpf, &present) {
            Ok(()) => {
                return Attached {
                    probe: probe.name,
                    mode: "kprobe",
                    note: Some(notes.join("; ")),
                }
            }
            Err(e) => {
                let why = e.to_string();
                if why.contains("no kprobes") {
                    refused.kprobe = Some(why.clone());
                }
                notes.push(format!("kprobe: {why}"));
            }
        }
    }
    unavailable(notes.join("; "))
}

/// fentry/fexit on every present function, or none of them (a half-attached probe would
/// push frames nobody pops).
fn attach_fentry(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kernel: &KernelBtf,
    targets: &[&Target],
) -> anyhow::Result<()> {
    for t in targets {
        if let FunctionHome::Module(m) = kernel.function_home(t.function) {
            anyhow::bail!(
                "{} is in module {m}; fentry on module functions is not supported by this loader",
                t.function
            );
        }
    }
    let mut loaded: Vec<&'static str> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for t in targets {
            // The exit side first: a call that began before the entry side was attached
            // then pops nothing instead of leaving a frame behind.
            if let Some(name) = t.fexit {
                let prog: &mut FExit = program(ebpf, name)?.try_into()?;
                loaded.push(name);
                retrying(|| prog.load(t.function, btf)).map_err(verbose)?;
                prog.attach().map_err(verbose)?;
            }
            if let Some(name) = t.fentry {
                let prog: &mut FEntry = program(ebpf, name)?.try_into()?;
                loaded.push(name);
                retrying(|| prog.load(t.function, btf)).map_err(verbose)?;
                prog.attach().map_err(verbose)?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        unload(ebpf, &loaded);
    }
    result.map_err(|e| anyhow::anyhow!(explain_refusal(&format!("{e:#}"))))
}

fn attach_kprobe(ebpf: &mut Ebpf, targets: &[&Target]) -> anyhow::Result<()> {
    if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        anyhow::bail!("this kernel has no kprobes (CONFIG_KPROBES off)");
    }
    // Return probes first (as fexit before fentry): a call already under way then pops
    // nothing rather than leaving a frame behind. One program may serve several functions.
    let mut plan: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for t in targets.iter() {
        for name in t.kretprobe.iter().chain(t.kprobe.iter()) {
            match plan.iter_mut().find(|(n, _)| n == name) {
                Some((_, fns)) => fns.push(t.function),
                None => plan.push((name, vec![t.function])),
            }
        }
    }
    plan.sort_by_key(|(name, _)| !name.contains("kretprobe"));
    let names: Vec<&'static str> = plan.iter().map(|(n, _)| *n).collect();
    let result = (|| -> anyhow::Result<()> {
        for (name, functions) in &plan {
            let prog: &mut KProbe = program(ebpf, name)?.try_into()?;
            retrying(|| prog.load()).map_err(verbose)?;
            for f in functions {
                prog.attach(f, 0).map_err(verbose)?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        unload(ebpf, &names);
    }
    result
}

fn unload(ebpf: &mut Ebpf, names: &[&'static str]) {
    for name in names {
        match ebpf.program_mut(name) {
            Some(aya::programs::Program::FEntry(p)) => drop(p.unload()),
            Some(aya::programs::Program::FExit(p)) => drop(p.unload()),
            Some(aya::programs::Program::KProbe(p)) => drop(p.unload()),
            _ => {}
        }
    }
}

/// EPERM from a tracing program load usually means lockdown: say so, briefly.
fn explain_refusal(msg: &str) -> String {
    if !msg.contains("Operation not permitted") {
        return msg.to_string();
    }
    match lockdown() {
        Some(l) if l != "none" => format!("refused by the kernel (EPERM, lockdown={l})"),
        _ => "refused by the kernel (EPERM)".to_string(),
    }
}

/// The kernel lockdown mode, from securityfs or the boot command line.
fn lockdown() -> Option<String> {
    if let Ok(s) = std::fs::read_to_string("/sys/kernel/security/lockdown") {
        let start = s.find('[')? + 1;
        let end = s[start..].find(']')? + start;
        return Some(s[start..end].to_string());
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("lockdown="))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSymbol};

    use super::*;

    #[test]
    fn every_context_program_is_in_the_embedded_object() {
        let elf = object::File::parse(super::super::attach::PROBES_OBJECT)
            .expect("embedded eBPF object is ELF");
        for probe in &PROBES {
            let mut names = Vec::new();
            for t in probe.targets {
                names.extend(t.fentry);
                names.extend(t.fexit);
                names.extend(t.kprobe);
                names.extend(t.kretprobe);
            }
            for name in names {
                assert!(
                    elf.symbols().any(|s| s.name() == Ok(name)),
                    "{name} missing from the eBPF object"
                );
            }
        }
    }

    #[test]
    fn every_context_function_is_known_to_this_kernel() {
        // The host kernel builds netfilter in: every function is in vmlinux BTF here.
        let kernel = KernelBtf::open(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        for probe in &PROBES {
            for t in probe.targets {
                assert_ne!(
                    kernel.function_home(t.function),
                    FunctionHome::Missing,
                    "{}",
                    t.function
                );
            }
        }
        let params = kernel.params("ipt_do_table").unwrap();
        assert!(params.iter().any(|p| p == "skb"), "{params:?}");
    }
}
