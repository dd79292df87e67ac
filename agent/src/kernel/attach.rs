//! Loading the eBPF object and attaching each probe in the best mode this kernel allows.
//!
//! Every probe tries its modes in order (tp_btf, then the classic tracepoint) and records which
//! one it got and why a better one was refused, so the operator sees exactly what is observed.
use std::{
    collections::HashSet,
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use agent_ebpf::{Config, CpuState, Filters, Knobs, ABSENT};
use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{BtfTracePoint, TracePoint},
    Btf, Ebpf,
};
use serde::Serialize;

use super::{
    agg::AggTable,
    btf::{DropReasons, KernelBtf, NetfilterNames},
    context_probes::{self, Arming, ContextMode, ContextProbes, FunctionHomes},
    loader_btf, tracefs,
};

/// The eBPF object, built by agent/build.rs and embedded so the binary is self-contained.
pub(super) static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dropscope-probes"));

/// How a probe may attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Try BTF tracepoints first, fall back to classic tracepoints.
    Auto,
    /// BTF-typed tracepoints only (no tracefs needed).
    TpBtf,
    /// Classic tracepoints only (needs tracefs).
    Tracepoint,
}

/// What one probe got.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    pub probe: &'static str,
    /// "tp_btf", "tracepoint", "fentry", "kprobe" or "unavailable".
    pub mode: &'static str,
    /// Why a better mode was refused, or why the probe is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.probe, self.mode)?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// A loaded and attached set of probes. Dropping it detaches everything.
pub struct Probes {
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, CpuState>,
    pub knobs: KnobsMap,
    /// Configuration changes made by processes (sysctl writes, iptables-legacy tables).
    pub changes: RingBuf<MapData>,
    /// The context probes attached on demand.
    pub context: ContextProbes,
    pub stacks: StackTraceMap<MapData>,
    /// Exact per-key drop counts (see `agent_ebpf::AggSlot`).
    pub agg: AggTable,
    pub report: Vec<Attached>,
    pub attach_ms: u128,
    /// This kernel's drop-reason names and netfilter hook and family numbers, for decoding.
    pub reasons: DropReasons,
    pub netfilter_names: NetfilterNames,
    /// Owns the programs and their links: dropping it detaches them.
    pub ebpf: Ebpf,
}

/// One hook: its names in the object and in the kernel.
struct Hook {
    probe: &'static str,
    required: bool,
    btf_program: &'static str,
    tp_program: &'static str,
    category: &'static str,
    name: &'static str,
}

const HOOKS: [Hook; 3] = [
    Hook {
        probe: "kfree_skb",
        required: true,
        btf_program: "kfree_skb_btf",
        tp_program: "kfree_skb_tp",
        category: "skb",
        name: "kfree_skb",
    },
    Hook {
        probe: "icmp_send",
        required: false,
        btf_program: "icmp_send_btf",
        tp_program: "icmp_send_tp",
        category: "icmp",
        name: "icmp_send",
    },
    Hook {
        probe: "tcp_send_reset",
        required: false,
        btf_program: "tcp_send_reset_btf",
        tp_program: "tcp_send_reset_tp",
        category: "tcp",
        name: "tcp_send_reset",
    },
];

/// What the session asks of the kernel side.
pub struct Settings<'a> {
    /// Kernel BTF (normally `/sys/kernel/btf/vmlinux`).
    pub btf: &'a Path,
    pub mode: Mode,
    pub context: ContextMode,
    pub arming: Arming,
    /// With on-demand arming: quiet time before the hot-path context probes go.
    pub linger: Duration,
    pub sample_per_sec: u32,
    pub filters: Filters,
    /// Bytes of each delivered drop's packet to copy (`--pcap`, the flight recorder).
    pub snaplen: Option<u32>,
}

/// The one way into the kernel: reads this kernel's BTF and tracefs, fills the programs'
/// configuration from them, loads the object and attaches every hook, then the context
/// probes and the change watchers.
pub fn attach(settings: &Settings) -> Result<Probes> {
    let start = Instant::now();
    let btf_path = settings.btf;
    let tracefs_root = match settings.mode {
        Mode::Tracepoint => Some(tracefs::find_or_mount()?),
        _ => tracefs::find(),
    };
    // Everything needed from BTF is read first and the reader dropped before the loader
    // parses its own copy: both at once were most of the agent's peak memory.
    let facts = Facts::read(settings, tracefs_root.as_deref())?;
    release_freed_memory();
    tracing::debug!(
        "kernel BTF read: offsets and {} drop reasons ({} ms)",
        facts.reasons.len(),
        start.elapsed().as_millis()
    );
    let Facts {
        mut config,
        change_config,
        homes,
        rst_args,
        reasons,
        netfilter_names,
    } = facts;
    if let Some(root) = &tracefs_root {
        fill_tracepoint_layouts(root, &mut config);
    }

    let mut loader = loader_btf::new_loader();
    let aya_btf = loader_btf::load(btf_path, &loader_names())?;
    tracing::debug!(
        "BTF parsed for the loader ({} ms)",
        start.elapsed().as_millis()
    );
    let mut ebpf = loader
        .btf(Some(&aya_btf))
        .override_global("CONFIG", &config, true)
        .override_global("CHANGE_CONFIG", &change_config, true)
        .load(PROBES_OBJECT)
        .context("loading dropscope's eBPF object")?;
    tracing::debug!("maps created ({} ms)", start.elapsed().as_millis());

    let mut report = Vec::new();
    for hook in &HOOKS {
        let tp_ready = tracefs_root.is_some() && tracepoint_ready(hook, &config);
        let mut got = attach_hook(&mut ebpf, &aya_btf, hook, settings.mode, tp_ready)?;
        // Before the tracepoint gained its `reason` argument it fired only for resets sent on
        // behalf of a socket, not for the reset answering a packet to a closed port.
        if hook.probe == "tcp_send_reset" && got.mode != "unavailable" && rst_args < 3 {
            got.note = Some("this kernel traces resets of existing sockets only, not those answering closed ports".into());
        }
        tracing::debug!("{got}");
        report.push(got);
    }
    let (context_report, context) = context_probes::attach_all(
        &mut ebpf,
        &aya_btf,
        &homes,
        settings.context,
        settings.arming,
        settings.linger,
    );
    for got in &context_report {
        tracing::debug!("{got}");
    }
    report.extend(context_report);
    let change_report = crate::changes::kernel::attach(&mut ebpf, &change_config);
    for got in &change_report {
        tracing::debug!("{got}");
    }
    report.extend(change_report);

    let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
    let counters =
        PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS map missing")?)?;
    let knobs = KnobsMap {
        map: Array::try_from(ebpf.take_map("KNOBS").context("KNOBS map missing")?)?,
        value: Knobs::default(),
    };
    let stacks = StackTraceMap::try_from(ebpf.take_map("STACKS").context("STACKS map missing")?)?;
    let agg = AggTable::new(ebpf.take_map("AGG").context("AGG map missing")?)?;
    let changes = RingBuf::try_from(ebpf.take_map("CHANGES").context("CHANGES map missing")?)?;
    Ok(Probes {
        events,
        changes,
        counters,
        knobs,
        context,
        stacks,
        agg,
        report,
        attach_ms: start.elapsed().as_millis(),
        reasons,
        netfilter_names,
        ebpf,
    })
}

/// The names the loader looks up in BTF: each hook's tracepoint typedef and each context
/// probe's function.
fn loader_names() -> HashSet<String> {
    let tracepoints = HOOKS.iter().map(|h| format!("btf_trace_{}", h.name));
    tracepoints
        .chain(context_probes::functions().map(String::from))
        .collect()
}

/// What the programs' configuration and the session need from this kernel's BTF.
struct Facts {
    config: Config,
    change_config: agent_ebpf::ChangeConfig,
    homes: FunctionHomes,
    /// Arguments of the `tcp_send_reset` tracepoint (0 when it has none).
    rst_args: usize,
    reasons: DropReasons,
    netfilter_names: NetfilterNames,
}

impl Facts {
    fn read(settings: &Settings, tracefs_root: Option<&Path>) -> Result<Facts> {
        let kernel = KernelBtf::open(settings.btf)?;
        let btf_dir = settings.btf.parent().unwrap_or(Path::new("/sys/kernel/btf"));
        let reasons = kernel.drop_reasons(btf_dir)?;
        let offsets = kernel.offsets();
        let missing: Vec<&str> = offsets
            .required()
            .iter()
            .filter(|(_, off)| *off == ABSENT)
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            bail!(
                "this kernel's BTF lacks {} (dropscope reads them for every drop)",
                missing.join(", ")
            );
        }
        // ipt_do_table(skb, state, table) before 5.16, (priv, skb, state) since.
        let xt_params = kernel.params("ipt_do_table").unwrap_or_default();
        let position = |names: &[&str]| {
            xt_params
                .iter()
                .position(|p| names.contains(&p.as_str()))
                .map_or(ABSENT, |i| i as u32)
        };
        let rst_args = kernel.tracepoint_args("tcp_send_reset").unwrap_or(0);
        let config = Config {
            offsets,
            has_reason: u32::from(kernel.tracepoint_args("kfree_skb").is_none_or(|n| n >= 3)),
            rst_has_skb: u32::from(rst_args >= 2),
            sample_per_sec: settings.sample_per_sec,
            context: u32::from(settings.context != ContextMode::Off),
            xt_skb_arg: position(&["skb"]),
            xt_table_arg: position(&["priv", "table"]),
            filters: settings.filters,
            capture: match settings.snaplen {
                Some(snaplen) => crate::capture::kernel_config(&kernel, snaplen),
                None => agent_ebpf::Capture::OFF,
            },
        };
        // The change watchers' programs need the setsockopt layout: tracefs, mounted if need be.
        let change_tracefs = tracefs_root
            .map(Path::to_path_buf)
            .or_else(|| tracefs::find_or_mount().ok());
        Ok(Facts {
            config,
            change_config: crate::changes::kernel::config(&kernel, change_tracefs.as_deref()),
            homes: FunctionHomes::of(&kernel),
            rst_args,
            reasons,
            netfilter_names: kernel.netfilter_names(),
        })
    }
}

/// Hands memory freed after parsing BTF back to the system: glibc keeps freed heap memory
/// unless asked; musl's allocator (the static build) returns it by itself.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The drop probe's run-time settings (see `agent_ebpf::Knobs`); userspace is their only writer.
pub struct KnobsMap {
    map: Array<MapData, Knobs>,
    value: Knobs,
}

impl KnobsMap {
    /// Tells the drop probe where `skb->dev` is not a device: the code of the function that
    /// purges fragment queues, once the symbols are known.
    pub fn set_no_dev_range(&mut self, range: Option<(u64, u64)>) {
        let Some((start, end)) = range else { return };
        self.value.no_dev_start = start;
        self.value.no_dev_end = end;
        self.write();
    }

    fn write(&mut self) {
        if let Err(e) = self.map.set(0, self.value, 0) {
            tracing::warn!("cannot update KNOBS: {e}");
        }
    }
}

/// Attaches only the empty `kfree_skb` program (`--null-observer`, for the benchmark).
pub fn attach_null(btf_path: &Path) -> Result<Ebpf> {
    let mut loader = loader_btf::new_loader();
    let aya_btf = loader_btf::load(btf_path, &loader_names())?;
    let mut ebpf = loader
        .btf(Some(&aya_btf))
        .load(PROBES_OBJECT)
        .context("loading dropscope's eBPF object")?;
    let prog: &mut BtfTracePoint = program(&mut ebpf, "kfree_skb_null")?.try_into()?;
    retrying(|| prog.load("kfree_skb", &aya_btf)).map_err(verbose)?;
    prog.attach().map_err(verbose)?;
    Ok(ebpf)
}

fn attach_hook(
    ebpf: &mut Ebpf,
    btf: &Btf,
    hook: &Hook,
    mode: Mode,
    tp_ready: bool,
) -> Result<Attached> {
    let mut refused = Vec::new();
    if mode != Mode::Tracepoint {
        match attach_btf(ebpf, btf, hook) {
            Ok(()) => {
                return Ok(Attached {
                    probe: hook.probe,
                    mode: "tp_btf",
                    note: None,
                })
            }
            Err(e) => refused.push(format!("tp_btf: {e}")),
        }
    }
    if mode != Mode::TpBtf {
        if tp_ready {
            match attach_tracepoint(ebpf, hook) {
                Ok(()) => {
                    let note = (!refused.is_empty()).then(|| refused.join("; "));
                    return Ok(Attached {
                        probe: hook.probe,
                        mode: "tracepoint",
                        note,
                    });
                }
                Err(e) => refused.push(format!("tracepoint: {e}")),
            }
        } else {
            refused.push(format!(
                "tracepoint: {}/{} not available (tracefs not mounted, or this kernel lacks it)",
                hook.category, hook.name
            ));
        }
    }
    let note = refused.join("; ");
    if hook.required {
        bail!("cannot attach to {}: {note}", hook.probe);
    }
    Ok(Attached {
        probe: hook.probe,
        mode: "unavailable",
        note: Some(note),
    })
}

fn attach_btf(ebpf: &mut Ebpf, btf: &Btf, hook: &Hook) -> Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, hook.btf_program)?.try_into()?;
    retrying(|| prog.load(hook.name, btf)).map_err(verbose)?;
    prog.attach().map_err(verbose)?;
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf, hook: &Hook) -> Result<()> {
    let prog: &mut TracePoint = program(ebpf, hook.tp_program)?.try_into()?;
    retrying(|| prog.load()).map_err(verbose)?;
    prog.attach(hook.category, hook.name).map_err(verbose)?;
    Ok(())
}

/// Runs a program load again when the verifier gave up because a signal arrived (EAGAIN, e.g.
/// SIGCHLD from the rule readers running meanwhile), as libbpf does.
pub(super) fn retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 0;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 10 =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

/// aya errors nest their cause (e.g. the errno) and may carry the whole verifier log; keep one
/// line: what failed and, for a rejected program, the verifier's reason.
pub(crate) fn verbose(e: aya::programs::ProgramError) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    // The whole verifier log, for -vv.
    tracing::debug!("{msg}");
    anyhow!(one_line(&msg))
}

/// The first line of an error without the log it announces, plus the verifier's reason: the
/// last log line before its statistics.
fn one_line(msg: &str) -> String {
    let head = msg.lines().next().unwrap_or("");
    let head = head.split(". Verifier output").next().unwrap_or(head);
    let stats = [
        "verification time",
        "stack depth",
        "processed ",
        ": ",
        "Verifier output",
    ];
    let lines: Vec<&str> = msg.lines().skip(1).map(str::trim).collect();
    let reason = lines
        .into_iter()
        .rev()
        .find(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)));
    match reason {
        Some(r) => format!("{head}: {r}"),
        None => head.to_string(),
    }
}

/// Reads the classic tracepoints' field offsets from tracefs into `config`.
fn fill_tracepoint_layouts(root: &Path, config: &mut Config) {
    let o = &mut config.offsets;
    if let Ok(f) = tracefs::fields(root, "skb", "kfree_skb") {
        let off = |n: &str| f.get(n).map_or(ABSENT, |f| f.offset);
        o.tp_kfree_skbaddr = off("skbaddr");
        o.tp_kfree_location = off("location");
        o.tp_kfree_reason = off("reason");
    }
    if let Ok(f) = tracefs::fields(root, "icmp", "icmp_send") {
        let off = |n: &str| f.get(n).map_or(ABSENT, |f| f.offset);
        o.tp_icmp_skbaddr = off("skbaddr");
        o.tp_icmp_type = off("type");
        o.tp_icmp_code = off("code");
    }
    if let Ok(f) = tracefs::fields(root, "tcp", "tcp_send_reset") {
        o.tp_rst_skbaddr = f.get("skbaddr").map_or(ABSENT, |f| f.offset);
    }
}

fn tracepoint_ready(hook: &Hook, config: &Config) -> bool {
    let o = &config.offsets;
    match hook.probe {
        "kfree_skb" => o.tp_kfree_skbaddr != ABSENT && o.tp_kfree_location != ABSENT,
        "icmp_send" => o.tp_icmp_skbaddr != ABSENT && o.tp_icmp_type != ABSENT,
        _ => o.tp_rst_skbaddr != ABSENT,
    }
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection};

    use super::*;

    #[test]
    fn a_rejected_program_is_summed_up_by_the_verifiers_reason() {
        let msg = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx() R10=fp0\n\
                   19: (7b) *(u64 *)(r0 +8) = r1\n\
                   R0 unbounded memory access, make sure to bounds check any such access\n\
                   verification time 4198 usec\nstack depth 8\n\
                   processed 19 insns (limit 1000000) max_states_per_insn 0\n: Permission denied (os error 13)";
        assert_eq!(
            one_line(msg),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13): R0 unbounded memory access, make sure to bounds check any such access"
        );
        assert_eq!(one_line("no such function"), "no such function");
    }

    #[test]
    fn every_hook_has_both_programs_in_the_embedded_object() {
        let elf = object::File::parse(PROBES_OBJECT).expect("embedded eBPF object is ELF");
        let sections: Vec<&str> = elf.sections().filter_map(|s| s.name().ok()).collect();
        for hook in &HOOKS {
            assert!(
                sections.contains(&format!("tp_btf/{}", hook.name).as_str()),
                "{sections:?}"
            );
            assert!(
                sections.contains(&format!("tracepoint/{}/{}", hook.category, hook.name).as_str()),
                "{sections:?}"
            );
            for program in [hook.btf_program, hook.tp_program] {
                assert!(
                    elf.symbols()
                        .any(|s| object::ObjectSymbol::name(&s) == Ok(program)),
                    "{program} missing"
                );
            }
        }
        assert!(elf
            .symbols()
            .any(|s| object::ObjectSymbol::name(&s) == Ok("kfree_skb_null")));
        for map in ["EVENTS", "STACKS", "COUNTERS", "CONFIG", "AGG", "KNOBS"] {
            assert!(
                elf.symbols()
                    .any(|s| object::ObjectSymbol::name(&s) == Ok(map)),
                "{map} missing"
            );
        }
    }
}
