//! The one owner of live evidence: everything a cause rule may ask about a drop's namespace
//! (firewall rule counters, routes, neighbours, sysctls, kernel counters, tunnel devices) is
//! fetched here, only when a rule asks, and at most once per classification.
//!
//! The cause engine sees this through the [`Investigator`] trait, so it can be tested with a
//! fake one that answers from fixed data.
use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc};

use crate::netns::{self, Registry};
use super::{
    conntrack::CtStats,
    counters::{self, Counters},
    netfilter,
    routes::{self, Route, RouteQuery},
    rules::{self, Moved},
    tunnels::{self, Tunnel},
};
use crate::events::{Answer, DropEvent};

/// What the firewall state says about a netfilter drop.
#[derive(Debug, Clone, Default)]
pub struct NfState {
    /// The DROP/REJECT rule (or chain policy) whose counter moved with this drop.
    pub rule: Option<Moved>,
    /// Conntrack's counters moved in the last seconds, with the table's fill level.
    pub ct: Option<CtStats>,
    /// Whether the namespace's rule counters could be read at all (a failed read proves
    /// nothing about rules).
    pub counters_read: bool,
    /// x_tables (iptables-legacy) tables registered in the namespace.
    pub legacy_tables: Vec<String>,
    /// The drop happened while the starting counters were being read, so they may already
    /// count it: no counter moving proves nothing.
    pub before_baseline: bool,
    /// Rules that may have dropped this packet but could not be read, and why ("nft not
    /// found"): no rule found then proves nothing.
    pub unread: Vec<String>,
}

/// Live state of a drop's namespace, read on demand. Every method may be slow (it enters the
/// namespace, runs `ip`/`nft`/`iptables-save`): the engine calls them only for the rules it
/// actually reaches, and the facts cache each answer for one classification. Each answers
/// "unknown" unless an implementation knows better.
pub trait Investigator {
    /// Command prefix to act inside `netns` ("ip netns exec NAME ", "" for our own).
    fn exec_prefix(&mut self, _netns: u32) -> String {
        String::new()
    }
    /// The `ip netns` name of `netns`, if it has one.
    fn netns_name(&mut self, _netns: u32) -> Option<String> {
        None
    }
    /// Firewall rule counters and conntrack counters for a netfilter drop.
    fn netfilter(&mut self, _d: &DropEvent, _answer: Option<Answer>) -> NfState {
        NfState::default()
    }
    /// The kernel's own route lookup for the packet (honours policy rules and tables).
    fn route(&mut self, _d: &DropEvent) -> Option<Route> {
        None
    }
    /// Non-loopback interfaces in the namespace.
    fn interfaces(&mut self, _netns: u32) -> Option<usize> {
        None
    }
    /// Unresolved neighbour entries on the drop's device ("ADDR STATE").
    fn neighbours(&mut self, _d: &DropEvent) -> Vec<String> {
        Vec::new()
    }
    /// A sysctl's value inside the namespace (`net.ipv4.ipfrag_time`).
    fn sysctl(&mut self, _netns: u32, _key: &str) -> Option<String> {
        None
    }
    /// Kernel SNMP counters that moved in the namespace in the last seconds.
    fn counters(&mut self, _netns: u32) -> Counters {
        Counters::default()
    }
    /// The tunnel device of a drop: `dev` itself when it is a tunnel, else the one whose outer
    /// addresses are `src` -> `dst` (local -> remote).
    fn tunnel(
        &mut self,
        _netns: u32,
        _dev: Option<String>,
        _src: IpAddr,
        _dst: IpAddr,
    ) -> Option<Tunnel> {
        None
    }
    /// The kernel's route for a packet this namespace sends to `dst`.
    fn route_to(&mut self, _netns: u32, _dst: IpAddr) -> Option<Route> {
        None
    }
    /// The name of interface `ifindex` in the namespace.
    fn ifname(&mut self, _netns: u32, _ifindex: u32) -> Option<String> {
        None
    }
}

/// Names of namespaces and interfaces: cheap (cached reads of /run/netns, /proc and the
/// namespace's devices), so the event loop asks them itself. As an investigator it knows
/// nothing else: every fact from live state is unknown.
pub struct Names {
    namespaces: Registry,
    ifnames: HashMap<(u32, u32), Arc<str>>,
    /// Namespaces found gone, for an owner that caches more per namespace (see [`Live`]);
    /// `None` when nobody asks.
    forgotten: Option<Vec<u32>>,
}

/// Bound of the interface-name cache (names are looked up per distinct drop).
const MAX_IFNAMES: usize = 4096;

impl Names {
    pub fn new() -> Self {
        Names {
            namespaces: Registry::new(),
            ifnames: HashMap::new(),
            forgotten: None,
        }
    }

    /// Names that also remember which namespaces were found gone (see [`Names::take_forgotten`]).
    fn tracking() -> Self {
        Names {
            forgotten: Some(Vec::new()),
            ..Names::new()
        }
    }

    /// The namespaces found gone since the last call.
    fn take_forgotten(&mut self) -> Vec<u32> {
        self.forgotten.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// How to enter `netns`: `Some(None)` for dropscope's own namespace, `None` if it cannot
    /// be entered (gone, or no handle found). What was cached for namespaces that are gone
    /// is forgotten first: their inodes are given to new namespaces.
    fn path(&mut self, netns: u32) -> Option<Option<PathBuf>> {
        if netns == self.namespaces.own() {
            return Some(None);
        }
        let path = self.namespaces.get(netns).map(|r| r.path.clone());
        self.forget_gone();
        path.map(Some)
    }

    /// Drops the names kept for namespaces the registry found gone (or replaced).
    fn forget_gone(&mut self) {
        for netns in self.namespaces.take_gone() {
            self.ifnames.retain(|(ns, _), _| *ns != netns);
            if let Some(f) = self.forgotten.as_mut() {
                f.push(netns);
            }
        }
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

impl Investigator for Names {
    fn exec_prefix(&mut self, netns: u32) -> String {
        let prefix = self.namespaces.exec_prefix(netns);
        self.forget_gone();
        prefix
    }

    fn netns_name(&mut self, netns: u32) -> Option<String> {
        let name = self.namespaces.name(netns);
        self.forget_gone();
        name
    }

    fn ifname(&mut self, netns: u32, ifindex: u32) -> Option<String> {
        // The path first: it forgets the names of a namespace whose inode was reused.
        let path = self.path(netns)?;
        if let Some(name) = self.ifnames.get(&(netns, ifindex)) {
            return Some(name.to_string());
        }
        let name = netns::ifname(path.as_deref(), ifindex)?;
        if self.ifnames.len() >= MAX_IFNAMES {
            self.ifnames.clear();
        }
        self.ifnames
            .insert((netns, ifindex), Arc::from(name.as_str()));
        Some(name)
    }
}

/// The real investigator: reads the kernel's state inside the drop's namespace.
pub struct Live {
    names: Names,
    rules: rules::Tracker,
    counters: counters::Tracker,
    nf_tables: HashMap<u32, Vec<String>>,
    /// When the rule baselines were complete (CLOCK_MONOTONIC ns): a drop before then may
    /// already be counted in them, so no counter moving for it proves nothing.
    baselines_at: u64,
}

impl Live {
    /// An investigator starting from the rule and counter baselines read at attach time.
    pub fn new(rules: rules::Tracker, counters: counters::Tracker) -> Self {
        Live {
            names: Names::tracking(),
            rules,
            counters,
            nf_tables: HashMap::new(),
            baselines_at: 0,
        }
    }

    /// Says when the baselines were complete (see [`Live::baselines_at`]).
    pub fn baselines_at(mut self, ts_ns: u64) -> Self {
        self.baselines_at = ts_ns;
        self
    }

    fn path(&mut self, netns: u32) -> Option<Option<PathBuf>> {
        let path = self.names.path(netns);
        self.forget_gone();
        path
    }

    /// Drops the state kept for namespaces found gone (or replaced): their inodes are given
    /// to new namespaces.
    fn forget_gone(&mut self) {
        for netns in self.names.take_forgotten() {
            self.rules.forget(netns);
            self.counters.forget(netns);
            self.nf_tables.remove(&netns);
        }
    }

    /// Registered x_tables tables of a namespace, read once.
    fn legacy_tables(&mut self, netns: u32) -> Vec<String> {
        let path = self.path(netns);
        if let Some(t) = self.nf_tables.get(&netns) {
            return t.clone();
        }
        let tables = match path {
            Some(path) => netfilter::legacy_tables(path.as_deref()),
            None => return Vec::new(),
        };
        self.nf_tables.insert(netns, tables.clone());
        tables
    }
}

impl Investigator for Live {
    fn exec_prefix(&mut self, netns: u32) -> String {
        let prefix = self.names.exec_prefix(netns);
        self.forget_gone();
        prefix
    }

    fn netns_name(&mut self, netns: u32) -> Option<String> {
        let name = self.names.netns_name(netns);
        self.forget_gone();
        name
    }

    fn netfilter(&mut self, d: &DropEvent, answer: Option<Answer>) -> NfState {
        let legacy_tables = self.legacy_tables(d.netns);
        let Some(path) = self.path(d.netns) else {
            return NfState {
                legacy_tables,
                ..Default::default()
            };
        };
        let fields = rules::PacketFields::of(d);
        let mut found = rules::Attribution::default();
        for fresh in [false, true] {
            found = self
                .rules
                .attribute_after(d.netns, path.as_deref(), fresh, d.ts_ns);
            found.moved.retain(|m| m.matcher.could_match(&fields));
            if !found.moved.is_empty() {
                break;
            }
        }
        // An ICMP error sent with the drop prefers a REJECT rule, its absence a DROP rule;
        // otherwise the rule that moved most.
        let is_reject = |m: &&Moved| matches!(m.verdict, rules::Target::Reject(_));
        let preferred = match answer {
            Some(Answer::Icmp(..) | Answer::Icmp6(..) | Answer::TcpReset) => {
                found.moved.iter().find(is_reject)
            }
            None => found.moved.iter().find(|m| !is_reject(m)),
        };
        // Dropped while the baselines were being read: its rule's counter may already be in
        // them.
        let before_baseline = found.moved.is_empty() && d.ts_ns < self.baselines_at;
        // nftables frees what its rules drop in nft_do_chain, so only nf_tables rules can
        // explain such a drop; any other place may be any engine's.
        let in_nft = &*d.location == "nft_do_chain";
        let unread = found
            .unread
            .into_iter()
            .filter(|(store, _)| !in_nft || *store == rules::Store::NfTables)
            .map(|(_, why)| why)
            .collect();
        NfState {
            rule: preferred.or(found.moved.first()).cloned(),
            ct: found.ct,
            counters_read: found.read && !before_baseline,
            legacy_tables,
            before_baseline,
            unread,
        }
    }

    fn route(&mut self, d: &DropEvent) -> Option<Route> {
        let flow = d.flow?;
        let path = self.path(d.netns)?;
        // A packet that arrived on a device is routed as input from it (policy rules may
        // match the input interface); a local one as output.
        let iif = match d.ingress() {
            Some(dev) if !d.is_local_out() => Some(dev.name().to_string()),
            _ => None,
        };
        let query = RouteQuery {
            dst: flow.dst,
            src: Some(flow.src),
            iif,
            mark: d.mark.filter(|&m| m != 0),
            proto: Some(flow.proto),
            ports: flow.ports,
        };
        routes::get(path.as_deref(), query)
    }

    fn interfaces(&mut self, netns: u32) -> Option<usize> {
        let path = self.path(netns)?;
        routes::interfaces(path.as_deref())
    }

    fn neighbours(&mut self, d: &DropEvent) -> Vec<String> {
        let (Some(path), Some(dev)) = (self.path(d.netns), d.dev) else {
            return Vec::new();
        };
        routes::unresolved_neighbours(
            path.as_deref(),
            dev.name().to_string(),
            d.flow.map(|f| f.dst),
        )
    }

    fn sysctl(&mut self, netns: u32, key: &str) -> Option<String> {
        let path = self.path(netns)?;
        netns::sysctl(path.as_deref(), key)
    }

    fn counters(&mut self, netns: u32) -> Counters {
        match self.path(netns) {
            Some(path) => self.counters.moved(netns, path.as_deref()),
            None => Counters::default(),
        }
    }

    fn tunnel(
        &mut self,
        netns: u32,
        dev: Option<String>,
        src: IpAddr,
        dst: IpAddr,
    ) -> Option<Tunnel> {
        let path = self.path(netns)?;
        tunnels::find(path.as_deref(), dev, src, dst)
    }

    fn route_to(&mut self, netns: u32, dst: IpAddr) -> Option<Route> {
        let path = self.path(netns)?;
        let query = RouteQuery {
            dst,
            src: None,
            iif: None,
            mark: None,
            proto: None,
            ports: None,
        };
        routes::get(path.as_deref(), query)
    }

    fn ifname(&mut self, netns: u32, ifindex: u32) -> Option<String> {
        let name = self.names.ifname(netns, ifindex);
        self.forget_gone();
        name
    }
}
