//! Configuration changes in the pipeline: which sources are watched, the changes reported as
//! they arrive, and the latest one named in the evidence of the drops it may explain.
use std::sync::Arc;

use super::Pipeline;
use crate::{
    causes::Verdict,
    changes::{feed::Feed, Change, ChangeKind},
    classify::Done,
    events::DropEvent,
    output::{ChangeRecord, Sink},
    pods::PodRef,
};

/// Which change sources are watched, so that "unchanged since dropscope started" is only
/// said of settings a source would have seen change.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watched {
    /// Writes to any `net.*` sysctl (the cgroup/sysctl program).
    pub sysctl: bool,
    /// iptables-legacy table replacements.
    pub xt_replace: bool,
    /// Netlink: device forwarding and rp_filter, links, routes, addresses, nftables.
    pub netlink: bool,
}

impl Watched {
    /// Whether a change to `key` would have been seen.
    pub fn covers(&self, key: &str) -> bool {
        if key.starts_with("iptables-legacy.") {
            self.xt_replace
        } else if key.starts_with("net.") {
            self.sysctl
                || (self.netlink
                    && key.contains(".conf.")
                    && (key.ends_with(".forwarding") || key.ends_with(".rp_filter")))
        } else {
            self.netlink
        }
    }
}

impl Pipeline {
    /// Names the latest change of the settings the cause depends on, or says there was none.
    /// The evidence worker waited for the changes made before the drop to be read (see
    /// [`Feed::wait_for`]); they are taken here.
    pub(super) fn join_change(&mut self, done: Done, d: &DropEvent, sink: &mut dyn Sink) -> Verdict {
        let mut verdict = done.verdict;
        if done.patterns.is_empty() || verdict.benign {
            return verdict;
        }
        self.take_changes(sink);
        match self.changes.latest(d.netns, &done.patterns, d.ts_ns) {
            Some(c) => {
                verdict
                    .evidence
                    .push_str(&format!("; {}", self.describe(&c, d.ts_ns)));
                verdict.attribution.change = Some(c);
            }
            None if !done.changes_read => verdict.evidence.push_str(
                "; changes just before this drop not read yet (the change watcher is behind)",
            ),
            None => verdict.evidence.push_str(&self.unchanged(&done.patterns)),
        }
        verdict
    }

    /// Says which change sources run (see [`Watched`]) and where their changes arrive.
    pub fn watching(&mut self, watched: Watched, feed: Arc<Feed>) {
        self.watched = watched;
        self.feed = Some(feed);
    }

    /// Feeds the changes queued so far.
    pub fn take_changes(&mut self, sink: &mut dyn Sink) {
        if let Some(feed) = self.feed.clone() {
            for c in feed.take() {
                self.on_change(c, sink);
            }
        }
    }

    /// Feeds one configuration change: it is reported, remembered for the evidence of later
    /// drops, and the drops of its namespace are classified afresh.
    pub fn on_change(&mut self, mut c: Change, sink: &mut dyn Sink) {
        if let Some(p) = &mut c.process {
            if let Some(cgroup) = &p.cgroup {
                let (pod, container) = self.pods.for_cgroup(cgroup);
                p.pod = pod;
                p.container = container;
            }
        }
        if !self.filter.netns.is_empty() && !self.filter.netns.contains(&c.netns) {
            return;
        }
        if !self.filter.pods.is_empty() {
            let netns_pod = self.pods.for_drop(c.netns, None);
            let by_pod = |p: &Option<Arc<PodRef>>| {
                p.as_ref()
                    .is_some_and(|p| self.filter.pods.iter().any(|w| p.is(w)))
            };
            let process_pod = c.process.as_ref().and_then(|p| p.pod.clone());
            if !by_pod(&netns_pod) && !by_pod(&process_pod) {
                return;
            }
        }
        let c = Arc::new(c);
        // Drops already folded in this namespace may now have a change to name.
        self.flush(sink);
        self.folds
            .retain(|k, f| k.netns != c.netns || f.verdict.is_none());
        self.changes.push(c.clone());
        sink.change(&ChangeRecord {
            netns_name: self.blind.investigator().netns_name(c.netns),
            change: c,
        });
    }

    /// "net.ipv4.conf.all.forwarding changed 1 -> 0 at 03:12:44 by sysctl (pid 812) <- bash
    /// (pid 800), 11 s before this drop".
    pub(super) fn describe(&self, c: &Change, drop_ns: u64) -> String {
        let at = self.clock.local_time(c.ts_ns);
        let mut s = match (&c.old, &c.new) {
            (Some(o), Some(n)) => format!("{} changed {o} -> {n} at {at}", c.key),
            _ => format!(
                "{} changed at {at}{}",
                c.key,
                c.detail
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
        };
        match &c.process {
            Some(p) => s.push_str(&format!(" by {p}")),
            None if c.kind != ChangeKind::Sysctl => {
                s.push_str(" (the kernel does not say by which process)")
            }
            None => {}
        }
        let ago = drop_ns.saturating_sub(c.ts_ns) as f64 / 1e9;
        s.push_str(&format!(", {} before this drop", human_secs(ago)));
        s
    }

    /// What to say when no change to the cause's settings was seen.
    pub(super) fn unchanged(&self, patterns: &[String]) -> String {
        let since = self.clock.local_time(self.changes.since_ns);
        if patterns.iter().all(|p| self.watched.covers(p)) {
            format!("; unchanged since dropscope started at {since}")
        } else if patterns.iter().any(|p| self.watched.covers(p)) {
            format!("; no change seen since dropscope started at {since} (not every source of change is watched on this host)")
        } else {
            "; changes to it are not watched on this host".to_string()
        }
    }
}

/// "11 s", "3 min 20 s", "2 h 5 min".
fn human_secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 10.0 {
        return format!("{s:.1} s");
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}
