//! Network namespaces by inode: finding a handle to one, naming it, and reading inside it.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NAMED_DIR: &str = "/run/netns";

/// A way into one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRef {
    pub inode: u32,
    /// `ip netns` name, when it has one.
    pub name: Option<String>,
    /// A process living in it, when one was found.
    pub pid: Option<u32>,
    /// A file that can be passed to setns(2).
    pub path: PathBuf,
}

impl NetnsRef {
    /// The command prefix an operator types to act inside this namespace.
    pub fn exec_prefix(&self) -> String {
        match (&self.name, self.pid) {
            (Some(name), _) => format!("ip netns exec {name} "),
            (None, Some(pid)) => format!("nsenter -t {pid} -n "),
            (None, None) => String::new(),
        }
    }
}

/// Known namespaces, rescanned (at most once a second) when an unknown inode shows up.
///
/// An inode is only unique among namespaces alive at the same time: the kernel gives a
/// deleted namespace's inode to the next one created. A remembered handle is therefore
/// checked before it is used, and an inode whose namespace may have changed is reported by
/// [`Registry::take_gone`], so that whatever was cached for it can be forgotten.
pub struct Registry {
    own: u32,
    known: HashMap<u32, NetnsRef>,
    last_scan: Option<Instant>,
    /// Inodes whose namespace is gone, or may have been replaced, since the last `take_gone`.
    gone: Vec<u32>,
}

impl Registry {
    pub fn new() -> Self {
        let own = inode_of(Path::new("/proc/self/ns/net")).unwrap_or(0);
        Registry {
            own,
            known: HashMap::new(),
            last_scan: None,
            gone: Vec::new(),
        }
    }

    /// Inodes whose namespace went away (or whose handle now leads to a new namespace that
    /// reuses the inode) since the last call: state cached per inode is stale for them.
    pub fn take_gone(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.gone)
    }

    /// The inode of dropscope's own (normally the host's) namespace.
    pub fn own(&self) -> u32 {
        self.own
    }

    /// A handle to namespace `inode`, if one can be found. An unknown inode is looked up
    /// among the named namespaces at once (a few files), and among processes at most once a
    /// second (a walk of /proc).
    pub fn get(&mut self, inode: u32) -> Option<&NetnsRef> {
        // A handle whose namespace was deleted (its name removed, its process gone) must not
        // stand for a new namespace that got the same inode.
        if self
            .known
            .get(&inode)
            .is_some_and(|r| !leads_to(&r.path, inode))
        {
            self.known.remove(&inode);
            self.gone.push(inode);
        }
        if !self.known.contains_key(&inode) {
            if self
                .last_scan
                .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
            {
                self.scan();
            } else {
                for r in named() {
                    if !self.known.contains_key(&r.inode) {
                        self.remember(r);
                    }
                }
            }
        }
        self.known.get(&inode)
    }

    /// Every namespace that can be entered right now (freshly scanned).
    pub fn all(&mut self) -> Vec<NetnsRef> {
        self.scan();
        self.known.values().cloned().collect()
    }

    /// The prefix to run a command in `inode` ("" for dropscope's own namespace).
    pub fn exec_prefix(&mut self, inode: u32) -> String {
        if inode == self.own || inode == 0 {
            return String::new();
        }
        self.get(inode)
            .map(NetnsRef::exec_prefix)
            .unwrap_or_default()
    }

    /// The `ip netns` name of `inode`, if any. A namespace first seen through a process may
    /// be named later (`ip netns attach`, or a name created after the last scan): an unnamed
    /// one is looked up again, at most once a second.
    pub fn name(&mut self, inode: u32) -> Option<String> {
        if self.known.get(&inode).is_some_and(|r| r.name.is_none()) {
            if let Some(r) = named().into_iter().find(|r| r.inode == inode) {
                self.remember(r);
            }
        }
        self.get(inode).and_then(|r| r.name.clone())
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut found: HashMap<u32, NetnsRef> = named().into_iter().map(|r| (r.inode, r)).collect();
        if let Ok(proc) = fs::read_dir("/proc") {
            for entry in proc.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let path = entry.path().join("ns/net");
                let Ok(inode) = inode_of(&path) else { continue };
                found
                    .entry(inode)
                    .and_modify(|r| {
                        r.pid.get_or_insert(pid);
                    })
                    .or_insert(NetnsRef {
                        inode,
                        name: None,
                        pid: Some(pid),
                        path,
                    });
            }
        }
        let previous = std::mem::take(&mut self.known);
        for (inode, old) in previous {
            if found.get(&inode).is_none_or(|r| r.path != old.path) && !leads_to(&old.path, inode) {
                self.gone.push(inode);
            }
        }
        self.known = found;
    }

    /// Remembers a handle, replacing the one for the same inode; if the old handle no longer
    /// leads to that inode, the namespace may be another one now, and the inode is reported
    /// gone.
    fn remember(&mut self, r: NetnsRef) {
        if let Some(old) = self.known.insert(r.inode, r) {
            let inode = old.inode;
            if self.known[&inode].path != old.path && !leads_to(&old.path, inode) {
                self.gone.push(inode);
            }
        }
    }
}

/// Whether `path` still opens the namespace with `inode`.
fn leads_to(path: &Path, inode: u32) -> bool {
    inode_of(path).ok() == Some(inode)
}

/// The namespaces `ip netns` named (bind mounts in /run/netns).
fn named() -> Vec<NetnsRef> {
    let Ok(dir) = fs::read_dir(NAMED_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let inode = inode_of(&path).ok()?;
            Some(NetnsRef {
                inode,
                name: Some(entry.file_name().to_string_lossy().into_owned()),
                pid: None,
                path,
            })
        })
        .collect()
}

/// The namespace inode behind a file (`/proc/PID/ns/net` or a bind mount in /run/netns).
pub fn inode_of(path: &Path) -> Result<u32> {
    let meta = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok(meta.ino() as u32)
}

/// Parses a `--netns` value: an inode number or an `ip netns` name.
pub fn resolve_arg(value: &str) -> Result<u32> {
    if let Ok(inode) = value.parse::<u32>() {
        return Ok(inode);
    }
    let path = if value.contains('/') {
        PathBuf::from(value)
    } else {
        Path::new(NAMED_DIR).join(value)
    };
    if !path.exists() {
        bail!(
            "--netns {value}: not an inode number and no such namespace ({} does not exist)",
            path.display()
        );
    }
    inode_of(&path)
}

/// Runs `f` on a thread that has joined the namespace at `path` (setns only changes the
/// calling thread, so dropscope itself never leaves its own namespace).
pub fn run_in<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("namespace reader panicked"))?
}

/// Runs `f` inside the namespace at `ns`, or right here for dropscope's own (`None`);
/// `None` when the namespace cannot be entered (it may be gone).
pub fn in_namespace<T: Send + 'static>(
    ns: Option<&Path>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match ns {
        Some(path) => run_in(path, f).ok(),
        None => Some(f()),
    }
}

/// A sysctl (`net.ipv4.ipfrag_time`) as the namespace at `ns` sees it. /proc/sys follows the
/// reading thread's network namespace for `net.*` keys.
pub fn sysctl(ns: Option<&Path>, key: &str) -> Option<String> {
    if !key.starts_with("net.") || key.contains("..") || key.contains('/') {
        return None;
    }
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    in_namespace(ns, move || fs::read_to_string(file).ok())
        .flatten()
        .map(|v| v.trim().to_string())
}

/// The name of interface `ifindex` in the namespace at `ns`: `if_indextoname` asks through a
/// socket, and a socket belongs to the namespace of the thread that opened it.
pub fn ifname(ns: Option<&Path>, ifindex: u32) -> Option<String> {
    in_namespace(ns, move || {
        nix::net::if_::if_indextoname(ifindex)
            .ok()
            .map(|n| n.to_string_lossy().into_owned())
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_needs_no_prefix() {
        let mut r = Registry::new();
        assert_ne!(r.own(), 0);
        let own = r.own();
        assert_eq!(r.exec_prefix(own), "");
        // Our own process is found by the scan and reads back its own inode.
        let me = r.get(own).cloned().expect("own netns visible in /proc");
        let inode = run_in(&me.path, || {
            inode_of(Path::new("/proc/thread-self/ns/net")).unwrap()
        })
        .unwrap();
        assert_eq!(inode, own);
    }

    #[test]
    fn a_handle_that_no_longer_leads_to_its_inode_is_not_used() {
        // Namespace 7 was known by a name that has since been deleted: the next namespace
        // the kernel creates may get inode 7, so the old name must not be given for it.
        let mut r = Registry::new();
        let stale = NetnsRef {
            inode: 7,
            name: Some("deleted".into()),
            pid: None,
            path: "/run/netns/dropscope-test-deleted-namespace".into(),
        };
        r.known.insert(7, stale.clone());
        assert_eq!(r.name(7), None);
        assert!(r.get(7).is_none());
        assert_eq!(r.take_gone(), vec![7]);
        assert!(r.take_gone().is_empty(), "reported once");

        // A scan that no longer finds a namespace reports it too.
        r.known.insert(7, stale);
        r.scan();
        assert_eq!(r.take_gone(), vec![7]);
        // The namespaces that are still there are not.
        let own = r.own();
        r.scan();
        assert!(r.known.contains_key(&own));
        assert!(!r.take_gone().contains(&own));
    }

    #[test]
    fn named_prefix_wins_over_pid() {
        let r = NetnsRef {
            inode: 1,
            name: Some("dr-r".into()),
            pid: Some(5),
            path: "/x".into(),
        };
        assert_eq!(r.exec_prefix(), "ip netns exec dr-r ");
        let r = NetnsRef { name: None, ..r };
        assert_eq!(r.exec_prefix(), "nsenter -t 5 -n ");
    }

    #[test]
    fn bad_netns_argument_is_explained() {
        let err = resolve_arg("no-such-ns-here").unwrap_err().to_string();
        assert!(err.contains("/run/netns/no-such-ns-here"), "{err}");
        assert_eq!(resolve_arg("4026531840").unwrap(), 4026531840);
    }
}
