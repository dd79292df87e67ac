//! `cargo xtask bench`: what dropscope costs a node.
//!
//! The headline is the kernel's own accounting (`BPF_ENABLE_STATS`: run time and run count of
//! every program): nanoseconds per drop in dropscope's programs during a drop storm, next to an
//! empty program on the same tracepoint (the floor any such observer pays) and the bpftrace
//! one-liner that counts drop reasons, measured in the same run, interleaved. Then what the
//! agent costs (CPU per drop, peak memory, attach and detach times), and, in a VM whose kernel
//! allows the context probes, what dropscope costs packets that are *not* dropped.
mod healthy;
mod observer;
mod report;
pub(crate) mod sender;
mod stats;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context, Result};
use dropscope_tests::{nft_rule_packets, Netns, Nstat, Topology};
use serde::Serialize;

pub use healthy::{guest_main, GuestArgs, VmParams};
pub use observer::Kind;
use stats::ProgramCost;

/// Benchmark parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub reps: usize,
    pub seconds: f64,
    /// Observers to run (all when empty).
    pub observers: Vec<Kind>,
    /// Extra arguments for every dropscope run.
    pub extra: Vec<String>,
}

/// Where the storm is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// The router's nftables rule drops every datagram (NETFILTER_DROP in R).
    NftDrop,
    /// Nothing listens on the ports at the receiver (NO_SOCKET in B).
    ClosedPort,
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::NftDrop, Scenario::ClosedPort];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::NftDrop => "nftables drop rule on a router",
            Scenario::ClosedPort => "closed UDP ports on the receiver",
        }
    }

    fn base_port(self) -> u16 {
        match self {
            Scenario::NftDrop => 20000,
            Scenario::ClosedPort => 30000,
        }
    }

    /// The cause dropscope must report for every dropped datagram.
    fn cause(self) -> &'static str {
        match self {
            Scenario::NftDrop => "netfilter_drop",
            Scenario::ClosedPort => "no_listener",
        }
    }

    fn watched(self, t: &Topology) -> &Netns {
        match self {
            Scenario::NftDrop => &t.r,
            Scenario::ClosedPort => &t.b,
        }
    }

    /// The kernel's own count of the drops (an independent oracle).
    fn kernel_drops(self, t: &Topology) -> u64 {
        match self {
            Scenario::NftDrop => nft_rule_packets(&t.r, "bench-storm"),
            Scenario::ClosedPort => Nstat::read(&t.b).get("UdpNoPorts"),
        }
    }
}

/// One observer watching one storm.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub rep: usize,
    pub scenario: Scenario,
    pub observer: Kind,
    pub sent: u64,
    /// Drops of the storm, by the kernel's own counter.
    pub drops: u64,
    pub drops_per_sec: f64,
    /// Runs of the observer's drop program (kfree_skb) during the storm: every packet the
    /// kernel freed as a drop, the storm's and any other.
    pub drop_program_runs: u64,
    /// Nanoseconds per run of the observer's drop program.
    pub drop_program_ns: Option<f64>,
    /// Nanoseconds of all the observer's programs together, per drop program run.
    pub all_programs_ns: Option<f64>,
    pub programs: Vec<ProgramCost>,
    /// CPU time of the observer's process during the storm, per drop.
    pub agent_cpu_ns_per_drop: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub attach_ms: Option<f64>,
    pub detach_ms: Option<f64>,
    /// JSON output only: what dropscope counted for this storm (its cause, in the storm's
    /// namespace), and whether that equals the kernel's counter with `counts_exact`.
    pub reported: Option<u64>,
    pub exact: Option<bool>,
    /// JSON output only: drop records sent by the kernel, and drops counted but not sent.
    pub events_delivered: Option<u64>,
    pub drops_sampled_away: Option<u64>,
    pub filtered_in_kernel: Option<u64>,
    pub lost: Option<u64>,
}

/// Runs the drop-storm part and, unless `healthy` is None, the healthy-path part in a VM;
/// writes `out` (Markdown) and `raw` (JSON).
pub fn run(
    root: &Path,
    bin: &Path,
    params: &Params,
    healthy: Option<&healthy::VmParams>,
    out: &Path,
    raw: &Path,
) -> Result<()> {
    let runs = if params.reps > 0 {
        storm(bin, params)?
    } else {
        Vec::new()
    };
    let healthy = match healthy {
        Some(vm) => Some(healthy::run(root, bin, vm).context("healthy-path benchmark in the VM")?),
        None => None,
    };
    report::write(params, &runs, healthy.as_ref(), out, raw)
}

/// The drop storms on this machine, every observer interleaved per repetition.
fn storm(bin: &Path, params: &Params) -> Result<Vec<Run>> {
    let t = Topology::new();
    // A router that drops the storm by rule, and a receiver that answers closed ports like a
    // normal host (default ICMP rate limits).
    t.r.sh(
        "nft add table inet bench; nft add chain inet bench f '{ type filter hook forward priority 0; }'; \
         nft add rule inet bench f udp dport 20000-20063 counter drop comment '\"bench-storm\"'",
    );
    t.b.sh("sysctl -qw net.ipv4.icmp_ratelimit=1000 net.ipv4.icmp_msgs_per_sec=1000");
    let scratch = tempdir()?;
    let _stats = stats::StatsOn::enable()?;
    let kinds: Vec<Kind> = if params.observers.is_empty() {
        observer::ALL.to_vec()
    } else {
        params.observers.clone()
    };
    let mut runs = Vec::new();
    let dur = Duration::from_secs_f64(params.seconds);
    for rep in 0..params.reps {
        for scenario in Scenario::ALL {
            // Interleave, and rotate the order each repetition, so drift hits all observers.
            let mut order = kinds.clone();
            let shift = rep % order.len();
            order.rotate_left(shift);
            for kind in order {
                let run = one(&t, scenario, kind, rep, bin, dur, &scratch, &params.extra)
                    .with_context(|| format!("{} with {}", scenario.label(), kind.label()))?;
                eprintln!(
                    "bench: rep {} {:<10} {:<38} {:>8.0} drops/s  kernel {:>6} ns/drop (all programs {:>6})  agent {:>6} ns/drop  rss {:>5} MB{}",
                    rep + 1,
                    format!("{scenario:?}"),
                    kind.label(),
                    run.drops_per_sec,
                    fmt_opt(run.drop_program_ns, 0),
                    fmt_opt(run.all_programs_ns, 0),
                    fmt_opt(run.agent_cpu_ns_per_drop, 0),
                    fmt_opt(run.peak_rss_mb, 1),
                    run.exact.map_or(String::new(), |e| format!("  exact={e}"))
                );
                runs.push(run);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(runs)
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// Whether `name` (a kernel program name, at most 15 characters) is an observer's drop program.
fn is_drop_program(kind: Kind, name: &str) -> bool {
    match kind {
        // bpftrace names its program after the probe.
        Kind::Bpftrace => true,
        Kind::NullObserver => name.starts_with("kfree_skb_null"),
        _ => name.starts_with("kfree_skb_btf") || name.starts_with("kfree_skb_tp"),
    }
}

#[allow(clippy::too_many_arguments)]
fn one(
    t: &Topology,
    scenario: Scenario,
    kind: Kind,
    rep: usize,
    bin: &Path,
    dur: Duration,
    scratch: &Path,
    extra: &[String],
) -> Result<Run> {
    let before = scenario.kernel_drops(t);
    let obs = observer::Running::start(kind, bin, scratch, extra)?;
    let start = scenario.kernel_drops(t);
    let progs_before = obs.programs.snapshot();
    let cpu_before = obs.cpu_ns();
    let sent = sender::storm(
        &t.a,
        Ipv4Addr::new(10, 231, 2, 2),
        scenario.base_port(),
        dur,
    );
    let progs_after = obs.programs.snapshot();
    let cpu_after = obs.cpu_ns();
    let end = scenario.kernel_drops(t);
    let programs = obs.programs.delta(&progs_before, &progs_after);
    let peak_rss_mb = obs.peak_rss_mb();
    let attach_ms = obs.attach_ms;
    let running = obs.pid().is_some();
    let (detach_ms, records) = obs.stop()?;
    let total = scenario.kernel_drops(t) - before;
    let drops = end - start;

    let drop_runs: u64 = programs
        .iter()
        .filter(|p| is_drop_program(kind, &p.name))
        .map(|p| p.run_cnt)
        .sum();
    let drop_time: u64 = programs
        .iter()
        .filter(|p| is_drop_program(kind, &p.name))
        .map(|p| p.run_time_ns)
        .sum();
    let all_time: u64 = programs.iter().map(|p| p.run_time_ns).sum();
    let per_run = |ns: u64| (drop_runs > 0).then(|| ns as f64 / drop_runs as f64);

    let mut run = Run {
        rep,
        scenario,
        observer: kind,
        sent,
        drops,
        drops_per_sec: drops as f64 / dur.as_secs_f64(),
        drop_program_runs: drop_runs,
        drop_program_ns: per_run(drop_time),
        all_programs_ns: per_run(all_time),
        programs,
        agent_cpu_ns_per_drop: (running && drops > 0)
            .then(|| cpu_after.saturating_sub(cpu_before) as f64 / drops as f64),
        peak_rss_mb: running.then_some(peak_rss_mb),
        attach_ms: running.then_some(attach_ms),
        detach_ms: running.then_some(detach_ms),
        reported: None,
        exact: None,
        events_delivered: None,
        drops_sampled_away: None,
        filtered_in_kernel: None,
        lost: None,
    };
    if let Some(records) = records {
        let netns = scenario.watched(t).inode();
        let summary = records.iter().rev().find(|r| r["type"] == "summary");
        // Records of this storm: its cause in its namespace (other drops on the machine are
        // reported too, since dropscope runs unfiltered).
        let mine = |r: &&serde_json::Value| {
            r["type"] == "drop" && r["cause"] == scenario.cause() && r["netns"] == netns
        };
        let reported: u64 = records
            .iter()
            .filter(mine)
            .filter_map(|r| r["count"].as_u64())
            .sum();
        let sampled: u64 = records
            .iter()
            .filter(mine)
            .filter(|r| r["sampled"] == true)
            .filter_map(|r| r["count"].as_u64())
            .sum();
        run.events_delivered = summary.and_then(|s| s["decoded"].as_u64());
        run.lost = summary.and_then(|s| s["lost"].as_u64());
        run.filtered_in_kernel = summary.and_then(|s| s["filtered_in_kernel"].as_u64());
        if kind == Kind::DropscopeFiltered {
            // Nothing of the storm may get through; the kernel counted it as filtered.
            run.reported = Some(reported);
            run.exact = Some(reported == 0 && run.filtered_in_kernel.unwrap_or(0) >= total);
        } else {
            run.reported = Some(reported);
            run.drops_sampled_away = Some(sampled);
            run.exact =
                Some(reported == total && summary.is_some_and(|s| s["counts_exact"] == true));
        }
    }
    Ok(run)
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("dropscope-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
