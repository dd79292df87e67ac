//! A node laid out the way kubelet lays it out, without kubelet: long-running processes inside
//! a network namespace, moved into cgroups named like kubelet's (under the machine's real
//! cgroup2 mount), and `var/log/pods` / `var/log/containers` entries in a temporary root that
//! dropscope reads through `--pods-root`.
use std::{
    fs,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netns::Netns;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Which cgroup driver kubelet is pretended to use.
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

/// One pod as started by [`Kubelet::run_pod`].
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Container name -> container id.
    pub containers: Vec<(String, String)>,
    /// Container name -> its cgroup directory (absolute).
    cgroups: Vec<(String, PathBuf)>,
}

/// The fake node. Dropping it stops the pods' processes and removes their cgroups and the root.
pub struct Kubelet {
    /// What to pass as `--pods-root`.
    pub root: PathBuf,
    cgroups: PathBuf,
    children: Vec<Child>,
}

impl Kubelet {
    /// An empty node: a temporary root and a private subtree of the cgroup2 hierarchy.
    pub fn new() -> Self {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("dropscope-test-{}-{seq}", std::process::id());
        let root = std::env::temp_dir().join(&tag);
        let cgroups = cgroup2_mount().join(&tag);
        for dir in [
            root.join("var/log/pods"),
            root.join("var/log/containers"),
            root.join("bin"),
            cgroups.clone(),
        ] {
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        Kubelet {
            root,
            cgroups,
            children: Vec::new(),
        }
    }

    /// `--pods-root` for dropscope.
    pub fn root_arg(&self) -> &str {
        self.root.to_str().expect("utf-8 temp path")
    }

    /// Starts a pod in `ns`: a sandbox process named `pause` and one process per container
    /// (named after it), each in its container's cgroup under the pod's, plus the pod's log
    /// directories. With `link`, `var/log/containers` names the containers by id, as kubelet
    /// does; without it only the log directories do.
    pub fn run_pod(
        &mut self,
        ns: &Netns,
        namespace: &str,
        name: &str,
        containers: &[&str],
        driver: Driver,
        link: bool,
    ) -> Pod {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let uid = format!("{pid:08x}-{seq:04x}-4000-8000-{:012x}", seq as u64 * 7919);
        let id = |i: usize| format!("{pid:08x}{:056x}", (seq as u64) << 8 | i as u64);
        let pod_cgroup = match driver {
            Driver::Systemd => {
                let u = uid.replace('-', "_");
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
            }
            Driver::Cgroupfs => format!("kubepods/besteffort/pod{uid}"),
        };
        let container_cgroup = |id: &str| match driver {
            Driver::Systemd => format!("{pod_cgroup}/cri-containerd-{id}.scope"),
            Driver::Cgroupfs => format!("{pod_cgroup}/{id}"),
        };
        let logs = self
            .root
            .join(format!("var/log/pods/{namespace}_{name}_{uid}"));
        self.spawn_in(ns, "pause", &container_cgroup(&id(0)));
        let mut pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.clone(),
            containers: Vec::new(),
            cgroups: Vec::new(),
        };
        for (i, container) in containers.iter().enumerate() {
            let cid = id(i + 1);
            self.spawn_in(ns, container, &container_cgroup(&cid));
            pod.cgroups
                .push((container.to_string(), self.cgroups.join(container_cgroup(&cid))));
            let log = logs.join(container).join("0.log");
            fs::create_dir_all(log.parent().unwrap()).unwrap();
            fs::write(&log, "").unwrap();
            if link {
                let file = format!("{name}_{namespace}_{container}-{cid}.log");
                std::os::unix::fs::symlink(&log, self.root.join("var/log/containers").join(file))
                    .unwrap();
            }
            pod.containers.push((container.to_string(), cid));
        }
        pod
    }

    /// Runs `program ARGS` to completion as a process of `container` in `pod`: inside `ns`
    /// and in the container's cgroup, as `kubectl exec` would. Panics if it fails.
    pub fn exec(&self, ns: &Netns, pod: &Pod, container: &str, program: &Path, args: &[&str]) {
        let (_, dir) = pod
            .cgroups
            .iter()
            .find(|(c, _)| c == container)
            .unwrap_or_else(|| panic!("{} has no container {container}", pod.name));
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .expect("cgroup.procs");
        let netns = fs::File::open(ns.path()).expect("netns file");
        let (procs_fd, ns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: only setns(2) and write(2) run between fork and exec; both fds stay open
        // until output() returns.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                    || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} in {}/{container}: {}",
            program.display(),
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a long sleep called `comm` inside `ns` and moves it into `cgroup` (relative to
    /// this node's cgroup subtree).
    fn spawn_in(&mut self, ns: &Netns, comm: &str, cgroup: &str) {
        // The process name is the name it was executed by: a link to sleep, called `comm`.
        let exe = self.root.join("bin").join(comm);
        if !exe.exists() {
            std::os::unix::fs::symlink(sleep_binary(), &exe).unwrap();
        }
        let netns = fs::File::open(ns.path()).expect("netns file");
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only setns(2) runs between fork and exec; the fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let dir = self.cgroups.join(cgroup);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        fs::write(dir.join("cgroup.procs"), child.id().to_string())
            .unwrap_or_else(|e| panic!("moving {} into {}: {e}", child.id(), dir.display()));
        self.children.push(child);
    }
}

impl Default for Kubelet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A cgroup is removed with rmdir once it has no processes and no children: deepest first.
        let mut dirs = Vec::new();
        collect_dirs(&self.cgroups, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = fs::remove_dir(&dir);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid systems).
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|line| {
            let (mount, fs_type) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            fs_type
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(point))
        })
        .expect(
            "no cgroup2 mount: the pod tests place processes in kubelet-like cgroups and need one",
        )
}

fn sleep_binary() -> &'static str {
    ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sleep (coreutils)")
}
