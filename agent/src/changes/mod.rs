//! Who changed it: configuration changes in the network namespaces dropscope watches, with
//! the process (and its parents, container and pod) that made them when the kernel says, so a
//! drop's evidence can name the change that caused it.
//!
//! Sources, each independent (the attach record says which ones run and why one does not):
//! - `sysctl`: a cgroup/sysctl program on the cgroup v2 root sees every write to a `net.*`
//!   sysctl through /proc/sys, with the writing process (kernel.rs);
//! - `iptables-legacy`: the setsockopt(IPT_SO_SET_REPLACE) syscall tracepoints, with the
//!   process (kernel.rs);
//! - `nftables`: each committed generation on the nftables netlink group, with the pid and
//!   name of the committing process (netlink.rs);
//! - `rtnetlink`: per-device forwarding and rp_filter (netconf), link MTU and state, routes
//!   and addresses. rtnetlink does not name a process: those changes carry only their time.
pub mod feed;
pub mod kernel;
pub mod log;
pub mod netlink;
pub mod process;
pub mod watcher;

use std::fmt;

pub use log::ChangeLog;
pub use process::Process;

/// What kind of setting changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A `net.*` sysctl written through /proc/sys (key: the sysctl name).
    Sysctl,
    /// A device's IP configuration changed over netlink or /proc/sys (key: the sysctl name
    /// it corresponds to, e.g. `net.ipv4.conf.eth0.forwarding`).
    Netconf,
    /// A link's MTU, state, or existence (key: `link.<dev>.mtu`, `link.<dev>.state`,
    /// `link.<dev>`).
    Link,
    /// A route added or removed (key: `route.<table>`).
    Route,
    /// An address added or removed (key: `addr.<dev>`).
    Address,
    /// An nftables ruleset generation was committed (key: `nftables.<family> <table>`).
    Nftables,
    /// An iptables-legacy table was replaced (key: `iptables-legacy.<ip|ip6> <table>`).
    IptablesLegacy,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Sysctl => "sysctl",
            ChangeKind::Netconf => "netconf",
            ChangeKind::Link => "link",
            ChangeKind::Route => "route",
            ChangeKind::Address => "address",
            ChangeKind::Nftables => "nftables",
            ChangeKind::IptablesLegacy => "iptables_legacy",
        }
    }
}

/// One configuration change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// When it happened, on the kernel's monotonic clock (that of drops): from the kernel for
    /// process changes, the time the notification arrived for netlink ones.
    pub ts_ns: u64,
    /// The network namespace it applies to (0: unknown).
    pub netns: u32,
    pub kind: ChangeKind,
    /// What changed, in the form the cause table matches (see [`ChangeKind`]).
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
    /// More about it ("rule added to chain fw: ... handle 4").
    pub detail: Option<String>,
    /// Other keys the same change set at once (a write to `all` changes every device:
    /// net.ipv4.conf.r0.forwarding, ...).
    pub echoes: Vec<String>,
    /// The process that made it, when the source says.
    pub process: Option<Process>,
}

impl Change {
    /// "net.ipv4.conf.all.forwarding 1 -> 0", "link.r1.mtu 1500 -> 1280",
    /// "nftables.inet drt: rule added ...".
    pub fn what(&self) -> String {
        let mut s = self.key.clone();
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => s.push_str(&format!(" {o} -> {n}")),
            (None, Some(n)) => s.push_str(&format!(" = {n}")),
            _ => {}
        }
        if let Some(d) = &self.detail {
            s.push_str(": ");
            s.push_str(d);
        }
        if !self.echoes.is_empty() {
            let devs: Vec<&str> = self
                .echoes
                .iter()
                .map(|k| k.split('.').rev().nth(1).unwrap_or(k))
                .collect();
            s.push_str(&format!(" (also on {})", devs.join(", ")));
        }
        s
    }

    /// Whether `key` or one of its echoes matches `pattern` (see [`log::glob`]).
    pub fn matches(&self, pattern: &str) -> bool {
        log::glob(pattern, &self.key) || self.echoes.iter().any(|k| log::glob(pattern, k))
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.what())?;
        if let Some(p) = &self.process {
            write!(f, " by {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Change {
    /// A change of `key` from 1 to 0, by no known process.
    pub fn example(netns: u32, ts_ns: u64, kind: ChangeKind, key: &str) -> Change {
        Change {
            ts_ns,
            netns,
            kind,
            key: key.into(),
            old: Some("1".into()),
            new: Some("0".into()),
            detail: None,
            echoes: Vec::new(),
            process: None,
        }
    }
}
