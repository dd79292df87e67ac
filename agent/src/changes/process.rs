//! The process behind a change: its name, executable, parent chain and cgroup (hence its
//! container and pod). What the kernel recorded at the time comes first (a `sysctl` or
//! `iptables-restore` lives for milliseconds); /proc adds what it still knows.
use std::{
    collections::HashMap,
    fmt, fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::pods::PodRef;

/// A process that made a change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    /// Its executable, when the process still existed to say.
    pub exe: Option<String>,
    /// Parent, grandparent, ...: (pid, name).
    pub parents: Vec<(u32, String)>,
    /// Its cgroup v2 path (container runtimes and kubelet name their cgroups).
    pub cgroup: Option<String>,
    /// The container and pod that cgroup belongs to (filled by the pipeline's pod resolver).
    pub container: Option<String>,
    pub pod: Option<Arc<PodRef>>,
}

/// Ancestors followed at most, and shown in a line (JSON has them all).
const MAX_PARENTS: usize = 6;
const SHOWN_PARENTS: usize = 3;

impl Process {
    /// From what the kernel recorded (the writer and its ancestors, up to pid 0) and its
    /// cgroup id, completed from /proc.
    pub fn from_kernel(
        chain: &[(u32, String)],
        cgroup_id: u64,
        cgroups: &mut CgroupIndex,
    ) -> Option<Process> {
        let (&(pid, ref comm), rest) = chain.split_first()?;
        if pid == 0 {
            return None;
        }
        let alive = same_process(pid, comm);
        let mut parents: Vec<(u32, String)> = rest
            .iter()
            .take_while(|(p, _)| *p != 0)
            .cloned()
            .collect();
        // Beyond what the kernel recorded, while the ancestors are still there.
        while parents.len() < MAX_PARENTS {
            let Some(&(top, ref name)) = parents.last() else {
                break;
            };
            if top <= 1 || !same_process(top, name) {
                break;
            }
            match parent_of(top) {
                Some(p) if p.0 != 0 => parents.push(p),
                _ => break,
            }
        }
        let cgroup = alive
            .then(|| cgroup_of(pid))
            .flatten()
            .or_else(|| cgroups.path(cgroup_id));
        Some(Process {
            pid,
            comm: comm.clone(),
            exe: alive.then(|| exe_of(pid)).flatten(),
            parents,
            cgroup,
            container: None,
            pod: None,
        })
    }

    /// From a pid and name another source gave (nftables names the committing process),
    /// completed from /proc while the process exists.
    pub fn from_pid(pid: u32, name: &str) -> Process {
        let alive = same_process(pid, name);
        let mut parents = Vec::new();
        let mut at = pid;
        while alive && parents.len() < MAX_PARENTS {
            match parent_of(at) {
                Some(p) if p.0 != 0 => {
                    at = p.0;
                    let top = p.0 <= 1;
                    parents.push(p);
                    if top {
                        break;
                    }
                }
                _ => break,
            }
        }
        Process {
            pid,
            comm: name.to_string(),
            exe: alive.then(|| exe_of(pid)).flatten(),
            parents,
            cgroup: alive.then(|| cgroup_of(pid)).flatten(),
            container: None,
            pod: None,
        }
    }
}

impl fmt::Display for Process {
    /// `sysctl (pid 812) <- nm-dispatcher (pid 800) <- systemd (pid 1), pod ns/name (c)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)?;
        for (pid, comm) in self.parents.iter().take(SHOWN_PARENTS) {
            write!(f, " <- {comm} (pid {pid})")?;
        }
        if self.parents.len() > SHOWN_PARENTS {
            f.write_str(" <- ...")?;
        }
        match (&self.pod, &self.container) {
            (Some(pod), _) => write!(f, ", pod {pod}")?,
            (None, Some(c)) => write!(f, ", container {c}")?,
            _ => {}
        }
        Ok(())
    }
}

/// Whether `pid` still is the process named `comm` (and not a reused pid).
fn same_process(pid: u32, comm: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
}

fn exe_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The parent of `pid`: (ppid, its name).
fn parent_of(pid: u32) -> Option<(u32, String)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid = parse_ppid(&stat)?;
    let comm = fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    Some((ppid, comm.trim_end().to_string()))
}

/// The ppid field of /proc/PID/stat (the name in parentheses may hold spaces and parens).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The cgroup v2 path of a live process (`0::/path`).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// cgroup ids (the inode of a cgroup v2 directory) to paths, for processes already gone.
#[derive(Default)]
pub struct CgroupIndex {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    walked: Option<Instant>,
}

/// A miss walks the tree again at most this often.
const REWALK: Duration = Duration::from_secs(5);
/// Cgroups indexed at most.
const MAX_CGROUPS: usize = 65_536;

impl CgroupIndex {
    pub fn new() -> Self {
        CgroupIndex {
            root: cgroup2_mount(),
            ..Default::default()
        }
    }

    /// The path (relative to the cgroup v2 root, as /proc/PID/cgroup gives it) of cgroup `id`.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.by_id.contains_key(&id) && self.walked.is_none_or(|t| t.elapsed() > REWALK) {
            self.walk();
        }
        self.by_id.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.walked = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.by_id.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if self.by_id.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
            self.by_id
                .insert(meta.ino(), format!("/{}", rel.to_string_lossy()));
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
}

/// The root cgroup v2 directory of the node (hybrid hosts mount it under the v1 tree). Looked
/// up as the host's init sees it, through /proc/1/root: in a container with the host's PID
/// namespace its own /sys/fs/cgroup is only the pod's subtree, and a program attached there
/// would see nothing else.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let ours = || {
        let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
        parse_cgroup2_mount(&text)
    };
    let same_root = match (fs::metadata("/proc/1/root"), fs::metadata("/")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => true,
    };
    if same_root {
        return ours();
    }
    fs::read_to_string("/proc/1/mountinfo")
        .ok()
        .and_then(|t| parse_cgroup2_mount(&t))
        .map(|p| Path::new("/proc/1/root").join(p.strip_prefix("/").unwrap_or(&p)))
        .filter(|p| p.is_dir())
        .or_else(ours)
}

/// The mount point of the first `cgroup2` filesystem in mountinfo text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_survives_names_with_spaces_and_parens() {
        assert_eq!(parse_ppid("812 (sysctl) S 800 812 800 0 -1"), Some(800));
        assert_eq!(parse_ppid("9 (a (b) c) R 7 9 9"), Some(7));
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      31 24 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "25 1 0:22 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn our_own_process_is_described_from_proc() {
        let me = std::process::id();
        let comm = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        let p = Process::from_pid(me, comm.trim_end());
        assert!(p.exe.is_some(), "{p:?}");
        assert!(!p.parents.is_empty(), "{p:?}");
        assert!(p.to_string().starts_with(&format!("{} (pid {me}) <- ", comm.trim_end())));
        let mut idx = CgroupIndex::new();
        if let Some(path) = &p.cgroup {
            let root = idx.root.clone().unwrap();
            let id = fs::metadata(root.join(path.trim_start_matches('/')))
                .unwrap()
                .ino();
            assert_eq!(idx.path(id).as_deref(), Some(path.as_str()));
        }
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text()) {
                parse_ppid(&text);
                parse_cgroup2_mount(&text);
            }

            #[test]
            fn prop_ppid_survives_any_command_name(
                pid in any::<u32>(),
                ppid in any::<u32>(),
                // comm is up to 15 bytes of anything but NUL: spaces, parens, newlines.
                comm in "[^\u{0}]{0,15}",
                state in "[RSDZTtXIP]",
                rest in prop::collection::vec(any::<i64>(), 0..50),
            ) {
                let rest: Vec<String> = rest.iter().map(i64::to_string).collect();
                let stat = format!("{pid} ({comm}) {state} {ppid} {}\n", rest.join(" "));
                prop_assert_eq!(parse_ppid(&stat), Some(ppid));
                // Cut before the ppid: no ppid, rather than another number.
                let cut = stat.rfind(')').unwrap() + 3;
                prop_assert_eq!(parse_ppid(&stat[..cut]), None);
            }

            #[test]
            fn prop_the_cgroup2_mount_is_found_among_any_mounts(
                noise in prop::collection::vec("[0-9]{1,3} [0-9]{1,3} [0-9]+:[0-9]+ / /[a-z/]{1,20} rw[a-z,]{0,10} - (cgroup|tmpfs|proc|sysfs) [a-z]{1,8} rw", 0..10),
                at in any::<prop::sample::Index>(),
                mount in "/[a-z0-9/]{1,30}",
            ) {
                let mut lines = noise;
                let i = at.index(lines.len() + 1);
                lines.insert(i, format!("30 24 0:26 / {mount} rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate"));
                prop_assert_eq!(parse_cgroup2_mount(&lines.join("\n")), Some(PathBuf::from(mount)));
            }
        }
    }
}
