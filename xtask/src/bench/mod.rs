//! `cargo xtask bench`: what dropscope costs a node in a drop storm, as ratios against a
//! baseline measured in the same run (no observer), next to the floor any tracepoint observer
//! pays (an empty program) and the expert's alternative (a bpftrace one-liner).
mod observer;
mod report;
pub(crate) mod sender;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context, Result};
use dropscope_tests::{nft_rule_packets, Netns, Nstat, Topology};
use serde::Serialize;

pub use observer::Kind;

/// Benchmark parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub reps: usize,
    pub seconds: f64,
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
    const ALL: [Scenario; 2] = [Scenario::NftDrop, Scenario::ClosedPort];

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
    pub drops: u64,
    pub drops_per_sec: f64,
    pub cpu_percent: f64,
    pub peak_rss_mb: f64,
    pub attach_ms: f64,
    pub detach_ms: f64,
    /// dropscope --format json only: what it counted, and whether that equals the kernel.
    pub reported: Option<u64>,
    pub exact: Option<bool>,
    pub events_delivered: Option<u64>,
    pub events_suppressed: Option<u64>,
    pub lost: Option<u64>,
}

/// Runs the whole benchmark and writes `out` (Markdown) and `raw` (JSON).
pub fn run(bin: &Path, params: &Params, out: &Path, raw: &Path) -> Result<()> {
    let t = Topology::new();
    // A router that drops the storm by rule, and a receiver that answers closed ports like a
    // normal host (default ICMP rate limits).
    t.r.sh(
        "nft add table inet bench; nft add chain inet bench f '{ type filter hook forward priority 0; }'; \
         nft add rule inet bench f udp dport 20000-20063 counter drop comment '\"bench-storm\"'",
    );
    t.b.sh("sysctl -qw net.ipv4.icmp_ratelimit=1000 net.ipv4.icmp_msgs_per_sec=1000");
    let scratch = tempdir()?;
    let mut runs = Vec::new();
    let dur = Duration::from_secs_f64(params.seconds);
    for rep in 0..params.reps {
        for scenario in Scenario::ALL {
            // Interleave, and rotate the order each repetition, so drift hits all observers.
            let mut order = observer::ALL.to_vec();
            let shift = rep % order.len();
            order.rotate_left(shift);
            for kind in order {
                let run = one(&t, scenario, kind, rep, bin, dur, &scratch)
                    .with_context(|| format!("{} with {}", scenario.label(), kind.label()))?;
                eprintln!(
                    "bench: rep {} {:<12} {:<40} {:>10.0} drops/s  cpu {:>5.1}%  rss {:>5.1} MB{}",
                    rep + 1,
                    format!("{scenario:?}"),
                    kind.label(),
                    run.drops_per_sec,
                    run.cpu_percent,
                    run.peak_rss_mb,
                    run.exact.map_or(String::new(), |e| format!("  exact={e}"))
                );
                runs.push(run);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    report::write(params, &runs, out, raw)
}

fn one(
    t: &Topology,
    scenario: Scenario,
    kind: Kind,
    rep: usize,
    bin: &Path,
    dur: Duration,
    scratch: &Path,
) -> Result<Run> {
    let before = scenario.kernel_drops(t);
    let obs = observer::Running::start(kind, bin, &scenario.watched(t).name, scratch)?;
    let start = scenario.kernel_drops(t);
    let sent = sender::storm(
        &t.a,
        Ipv4Addr::new(10, 231, 2, 2),
        scenario.base_port(),
        dur,
    );
    let end = scenario.kernel_drops(t);
    let (cpu_percent, peak_rss_mb) = obs.usage(dur.as_secs_f64());
    let attach_ms = obs.attach_ms;
    let (detach_ms, summary) = obs.stop()?;
    let total = scenario.kernel_drops(t) - before;
    let reported = summary
        .as_ref()
        .and_then(|s| s["causes"][scenario.cause()].as_u64());
    Ok(Run {
        rep,
        scenario,
        observer: kind,
        sent,
        drops: end - start,
        drops_per_sec: (end - start) as f64 / dur.as_secs_f64(),
        cpu_percent,
        peak_rss_mb,
        attach_ms: if kind == Kind::None { 0.0 } else { attach_ms },
        detach_ms,
        reported,
        exact: summary
            .as_ref()
            .map(|s| reported == Some(total) && s["counts_exact"] == true),
        events_delivered: summary.as_ref().and_then(|s| s["decoded"].as_u64()),
        events_suppressed: summary.as_ref().and_then(|s| s["sampled_total"].as_u64()),
        lost: summary.as_ref().and_then(|s| s["lost"].as_u64()),
    })
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("dropscope-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
