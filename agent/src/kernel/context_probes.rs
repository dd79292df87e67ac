//! The optional context probes: what a packet was going through when it was dropped
//! (netfilter hook, forwarding, route error, the ruleset that returned DROP).
//!
//! Each probe tries fentry/fexit, then kprobe/kretprobe, and records the mode it got and why
//! better ones were refused. None of them is required: without them the drop tracepoint still
//! classifies every drop (from its reason, location and stack).
//!
//! The probes on paths every forwarded or filtered packet takes (nf_hook_slow, ip_forward,
//! nft_do_chain, ipt_do_table) cost every such packet, dropped or not. By default they are
//! only loaded at start and attached on demand: when a netfilter or forwarding drop is seen,
//! and detached again after a quiet period ([`ContextProbes`]). Until they are attached, such a
//! drop gets the answer the drop tracepoint alone gives (the hook from the kernel stack, the
//! engine from the freeing function and the namespace's tables). `--context-arm always`
//! keeps them attached from start to exit. The probes on error paths (ip_error, icmp6_send)
//! are always attached.
use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    programs::{
        fentry::FEntryLinkId, fexit::FExitLinkId, kprobe::KProbeLinkId, FEntry, FExit, KProbe,
    },
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

/// When the context probes on hot paths are attached (`--context-arm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arming {
    /// While drops that need them occur (netfilter or forwarding drops), detached after
    /// `--context-linger` seconds without any.
    OnDemand,
    /// From start to exit (every forwarded or filtered packet pays for them).
    Always,
}

/// The traffic a probe runs for, which decides when it is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// Netfilter hooks and rulesets: every filtered packet runs through them.
    Netfilter,
    /// Forwarding: every forwarded packet.
    Forward,
    /// Error paths only (route errors, ICMPv6 errors): always attached.
    ErrorsOnly,
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
    traffic: Traffic,
    targets: &'static [Target],
}

const PROBES: [Probe; 6] = [
    Probe {
        name: "nf_hook_slow",
        traffic: Traffic::Netfilter,
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
        traffic: Traffic::Forward,
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
        traffic: Traffic::ErrorsOnly,
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
        traffic: Traffic::Netfilter,
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
        traffic: Traffic::Netfilter,
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
        traffic: Traffic::ErrorsOnly,
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

impl Traffic {
    /// The frame stacks (indices in the eBPF side's `FRAMES`) its probes push on.
    fn frame_stacks(self) -> &'static [u32] {
        // HOT_FRAME_STACKS is [forwarding, netfilter hooks, rulesets].
        let stacks = &agent_ebpf::HOT_FRAME_STACKS;
        match self {
            Traffic::Forward => &stacks[..1],
            Traffic::Netfilter => &stacks[1..],
            Traffic::ErrorsOnly => &[],
        }
    }
}

/// How a probe's programs attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Fentry,
    Kprobe,
}

/// A hot-path probe whose programs are loaded, and attached only while drops need it.
struct OnDemand {
    probe: &'static Probe,
    way: Way,
    targets: Vec<&'static Target>,
    /// Its links while attached.
    links: Vec<LinkId>,
    /// Attaching it failed once: not tried again.
    broken: bool,
}

enum LinkId {
    FEntry(&'static str, FEntryLinkId),
    FExit(&'static str, FExitLinkId),
    KProbe(&'static str, KProbeLinkId),
}

/// Which hot paths the drops just seen need probes on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub netfilter: bool,
    pub forward: bool,
}

impl Needs {
    /// What a drop (its reason and the function that freed it, as named by the kernel) needs:
    /// a netfilter drop needs the hook, the ruleset and (in FORWARD) the ingress device; a
    /// drop on the forwarding path (in ip_forward, or on the way out of a packet that arrived
    /// on another device) needs the ingress device.
    pub fn of(reason: &str, location: &str, arrived_elsewhere: bool) -> Needs {
        let netfilter = reason == "NETFILTER_DROP"
            || matches!(
                location,
                "nf_hook_slow" | "nft_do_chain" | "ipt_do_table" | "ip6t_do_table"
            );
        let forward = netfilter
            || arrived_elsewhere
            || matches!(
                location,
                "ip_forward" | "ip6_forward" | "ip_forward_finish" | "ip6_forward_finish"
            );
        Needs { netfilter, forward }
    }

    pub fn add(&mut self, other: Needs) {
        self.netfilter |= other.netfilter;
        self.forward |= other.forward;
    }

    fn wants(&self, traffic: Traffic) -> bool {
        match traffic {
            Traffic::Netfilter => self.netfilter,
            Traffic::Forward => self.forward,
            Traffic::ErrorsOnly => false,
        }
    }
}

/// The hot-path probes attached on demand, and when each path was last needed.
pub struct ContextProbes {
    on_demand: Vec<OnDemand>,
    linger: Duration,
    netfilter_needed_at: Option<Instant>,
    forward_needed_at: Option<Instant>,
}

impl ContextProbes {
    /// Nothing to arm (`--context off`, `--context-arm always`, or no probe loads here).
    pub fn none() -> Self {
        ContextProbes {
            on_demand: Vec::new(),
            linger: Duration::ZERO,
            netfilter_needed_at: None,
            forward_needed_at: None,
        }
    }

    /// Whether any probe is managed on demand (attached or not).
    pub fn has_on_demand(&self) -> bool {
        !self.on_demand.is_empty()
    }

    /// Attaches the probes of the paths `needs` names, if they are not attached yet, and
    /// notes that they are needed now.
    pub fn need(&mut self, ebpf: &mut Ebpf, needs: Needs) {
        if !needs.netfilter && !needs.forward {
            return;
        }
        let now = Instant::now();
        if needs.netfilter {
            self.netfilter_needed_at = Some(now);
        }
        if needs.forward {
            self.forward_needed_at = Some(now);
        }
        let mut armed = Vec::new();
        for p in &mut self.on_demand {
            if p.broken || !p.links.is_empty() || !needs.wants(p.probe.traffic) {
                continue;
            }
            match attach_loaded(ebpf, p.way, &p.targets) {
                Ok(links) => {
                    p.links = links;
                    armed.push(p.probe.name);
                }
                Err(e) => {
                    p.broken = true;
                    tracing::warn!(
                        "context probe {} could not be attached ({e:#}); its drops get the answer without it",
                        p.probe.name
                    );
                }
            }
        }
        if !armed.is_empty() {
            tracing::info!("context probes attached: {}", armed.join(", "));
        }
    }

    /// Detaches the probes of paths not needed for `linger`, and empties their frame stacks
    /// (a call cut short by the detach leaves its frame behind; an empty stack also spares
    /// the drop probe the frame's age check).
    pub fn expire(&mut self, ebpf: &mut Ebpf) {
        let now = Instant::now();
        let quiet = |needed_at: Option<Instant>| needed_at.is_none_or(|t| now - t >= self.linger);
        let (nf_quiet, fwd_quiet) = (quiet(self.netfilter_needed_at), quiet(self.forward_needed_at));
        let going: Vec<usize> = self
            .on_demand
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.links.is_empty())
            .filter(|(_, p)| match p.probe.traffic {
                Traffic::Netfilter => nf_quiet,
                Traffic::Forward => fwd_quiet,
                Traffic::ErrorsOnly => false,
            })
            .map(|(i, _)| i)
            .collect();
        if going.is_empty() {
            return;
        }
        let mut names = Vec::new();
        let mut stacks = Vec::new();
        for i in going {
            let p = &mut self.on_demand[i];
            detach_links(ebpf, std::mem::take(&mut p.links));
            names.push(p.probe.name);
            stacks.extend_from_slice(p.probe.traffic.frame_stacks());
        }
        // Once detached, no call of theirs is under way any more (the kernel waits for them).
        reset_frames(ebpf, &stacks);
        tracing::info!(
            "context probes detached after {} s without drops that need them: {}",
            self.linger.as_secs_f64(),
            names.join(", ")
        );
    }
}

/// Every kernel function a context probe may attach to.
pub fn functions() -> impl Iterator<Item = &'static str> {
    PROBES.iter().flat_map(|p| p.targets).map(|t| t.function)
}

/// Where each context probe's functions are defined in this kernel, read from its BTF before
/// the loader parses a copy of its own (the two parses are never held at once).
pub struct FunctionHomes(HashMap<&'static str, FunctionHome>);

impl FunctionHomes {
    pub fn of(kernel: &KernelBtf) -> Self {
        FunctionHomes(functions().map(|f| (f, kernel.function_home(f))).collect())
    }

    fn get(&self, function: &str) -> FunctionHome {
        self.0.get(function).cloned().unwrap_or(FunctionHome::Missing)
    }
}

/// Loads every context probe in the best mode `mode` allows; attaches those on error paths,
/// and those on hot paths too with `Arming::Always`. The others wait in the returned
/// [`ContextProbes`] until drops need them.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    homes: &FunctionHomes,
    mode: ContextMode,
    arming: Arming,
    linger: Duration,
) -> (Vec<Attached>, ContextProbes) {
    let mut refused = Refused::default();
    let mut context = ContextProbes::none();
    context.linger = linger;
    let report = PROBES
        .iter()
        .map(|p| {
            let lazy = arming == Arming::OnDemand && p.traffic != Traffic::ErrorsOnly;
            let (got, ready) = prepare_probe(ebpf, btf, homes, p, mode, lazy, &mut refused);
            if let Some((way, targets)) = ready {
                context.on_demand.push(OnDemand {
                    probe: p,
                    way,
                    targets,
                    links: Vec::new(),
                    broken: false,
                });
            }
            got
        })
        .collect();
    (report, context)
}

/// Refusals that hold for every probe (lockdown, no kprobes): found once, not retried.
#[derive(Default)]
struct Refused {
    fentry: Option<String>,
    kprobe: Option<String>,
}

/// What an on-demand probe's note says, before why better modes were refused.
const ON_DEMAND_NOTE: &str = "attached on demand: while netfilter or forwarding drops occur, detached after --context-linger seconds without any; the first drop of a burst gets the answer without it (hook from the kernel stack)";

/// Loads a probe in the best way `mode` allows, and attaches it unless `lazy`; a lazy probe
/// that loaded comes back with its way and targets.
#[allow(clippy::type_complexity)]
fn prepare_probe(
    ebpf: &mut Ebpf,
    btf: &Btf,
    homes: &FunctionHomes,
    probe: &'static Probe,
    mode: ContextMode,
    lazy: bool,
    refused: &mut Refused,
) -> (Attached, Option<(Way, Vec<&'static Target>)>) {
    let unavailable = |note: String| Attached {
        probe: probe.name,
        mode: "unavailable",
        note: Some(note),
    };
    if mode == ContextMode::Off {
        return (unavailable("disabled (--context off)".into()), None);
    }
    // Functions this kernel does not have at all (e.g. ip6t_do_table without ip6_tables).
    // A probe whose functions only make sense together needs them all.
    let present: Vec<&'static Target> = probe
        .targets
        .iter()
        .filter(|t| homes.get(t.function) != FunctionHome::Missing)
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
        return (unavailable(notes.join("; ")), None);
    }
    let got = |way: Way, notes: &[String]| {
        let mut all: Vec<String> = Vec::new();
        if lazy {
            all.push(ON_DEMAND_NOTE.to_string());
        }
        all.extend(notes.iter().cloned());
        Attached {
            probe: probe.name,
            mode: match way {
                Way::Fentry => "fentry",
                Way::Kprobe => "kprobe",
            },
            note: (!all.is_empty()).then(|| all.join("; ")),
        }
    };
    for way in [Way::Fentry, Way::Kprobe] {
        let (memo, allowed, label) = match way {
            Way::Fentry => (
                &mut refused.fentry,
                matches!(mode, ContextMode::Auto | ContextMode::Fentry),
                "fentry",
            ),
            Way::Kprobe => (
                &mut refused.kprobe,
                matches!(mode, ContextMode::Auto | ContextMode::Kprobe),
                "kprobe",
            ),
        };
        if let Some(why) = memo {
            notes.push(format!("{label}: {why}"));
            continue;
        }
        if !allowed {
            if way == Way::Fentry {
                notes.push("fentry: skipped (--context kprobe)".into());
            }
            continue;
        }
        let result = load(ebpf, btf, homes, way, &present).and_then(|()| {
            if lazy {
                Ok(())
            } else {
                // Attached for good: the links stay with their programs.
                attach_loaded(ebpf, way, &present).map(|_| ())
            }
        });
        match result {
            Ok(()) => {
                let ready = lazy.then(|| (way, present.clone()));
                return (got(way, &notes), ready);
            }
            Err(e) => {
                unload(ebpf, &present, way);
                let why = e.to_string();
                let global = match way {
                    Way::Fentry => why.contains("EPERM"),
                    Way::Kprobe => why.contains("no kprobes"),
                };
                if global {
                    *memo = Some(why.clone());
                }
                notes.push(format!("{label}: {why}"));
            }
        }
    }
    (unavailable(notes.join("; ")), None)
}

/// Loads (verifies) a probe's programs for `way`.
fn load(
    ebpf: &mut Ebpf,
    btf: &Btf,
    homes: &FunctionHomes,
    way: Way,
    targets: &[&Target],
) -> anyhow::Result<()> {
    match way {
        Way::Fentry => {
            for t in targets {
                if let FunctionHome::Module(m) = homes.get(t.function) {
                    anyhow::bail!(
                        "{} is in module {m}; fentry on module functions is not supported by this loader",
                        t.function
                    );
                }
            }
            let result = (|| -> anyhow::Result<()> {
                for t in targets {
                    if let Some(name) = t.fexit {
                        let prog: &mut FExit = program(ebpf, name)?.try_into()?;
                        retrying(|| prog.load(t.function, btf)).map_err(verbose)?;
                    }
                    if let Some(name) = t.fentry {
                        let prog: &mut FEntry = program(ebpf, name)?.try_into()?;
                        retrying(|| prog.load(t.function, btf)).map_err(verbose)?;
                    }
                }
                Ok(())
            })();
            result.map_err(|e| anyhow::anyhow!(explain_refusal(&format!("{e:#}"))))
        }
        Way::Kprobe => {
            if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
                anyhow::bail!("this kernel has no kprobes (CONFIG_KPROBES off)");
            }
            for name in kprobe_programs(targets) {
                let prog: &mut KProbe = program(ebpf, name)?.try_into()?;
                retrying(|| prog.load()).map_err(verbose)?;
            }
            Ok(())
        }
    }
}

/// The kprobe programs of `targets`, return probes first, each once (one program may serve
/// several functions).
fn kprobe_programs(targets: &[&Target]) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for t in targets {
        for name in t.kretprobe.iter().chain(t.kprobe.iter()) {
            if !names.contains(name) {
                names.push(name);
            }
        }
    }
    names.sort_by_key(|name| !name.contains("kretprobe"));
    names
}

/// Attaches loaded programs: every function of the probe, or none of them (a half-attached
/// probe would push frames nobody pops). The exit side first: a call already under way then
/// pops nothing rather than leaving a frame behind.
fn attach_loaded(ebpf: &mut Ebpf, way: Way, targets: &[&Target]) -> anyhow::Result<Vec<LinkId>> {
    let mut links = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        match way {
            Way::Fentry => {
                for t in targets {
                    if let Some(name) = t.fexit {
                        let prog: &mut FExit = program(ebpf, name)?.try_into()?;
                        links.push(LinkId::FExit(name, prog.attach().map_err(verbose)?));
                    }
                    if let Some(name) = t.fentry {
                        let prog: &mut FEntry = program(ebpf, name)?.try_into()?;
                        links.push(LinkId::FEntry(name, prog.attach().map_err(verbose)?));
                    }
                }
            }
            Way::Kprobe => {
                let mut plan: Vec<(&'static str, &'static str)> = Vec::new();
                for t in targets {
                    for name in t.kretprobe.iter().chain(t.kprobe.iter()) {
                        plan.push((name, t.function));
                    }
                }
                plan.sort_by_key(|(name, _)| !name.contains("kretprobe"));
                for (name, function) in plan {
                    let prog: &mut KProbe = program(ebpf, name)?.try_into()?;
                    links.push(LinkId::KProbe(
                        name,
                        prog.attach(function, 0).map_err(verbose)?,
                    ));
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(links),
        Err(e) => {
            detach_links(ebpf, links);
            Err(e)
        }
    }
}

/// Detaches links in the reverse order of attaching: entry side first.
fn detach_links(ebpf: &mut Ebpf, mut links: Vec<LinkId>) {
    links.reverse();
    for link in links {
        let result = match link {
            LinkId::FEntry(name, id) => {
                program(ebpf, name).and_then(|p| Ok(<&mut FEntry>::try_from(p)?.detach(id)?))
            }
            LinkId::FExit(name, id) => {
                program(ebpf, name).and_then(|p| Ok(<&mut FExit>::try_from(p)?.detach(id)?))
            }
            LinkId::KProbe(name, id) => {
                program(ebpf, name).and_then(|p| Ok(<&mut KProbe>::try_from(p)?.detach(id)?))
            }
        };
        if let Err(e) = result {
            tracing::warn!("detaching a context probe: {e:#}");
        }
    }
}

/// Empties frame stacks on every CPU, so calls cut short by a detach leave nothing behind for
/// the next attach.
fn reset_frames(ebpf: &mut Ebpf, stacks: &[u32]) {
    let Some(map) = ebpf.map_mut("FRAMES") else {
        return;
    };
    let Ok(mut frames) =
        aya::maps::PerCpuArray::<_, [u8; agent_ebpf::FRAMES_VALUE_SIZE]>::try_from(map)
    else {
        tracing::debug!("FRAMES is not the size expected; frames not reset");
        return;
    };
    let Ok(cpus) = aya::util::nr_cpus() else {
        return;
    };
    for &stack in stacks {
        let zero = vec![[0u8; agent_ebpf::FRAMES_VALUE_SIZE]; cpus];
        if let Ok(values) = aya::maps::PerCpuValues::try_from(zero) {
            let _ = frames.set(stack, values, 0);
        }
    }
}

fn unload(ebpf: &mut Ebpf, targets: &[&Target], way: Way) {
    let names: Vec<&'static str> = match way {
        Way::Fentry => targets
            .iter()
            .flat_map(|t| t.fexit.iter().chain(t.fentry.iter()).copied())
            .collect(),
        Way::Kprobe => kprobe_programs(targets),
    };
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
    fn only_netfilter_and_forwarding_drops_arm_the_hot_path_probes() {
        let none = Needs::default();
        let both = Needs {
            netfilter: true,
            forward: true,
        };
        // A netfilter verdict, wherever the kernel freed it.
        assert_eq!(Needs::of("NETFILTER_DROP", "nf_hook_slow", false), both);
        assert_eq!(Needs::of("NOT_SPECIFIED", "nft_do_chain", false), both);
        // On the forwarding path, or on the way out of a packet that came in elsewhere.
        let forward = Needs {
            netfilter: false,
            forward: true,
        };
        assert_eq!(Needs::of("NOT_SPECIFIED", "ip_forward", false), forward);
        assert_eq!(Needs::of("QDISC_DROP", "__dev_queue_xmit", true), forward);
        // A host's own drops (closed ports, bad checksums) need neither.
        assert_eq!(Needs::of("NO_SOCKET", "udp_v4_rcv", false), none);
        assert_eq!(Needs::of("TCP_CSUM", "tcp_v4_rcv", false), none);
        let mut sum = none;
        sum.add(forward);
        assert!(sum.wants(Traffic::Forward) && !sum.wants(Traffic::Netfilter));
        assert!(!both.wants(Traffic::ErrorsOnly));
    }

    #[test]
    fn probes_on_demand_are_those_on_healthy_paths() {
        for p in &PROBES {
            let on_demand = p.traffic != Traffic::ErrorsOnly;
            let hot = matches!(
                p.name,
                "nf_hook_slow" | "ip_forward" | "nft_do_chain" | "ipt_do_table"
            );
            assert_eq!(on_demand, hot, "{}", p.name);
            // Their frames are emptied on detach, the others' never.
            assert_eq!(p.traffic.frame_stacks().is_empty(), !on_demand, "{}", p.name);
        }
    }

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
