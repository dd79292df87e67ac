//! The change watcher: one thread that reads the kernel's change records and the netlink
//! monitors of every watched namespace, opens monitors in namespaces as they appear and closes
//! them as they go, and hands each change to the session.
use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsRawFd, BorrowedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{
    feed::Publisher,
    kernel,
    netlink::NsMonitor,
    process::CgroupIndex,
    Change, ChangeKind,
};
use crate::netns::Registry;

/// New and gone namespaces are looked for this often.
const RESCAN: Duration = Duration::from_secs(2);
/// A netconf notification waits this long for the sysctl write that caused it (which names
/// the process) before it is reported on its own.
const NETCONF_HOLD: Duration = Duration::from_millis(300);
/// After a sysctl write, netconf notifications of the same setting in the same namespace
/// are its echo (the kernel notifies every device a write to `all` changed) for this long.
const ECHO: Duration = Duration::from_secs(1);
/// Namespaces watched at most (each costs two sockets).
const MAX_MONITORS: usize = 1024;

/// A running watcher; dropping it stops the thread.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Watcher {
    /// Stops the thread after its pass at hand, whose changes are published (nudge the feed
    /// first to make that pass immediate).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Watcher {
    /// Starts watching the namespaces `watched` (all of them when empty) and, when given,
    /// the kernel's change ring; changes go to `out`.
    pub fn start(
        ring: Option<RingBuf<MapData>>,
        watched: Vec<u32>,
        clock: fn() -> u64,
        out: Publisher,
    ) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dropscope-changes".into())
            .spawn(move || {
                let mut state = State {
                    ring,
                    watched,
                    clock,
                    out,
                    monitors: HashMap::new(),
                    registry: Registry::new(),
                    cgroups: CgroupIndex::new(),
                    held: VecDeque::new(),
                    echoes: Vec::new(),
                    scanned: None,
                };
                while !flag.load(Ordering::Relaxed) {
                    state.turn();
                }
            })
            .ok();
        Watcher { stop, thread }
    }
}

struct State {
    ring: Option<RingBuf<MapData>>,
    watched: Vec<u32>,
    clock: fn() -> u64,
    out: Publisher,
    monitors: HashMap<u32, NsMonitor>,
    registry: Registry,
    cgroups: CgroupIndex,
    /// Netconf changes waiting for their sysctl write.
    held: VecDeque<(Instant, Change)>,
    /// Recent sysctl writes: (when, netns, family prefix "net.ipv4." and setting name).
    echoes: Vec<(Instant, u32, String)>,
    scanned: Option<Instant>,
}

impl State {
    /// One round: rescan if due, wait for input (at most 200 ms, or until the pipeline asks
    /// for a pass), read it, publish it with the time the reading started.
    fn turn(&mut self) {
        if self.scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            self.rescan();
        }
        let mut fds: Vec<i32> = self.ring.iter().map(|r| r.as_raw_fd()).collect();
        for m in self.monitors.values() {
            fds.extend(m.fds());
        }
        // SAFETY: every fd is owned by `self` and stays open during the poll.
        let mut pollfds: Vec<PollFd> = fds
            .iter()
            .map(|&fd| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN))
            .collect();
        pollfds.push(PollFd::new(self.out.wake_fd(), PollFlags::POLLIN));
        let _ = poll(&mut pollfds, PollTimeout::from(200u16));
        drop(pollfds);
        self.out.woken();
        // Whatever the kernel did before this moment is in the ring or the sockets now.
        let watermark = (self.clock)();
        let mut changes = Vec::new();
        if let Some(ring) = &mut self.ring {
            while let Some(item) = ring.next() {
                changes.extend(kernel::decode(&item, &mut self.cgroups));
            }
        }
        for m in self.monitors.values_mut() {
            changes.extend(m.read(watermark));
        }
        let mut out = Vec::new();
        for c in changes {
            // Without the sysctl program there is no write to wait for.
            if c.kind == ChangeKind::Netconf && self.ring.is_some() {
                self.held.push_back((Instant::now(), c));
                continue;
            }
            if c.kind == ChangeKind::Sysctl {
                self.echoes.push((Instant::now(), c.netns, setting(&c.key)));
            }
            out.push(c);
        }
        self.echoes.retain(|(t, ..)| t.elapsed() < ECHO);
        let mut due: Vec<Change> = Vec::new();
        while self
            .held
            .front()
            .is_some_and(|(t, _)| t.elapsed() >= NETCONF_HOLD)
        {
            let (_, c) = self.held.pop_front().expect("checked");
            let echo = self
                .echoes
                .iter()
                .any(|(_, ns, s)| *ns == c.netns && *s == setting(&c.key));
            if !echo {
                due.push(c);
            }
        }
        let (mut direct, netconf): (Vec<Change>, Vec<Change>) =
            out.into_iter().partition(|c| c.kind != ChangeKind::Netconf);
        due.extend(netconf);
        direct.extend(group_echoes(due));
        self.out.publish(direct, watermark);
    }

    /// Opens monitors in new watched namespaces and closes those of namespaces gone (a
    /// socket would keep a deleted namespace alive).
    fn rescan(&mut self) {
        self.scanned = Some(Instant::now());
        let own = self.registry.own();
        let live: HashMap<u32, _> = self
            .registry
            .all()
            .into_iter()
            .filter(|r| self.watched.is_empty() || self.watched.contains(&r.inode))
            .map(|r| (r.inode, r))
            .collect();
        // Monitors follow the scan itself; the registry's list of gone inodes is not needed.
        self.registry.take_gone();
        self.monitors.retain(|netns, _| live.contains_key(netns));
        for (netns, r) in live {
            if self.monitors.contains_key(&netns) || self.monitors.len() >= MAX_MONITORS {
                continue;
            }
            let path = (netns != own).then_some(r.path);
            match NsMonitor::open(netns, path) {
                Ok(m) => {
                    self.monitors.insert(netns, m);
                }
                Err(e) => tracing::debug!("cannot watch netns {netns}: {e:#}"),
            }
        }
    }
}

/// Netconf notifications of one write: the kernel notifies `all`, `default` and every device
/// a write to `all` changed. They become one change, keyed by `all` when it is among them.
fn group_echoes(changes: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    for c in changes {
        let same = out.iter_mut().find(|o| {
            o.netns == c.netns
                && setting(&o.key) == setting(&c.key)
                && (o.old.as_ref(), o.new.as_ref()) == (c.old.as_ref(), c.new.as_ref())
        });
        match same {
            Some(o) => {
                if c.key.contains(".conf.all.") {
                    let previous = std::mem::replace(&mut o.key, c.key);
                    o.echoes.push(previous);
                } else {
                    o.echoes.push(c.key);
                }
            }
            None => out.push(c),
        }
    }
    out
}

/// What a sysctl or netconf key sets, whatever the device: "net.ipv4.forwarding" for
/// net.ipv4.conf.*.forwarding and net.ipv4.ip_forward alike.
fn setting(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["net", fam, "ip_forward"] => format!("net.{fam}.forwarding"),
        ["net", fam, "conf", .., last] => format!("net.{fam}.{last}"),
        _ => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{group_echoes, setting, Change, ChangeKind};

    #[test]
    fn a_write_to_all_and_its_device_notifications_are_one_change() {
        let c = |key: &str| Change::example(7, 1, ChangeKind::Netconf, key);
        let grouped = group_echoes(vec![
            c("net.ipv4.conf.r0.forwarding"),
            c("net.ipv4.conf.all.forwarding"),
            c("net.ipv4.conf.r1.forwarding"),
            c("net.ipv4.conf.r1.rp_filter"),
        ]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].key, "net.ipv4.conf.all.forwarding");
        assert!(grouped[0].matches("net.ipv4.conf.r1.forwarding"));
        assert_eq!(
            grouped[0].what(),
            "net.ipv4.conf.all.forwarding 1 -> 0 (also on r0, r1)"
        );
    }

    #[test]
    fn a_write_to_all_and_its_per_device_echoes_are_one_setting() {
        assert_eq!(setting("net.ipv4.ip_forward"), "net.ipv4.forwarding");
        assert_eq!(setting("net.ipv4.conf.all.forwarding"), "net.ipv4.forwarding");
        assert_eq!(setting("net.ipv4.conf.r0.forwarding"), "net.ipv4.forwarding");
        assert_eq!(setting("net.ipv4.conf.r0.rp_filter"), "net.ipv4.rp_filter");
        assert_ne!(setting("net.ipv6.conf.r0.forwarding"), "net.ipv4.forwarding");
    }
}
