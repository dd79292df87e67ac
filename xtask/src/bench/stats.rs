//! What an observer costs, from the kernel's own accounting: run time and run count of each of
//! its eBPF programs (`BPF_ENABLE_STATS`), and the CPU time and peak memory of its process.
use std::{collections::BTreeMap, fs, os::fd::OwnedFd};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Keeps the kernel's per-program run-time accounting on while it lives (the same switch as
/// `sysctl kernel.bpf_stats_enabled=1`, but released when the benchmark ends, however it ends).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn enable() -> Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF run-time statistics (BPF_ENABLE_STATS)")?;
        Ok(StatsOn(fd))
    }
}

/// One program's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The eBPF programs a process holds, by id, with their names.
#[derive(Debug, Clone, Default)]
pub struct Programs(pub BTreeMap<u32, String>);

/// What one program did between two snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramCost {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl Programs {
    /// Ids of every program loaded now.
    pub fn loaded_ids() -> Vec<u32> {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .map(|p| p.id())
            .collect()
    }

    /// Programs loaded since `before` (for tools that keep no program fd open, like bpftrace,
    /// whose perf events hold the programs).
    pub fn new_since(before: &[u32]) -> Programs {
        Programs(
            aya::programs::loaded_programs()
                .filter_map(|p| p.ok())
                .filter(|p| !before.contains(&p.id()))
                .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_string()))
                .collect(),
        )
    }

    /// The programs whose file descriptors process `pid` holds (from /proc/PID/fdinfo).
    pub fn of_process(pid: u32) -> Programs {
        let mut ids = Vec::new();
        if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
            for entry in dir.filter_map(|e| e.ok()) {
                let Ok(info) = fs::read_to_string(entry.path()) else {
                    continue;
                };
                if let Some(id) = info.lines().find_map(|l| {
                    l.strip_prefix("prog_id:")
                        .and_then(|v| v.trim().parse::<u32>().ok())
                }) {
                    ids.push(id);
                }
            }
        }
        let mut progs = BTreeMap::new();
        for info in aya::programs::loaded_programs().filter_map(|p| p.ok()) {
            if ids.contains(&info.id()) {
                progs.insert(info.id(), info.name_as_str().unwrap_or("?").to_string());
            }
        }
        Programs(progs)
    }

    /// Current counters of these programs (programs gone since are left out).
    pub fn snapshot(&self) -> BTreeMap<u32, Counters> {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| self.0.contains_key(&p.id()))
            .map(|p| {
                (
                    p.id(),
                    Counters {
                        run_time_ns: p.run_time().as_nanos() as u64,
                        run_cnt: p.run_count(),
                    },
                )
            })
            .collect()
    }

    /// Per-program differences between two snapshots.
    pub fn delta(
        &self,
        before: &BTreeMap<u32, Counters>,
        after: &BTreeMap<u32, Counters>,
    ) -> Vec<ProgramCost> {
        self.0
            .iter()
            .map(|(id, name)| {
                let b = before.get(id).copied().unwrap_or_default();
                let a = after.get(id).copied().unwrap_or(b);
                ProgramCost {
                    id: *id,
                    name: name.clone(),
                    run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                    run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                }
            })
            .collect()
    }
}

/// CPU time of every thread of a process, in ns (from /proc/PID/task/*/schedstat).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// VmHWM of a process, in kB.
pub fn peak_rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
