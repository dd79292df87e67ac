//! A network namespace that exists for the life of the value.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use nix::sched::{setns, CloneFlags};

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Deletes the namespaces of test runs that were killed before their values were dropped
/// (`ds<pid>x...` whose process is gone): Drop cleans up after a panic, not after SIGKILL or a
/// timeout.
fn sweep_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("ds")
            .and_then(|r| r.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A named namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with a unique name (tests run in parallel) and `lo` up.
    pub fn new(role: &str) -> Self {
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "ds{}x{}{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.sh("ip link set lo up; sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0");
        ns
    }

    /// Runs a shell command inside the namespace; panics with its output if it, or any
    /// command of it, fails (`set -e`: a set-up step that failed must not go unnoticed).
    pub fn sh(&self, cmd: &str) -> String {
        let out = self.try_sh(&format!("set -e; {cmd}"));
        if !out.status.success() {
            panic!(
                "in netns {}: `{cmd}` failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec")
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = fs::File::open(self.path()).expect("netns file");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The namespace's inode, as dropscope reports it in "netns".
    pub fn inode(&self) -> u64 {
        fs::metadata(self.path()).expect("netns file").ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let text = self.sh(&format!(
            "cat /sys/class/net/{ifname}/address 2>/dev/null || ip -o link show {ifname}"
        ));
        let hex = text
            .split_whitespace()
            .find(|w| w.len() == 17 && w.matches(':').count() == 5)
            .unwrap_or(text.trim());
        let mut mac = [0u8; 6];
        for (i, b) in hex.split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(b, 16).expect("mac");
        }
        mac
    }
}
