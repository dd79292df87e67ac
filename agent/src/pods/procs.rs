//! The processes of pods, from `/proc`: each one's network namespace, cgroup and name.
use std::{fs, path::Path};

use super::cgroup::{self, PodCgroup};
use crate::netns::inode_of;

/// A process kubelet placed in a pod's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    pub pid: u32,
    /// Inode of its network namespace.
    pub netns: u32,
    pub cgroup: PodCgroup,
    /// `/proc/PID/comm`: tells the sandbox's `pause` process from the containers'.
    pub comm: String,
}

/// Every process in a kubepods cgroup whose network namespace is not `skip_netns` (the
/// node's own: host-network pods share it and cannot give it their name).
pub fn scan(skip_netns: u32) -> Vec<PodProcess> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let base = entry.path();
            // Processes come and go during the scan: any read may fail, and then it is skipped.
            let netns = inode_of(&base.join("ns/net"))
                .ok()
                .filter(|&n| n != skip_netns)?;
            let cgroup = cgroup::parse(&fs::read_to_string(base.join("cgroup")).ok()?)?;
            let comm = read_trimmed(&base.join("comm"));
            Some(PodProcess {
                pid,
                netns,
                cgroup,
                comm,
            })
        })
        .collect()
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}
