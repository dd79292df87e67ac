//! The healthy path, in a VM whose kernel allows the context probes: forwarded traffic through
//! an accepting ruleset, with and without dropscope.
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Which VM and how long.
#[derive(Debug, Clone, Serialize)]
pub struct VmParams {
    pub kernel: String,
    pub reps: usize,
    pub seconds: f64,
}

/// Arguments of the guest side (`xtask bench-guest`).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct GuestArgs {
    #[arg(long)]
    pub reps: usize,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub bin: String,
}

/// What the guest measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HealthyResults {}

pub fn run(_root: &Path, _vm: &VmParams) -> Result<HealthyResults> {
    anyhow::bail!("not implemented yet")
}

pub fn guest_main(_args: &GuestArgs) -> Result<()> {
    anyhow::bail!("not implemented yet")
}

/// The healthy-path part of BENCHMARKS.md, and its targets.
pub fn section(_md: &mut String, _targets: &mut Vec<(String, bool)>, _h: &HealthyResults) {}
