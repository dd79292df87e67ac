//! Naming the firewall rule behind a netfilter drop, by its packet counters.
//!
//! At start-up dropscope snapshots the per-rule counters of both engines (iptables-legacy and
//! nftables, including iptables-nft) in every namespace with rules. When a netfilter drop
//! appears, the namespace is snapshotted again: the DROP/REJECT rules whose counters moved are
//! the ones that dropped it. Read-only: the ruleset is never modified.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use std::net::IpAddr;

use super::conntrack::CtStats;
use crate::netns::run_in;

mod nft_json;
mod nft_netlink;
/// The name nft uses for an nfgenmsg family (NFPROTO_*), for the change watcher too.
pub use nft_netlink::family_name as nft_family_name;
#[cfg(test)]
mod old_parsers;
mod save;

use nft_netlink::Nl;
use save::SaveParser;

/// A firewall rule's target (what iptables calls it; nftables says verdict): drop or reject.
/// Not the cause table's [`crate::causes::Verdict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Drop,
    /// REJECT, with what it answers ("tcp-reset", "icmp-port-unreachable", ...).
    Reject(String),
}

/// One rule with a counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleId {
    /// "nftables", "iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy".
    pub engine: &'static str,
    pub table: String,
    pub chain: String,
    /// The rule as its tool prints it (or "policy DROP").
    pub text: String,
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} table {} chain {}: {}",
            self.engine, self.table, self.chain, self.text
        )
    }
}

/// A rule whose counter moved, and by how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub rule: RuleId,
    pub verdict: Target,
    pub matcher: Matcher,
    pub packets: u64,
}

/// What a rule matches on, as far as simple fields go (protocol, ports, addresses,
/// interfaces). Used to rule out rules that cannot have matched a given packet; anything more
/// complex (sets, negations, marks) is left unknown and never excludes a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub proto: Option<u8>,
    pub sport: Option<(u16, u16)>,
    pub dport: Option<(u16, u16)>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    /// The rule matches conntrack state INVALID.
    pub ct_invalid: bool,
}

impl Matcher {
    /// Whether a packet with these fields could have matched (unknown fields never exclude).
    pub fn could_match(&self, p: &PacketFields) -> bool {
        fn ok<T, U>(rule: &Option<T>, pkt: &Option<U>, f: impl Fn(&T, &U) -> bool) -> bool {
            match (rule, pkt) {
                (Some(r), Some(v)) => f(r, v),
                _ => true,
            }
        }
        ok(&self.proto, &p.proto, |a, b| a == b)
            && ok(&self.sport, &p.sport, |(lo, hi), v| (lo..=hi).contains(&v))
            && ok(&self.dport, &p.dport, |(lo, hi), v| (lo..=hi).contains(&v))
            && ok(&self.src, &p.src, |n, a| n.contains(a))
            && ok(&self.dst, &p.dst, |n, a| n.contains(a))
            && ok(&self.iif, &p.iif, |a, b| a == b)
            && ok(&self.oif, &p.oif, |a, b| a == b)
    }
}

/// The packet fields a [`Matcher`] is compared with.
#[derive(Debug, Clone, Default)]
pub struct PacketFields {
    pub proto: Option<u8>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub iif: Option<String>,
    pub oif: Option<String>,
}

impl PacketFields {
    /// The fields of a drop that firewall rules commonly match on.
    pub fn of(d: &crate::events::DropEvent) -> Self {
        let flow = d.flow.as_ref();
        PacketFields {
            proto: flow.map(|f| f.proto),
            sport: flow.and_then(|f| f.ports).map(|p| p.0),
            dport: flow.and_then(|f| f.ports).map(|p| p.1),
            src: flow.map(|f| f.src),
            dst: flow.map(|f| f.dst),
            iif: d.ingress().map(|dev| dev.name().to_string()),
            oif: d.out.map(|dev| dev.name().to_string()),
        }
    }
}

#[derive(Debug, Clone)]
struct Counted {
    verdict: Target,
    matcher: Matcher,
    packets: u64,
}

/// How to re-read the counters of the nftables rules a snapshot keeps (native ones and
/// iptables-nft's) without the tools: their handles, per chain. Valid while the ruleset
/// generation stays `gen` (no rule added, deleted or moved since).
#[derive(Debug, Default)]
struct NftIndex {
    gen: u32,
    /// (family, table, chain) -> handle -> the rule.
    chains: HashMap<(u8, String, String), HashMap<u64, RuleId>>,
    /// Base chains of iptables-nft tables whose DROP policy is kept: (family, table, chain).
    policies: HashMap<(u8, String, String), RuleId>,
}

/// Where the kernel keeps a kind of rule: nf_tables (nftables and iptables-nft) or x_tables
/// (iptables-legacy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    NfTables,
    XTables,
}

/// Counters of every DROP/REJECT rule, and conntrack's, in one namespace at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    rules: HashMap<RuleId, Counted>,
    ct: Option<CtStats>,
    /// Whether the rule sets could be read (the tools ran in the namespace).
    read: bool,
    /// Set when the nftables rules were read over netlink: a later read can then ask the
    /// kernel for just the chains holding kept rules.
    nft: Option<Arc<NftIndex>>,
    /// Rules that exist, or may, but could not be read, and why ("nft not found").
    unread: Vec<(Store, String)>,
}

/// What a look at a namespace found: the rules that moved and conntrack's deltas.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    pub moved: Vec<Moved>,
    pub ct: Option<CtStats>,
    /// Whether the namespace's rule counters were read: without them, an empty `moved`
    /// proves nothing.
    pub read: bool,
    /// What could not be read in the latest look, and why: an empty `moved` does not clear
    /// the rules of that store.
    pub unread: Vec<(Store, String)>,
}

/// The iptables-legacy tools, per family: (x_tables names file, tool, engine).
const LEGACY: [(&str, &str, &str); 2] = [
    (
        "/proc/thread-self/net/ip_tables_names",
        "iptables-legacy-save",
        "iptables-legacy",
    ),
    (
        "/proc/thread-self/net/ip6_tables_names",
        "ip6tables-legacy-save",
        "ip6tables-legacy",
    ),
];

impl Snapshot {
    /// Reads all engines inside the namespace at `ns` (`None`: dropscope's own): every
    /// table of iptables-nft and iptables-legacy (`*-save -c`, read line by line) and of
    /// nftables (over netlink; `nft -j` read as a stream where netlink fails).
    pub fn take(ns: Option<&Path>) -> Self {
        match ns {
            Some(path) => run_in(path, read_all).unwrap_or_default(),
            None => read_all(),
        }
    }

    /// Reads again only what can hold a kept rule: the nftables chains with one (over
    /// netlink, when the ruleset generation has not changed since `self` was taken, which
    /// also proves that no nftables rule was added), and the iptables-legacy tables with one
    /// (`iptables-legacy-save -t TABLE`; every legacy table with `all_legacy`, since
    /// x_tables has no generation to tell a new rule by). `None` when that cannot be done
    /// (the ruleset changed, or `self` was not read over netlink): take a full snapshot.
    pub fn reread(&self, ns: Option<&Path>, all_legacy: bool) -> Option<Snapshot> {
        if !self.read {
            return None;
        }
        let before = self.clone();
        let read = move || reread(before, all_legacy);
        match ns {
            Some(path) => run_in(path, read).ok().flatten(),
            None => read(),
        }
    }

    /// Rules whose counters grew since `before` (new rules count from zero).
    pub fn moved_since(&self, before: &Snapshot) -> Vec<Moved> {
        let mut moved: Vec<Moved> = self
            .rules
            .iter()
            .filter_map(|(id, c)| {
                let was = before.rules.get(id).map_or(0, |b| b.packets);
                (c.packets > was).then(|| Moved {
                    rule: id.clone(),
                    verdict: c.verdict.clone(),
                    matcher: c.matcher.clone(),
                    packets: c.packets - was,
                })
            })
            .collect();
        moved.sort_by_key(|m| std::cmp::Reverse(m.packets));
        moved
    }

    /// Whether there is anything to compare later (rules or conntrack).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.ct.is_none() && !self.read
    }

    /// How many DROP/REJECT rules and policies it keeps.
    pub fn len(&self) -> usize {
        self.rules.len()
    }
}

/// A full read, in the calling thread's namespace. iptables-legacy is read on a second
/// thread meanwhile (its tool waits on the kernel and on its own parsing, not on ours).
fn read_all() -> Snapshot {
    let ct = CtStats::read();
    let (nft, legacy) = std::thread::scope(|s| {
        // A thread started here is in this thread's namespace too.
        let legacy = s.spawn(|| read_legacy(None));
        let legacy = legacy
            .join()
            .unwrap_or_else(|_| Err("the iptables-legacy reader failed".into()));
        (read_nftables(), legacy)
    });
    let mut snap = Snapshot {
        ct,
        read: nft.read && legacy.is_ok(),
        nft: nft.index.map(Arc::new),
        unread: nft.unread.into_iter().map(|w| (Store::NfTables, w)).collect(),
        ..Default::default()
    };
    snap.rules.extend(nft.rules);
    match legacy {
        Ok(rules) => snap.rules.extend(rules),
        Err(why) => snap.unread.push((Store::XTables, why)),
    }
    snap
}

/// Kept iptables-nft rules per chain (family, table, chain): the chain's length and each
/// rule's place in it.
type Places = HashMap<(u8, String, String), (usize, Vec<(usize, RuleId)>)>;

/// What the nftables side of a full read found.
#[derive(Default)]
struct NftRead {
    rules: Vec<(RuleId, Counted)>,
    /// Whether any of iptables-nft-save, ip6tables-nft-save, netlink or nft could be read.
    read: bool,
    index: Option<NftIndex>,
    /// Why nf_tables rules may be missing ("nft not found" when netlink failed too).
    unread: Vec<String>,
}

/// iptables-nft (both families) through its tools, for the rules' text, then every nftables
/// rule over netlink: native rules are decoded, iptables-nft rules matched to their text by
/// their place in their chain to learn their handles. The ruleset generation before and
/// after tells whether the places still held; a read that raced with a change is tried once
/// more, and otherwise keeps its rules without the index.
fn read_nftables() -> NftRead {
    let mut nl = Nl::open().ok();
    let mut last = NftRead::default();
    for _ in 0..2 {
        let gen = nl.as_mut().and_then(|n| n.generation().ok());
        let mut out = NftRead::default();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        // Kept iptables-nft rules by chain: (place in chain, id); and chain lengths.
        let mut places: Places = HashMap::new();
        let mut policies = HashMap::new();
        for (tool, engine, family) in [
            ("iptables-nft-save", "iptables-nft", 2u8),
            ("ip6tables-nft-save", "ip6tables-nft", 10u8),
        ] {
            let mut parser = SaveParser::new(engine);
            let mut kept = Vec::new();
            if let Err(why) = each_line(tool, &["-c"], |l| kept.extend(parser.line(l))) {
                // Without the tool (no iptables here), netlink still reads every rule.
                if !why.ends_with("not found") {
                    out.unread.push(why);
                }
                continue;
            }
            out.read = true;
            let fam = nft_netlink::family_name(family);
            for t in &parser.tables {
                seen.insert((fam.to_string(), t.clone()));
            }
            for k in kept {
                let key = (family, k.id.table.clone(), k.id.chain.clone());
                match k.index {
                    Some(i) => {
                        let len = parser.chain_len(&k.id.table, &k.id.chain);
                        let e = places.entry(key).or_insert((len, Vec::new()));
                        e.1.push((i, k.id.clone()));
                    }
                    None => {
                        policies.insert(key, k.id.clone());
                    }
                }
                out.rules.push((k.id, k.counted));
            }
        }
        let native = match nl.as_mut() {
            Some(nl) => netlink_rules(nl, &seen, &places),
            None => None,
        };
        match native {
            Some((rules, chains)) => {
                out.read = true;
                out.rules.extend(rules);
                let after = nl.as_mut().and_then(|n| n.generation().ok());
                if let (Some(chains), true) = (chains, gen.is_some() && gen == after) {
                    out.index = Some(NftIndex {
                        gen: gen.unwrap_or_default(),
                        chains,
                        policies,
                    });
                    return out;
                }
            }
            None => {
                // No netlink (or it failed): nft's JSON, read as a stream.
                let mut rules = Vec::new();
                let read = each_json("nft", &["-j", "list", "ruleset"], |r| {
                    nft_json::read(r, &seen, &mut |id, c| rules.push((id, c)))
                });
                match read {
                    Ok(()) => {
                        out.read = true;
                        out.rules.extend(rules);
                    }
                    // nft alone lists every nf_tables rule without netlink.
                    Err(why) => out.unread.insert(0, why),
                }
                return out;
            }
        }
        last = out;
    }
    last
}

/// The nftables rules over netlink: every rule of the native tables (kept: counter and
/// drop/reject), and of the iptables-nft tables only the chains with a kept rule (`places`),
/// whose handles are found by their place in their chain: the handles of kept rules per
/// chain, `None` when a chain's length differs from what iptables-nft-save listed (the
/// places would not hold). `None` when a dump failed.
#[allow(clippy::type_complexity)]
fn netlink_rules(
    nl: &mut Nl,
    iptables: &HashSet<(String, String)>,
    places: &Places,
) -> Option<(
    Vec<(RuleId, Counted)>,
    Option<HashMap<(u8, String, String), HashMap<u64, RuleId>>>,
)> {
    let mut native = Vec::new();
    let mut chains: HashMap<(u8, String, String), HashMap<u64, RuleId>> = HashMap::new();
    let mut ct_sets = Vec::new();
    for (family, table) in nl.tables().ok()? {
        let name = (nft_netlink::family_name(family).to_string(), table.clone());
        if iptables.contains(&name) {
            continue;
        }
        nl.rules(family, Some(&table), None, |r| {
            if let Some((id, counted, ct_set)) = r.decode() {
                let key = (r.family, r.table.to_string(), r.chain.to_string());
                chains.entry(key).or_default().insert(r.handle, id.clone());
                if let Some(set) = ct_set {
                    ct_sets.push((native.len(), r.family, r.table.to_string(), set));
                }
                native.push((id, counted));
            }
        })
        .ok()?;
    }
    for (i, family, table, set) in ct_sets {
        native[i].1.matcher.ct_invalid = nl.ct_set_has_invalid(family, &table, &set).ok()?;
    }
    for ((family, table, chain), (len, wanted)) in places {
        let mut place = 0;
        let handles = chains
            .entry((*family, table.clone(), chain.clone()))
            .or_default();
        nl.rules(*family, Some(table), Some(chain), |r| {
            if let Some((_, id)) = wanted.iter().find(|(i, _)| *i == place) {
                handles.insert(r.handle, id.clone());
            }
            place += 1;
        })
        .ok()?;
        // The chain has the length iptables-nft-save listed.
        if place != *len {
            return Some((native, None));
        }
    }
    Some((native, Some(chains)))
}

/// The targeted read of [`Snapshot::reread`], in the namespace: `snap` (a copy of the
/// previous snapshot) with the counters read again.
fn reread(mut snap: Snapshot, all_legacy: bool) -> Option<Snapshot> {
    let index = snap.nft.clone()?;
    let mut nl = Nl::open().ok()?;
    if nl.generation().ok()? != index.gen {
        return None;
    }
    snap.ct = CtStats::read();
    let legacy = std::thread::scope(|s| {
        let only: HashSet<(&'static str, String)> = snap
            .rules
            .keys()
            .filter(|id| id.engine.ends_with("-legacy"))
            .map(|id| (id.engine, id.table.clone()))
            .collect();
        let legacy = s.spawn(move || {
            let read = if all_legacy {
                read_legacy(None)
            } else {
                read_legacy(Some(&only))
            };
            read.ok().map(|rules| (only, rules))
        });
        for ((family, table, chain), handles) in &index.chains {
            let rules = &mut snap.rules;
            nl.rules(*family, Some(table), Some(chain), |r| {
                if let (Some(id), Some(p)) = (handles.get(&r.handle), r.packets()) {
                    if let Some(c) = rules.get_mut(id) {
                        c.packets = p;
                    }
                }
            })
            .ok()?;
        }
        let tables: HashSet<(u8, &str)> = index
            .policies
            .keys()
            .map(|(f, t, _)| (*f, t.as_str()))
            .collect();
        for (family, table) in tables {
            for c in nl.chains(family, Some(table)).ok()? {
                let key = (family, table.to_string(), c.name);
                if let (Some(id), Some(p)) = (index.policies.get(&key), c.packets) {
                    if let Some(r) = snap.rules.get_mut(id) {
                        r.packets = p;
                    }
                }
            }
        }
        legacy.join().ok().flatten()
    });
    // The counters are only those of generation `index.gen` if it still is.
    if nl.generation().ok()? != index.gen {
        return None;
    }
    let (only, rules) = legacy?;
    // The legacy tables read replace what was kept of them (rules may have gone).
    snap.rules.retain(|id, _| {
        !id.engine.ends_with("-legacy")
            || !(all_legacy || only.contains(&(id.engine, id.table.clone())))
    });
    snap.rules.extend(rules);
    Some(snap)
}

/// iptables-legacy, both families: every table x_tables has (`only` None) or just the
/// given (engine, table) pairs (`-t TABLE`). `None` when x_tables has tables here but one
/// could not be read, and why. x_tables is only asked when it has tables (asking could load
/// modules).
fn read_legacy(
    only: Option<&HashSet<(&'static str, String)>>,
) -> Result<Vec<(RuleId, Counted)>, String> {
    let mut rules = Vec::new();
    for (names, tool, engine) in LEGACY {
        let registered = std::fs::read_to_string(names).unwrap_or_default();
        if registered.trim().is_empty() {
            continue;
        }
        let tables: Vec<Option<&str>> = match only {
            None => vec![None],
            Some(only) => registered
                .split_whitespace()
                .filter(|t| only.contains(&(engine, t.to_string())))
                .map(Some)
                .collect(),
        };
        for table in tables {
            let mut parser = SaveParser::new(engine);
            let mut kept = Vec::new();
            let mut args = vec!["-c"];
            args.extend(table.map(|t| ["-t", t]).into_iter().flatten());
            each_line(tool, &args, |l| kept.extend(parser.line(l)))?;
            rules.extend(kept.into_iter().map(|k| (k.id, k.counted)));
        }
    }
    Ok(rules)
}

/// Starts `tool args` with its output piped (no input), or says why it cannot run.
fn spawn(tool: &str, args: &[&str]) -> Result<std::process::Child, String> {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{tool} not found"),
            _ => format!("{tool} could not run: {e}"),
        })
}

/// Runs `tool args` and hands each line of its output to `each` as it arrives (never the
/// whole output in memory). Says why when the tool could not run or failed.
fn each_line(tool: &str, args: &[&str], mut each: impl FnMut(&str)) -> Result<(), String> {
    let mut child = spawn(tool, args)?;
    let Some(stdout) = child.stdout.take() else {
        return finish(tool, child, false);
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::with_capacity(512);
    let ok = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break true,
            Ok(_) => {
                let l = line.strip_suffix(b"\n").unwrap_or(&line);
                match std::str::from_utf8(l) {
                    Ok(s) => each(s),
                    Err(_) => each(&String::from_utf8_lossy(l)),
                }
            }
            Err(_) => break false,
        }
    };
    finish(tool, child, ok)
}

/// Runs `tool args` and hands its output to `parse` as a stream.
fn each_json<E>(
    tool: &str,
    args: &[&str],
    parse: impl FnOnce(&mut dyn Read) -> Result<(), E>,
) -> Result<(), String> {
    let mut child = spawn(tool, args)?;
    let Some(stdout) = child.stdout.take() else {
        return finish(tool, child, false);
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let ok = parse(&mut reader).is_ok();
    finish(tool, child, ok)
}

/// Waits for a tool (stopping it first if its output was not read to the end), and says
/// why it failed: its exit status and the first line of its error output.
fn finish(tool: &str, mut child: std::process::Child, read_all: bool) -> Result<(), String> {
    if !read_all {
        let _ = child.kill();
    }
    // The tools say little on stderr; it is read once their output is done.
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = (&mut e).take(4096).read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(|e| format!("{tool} could not be waited for: {e}"))?;
    if read_all && status.success() {
        return Ok(());
    }
    if !read_all {
        return Err(format!("{tool} output could not be read"));
    }
    let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(format!("{tool} failed ({status}): {}", why.trim())
        .trim_end_matches([':', ' '])
        .to_string())
}

/// Parses `iptables-save -c` into `snap`; returns the tables it listed.
#[cfg(test)]
pub fn parse_iptables_save(text: &str, engine: &'static str, snap: &mut Snapshot) -> Vec<String> {
    let mut parser = SaveParser::new(engine);
    for line in text.lines() {
        if let Some(k) = parser.line(line) {
            snap.rules.insert(k.id, k.counted);
        }
    }
    parser.tables
}

/// Parses `nft -j list ruleset` into `snap`, skipping tables already read through
/// iptables-nft. Text that is not nft JSON adds nothing.
#[cfg(test)]
pub fn parse_nft_json(text: &str, skip: &HashSet<(String, String)>, snap: &mut Snapshot) {
    let mut rules = Vec::new();
    if nft_json::read_str(text, skip, &mut |id, c| rules.push((id, c))).is_ok() {
        snap.rules.extend(rules);
    }
}

/// Simple match fields of an `iptables-save` rule line.
pub fn iptables_matcher(rule: &str) -> Matcher {
    let mut m = Matcher::default();
    let tokens = tokens(rule);
    for (i, pair) in tokens.windows(2).enumerate() {
        if i > 0 && tokens[i - 1] == "!" {
            continue; // negated: not reasoned about
        }
        let (flag, value) = (pair[0], pair[1]);
        match flag {
            "-p" => m.proto = proto_number(value),
            "--dport" | "--destination-port" => m.dport = port_range(value),
            "--sport" | "--source-port" => m.sport = port_range(value),
            "-s" | "--source" => m.src = net(value),
            "-d" | "--destination" => m.dst = net(value),
            "-i" | "--in-interface" if !value.ends_with('+') => m.iif = Some(value.to_string()),
            "-o" | "--out-interface" if !value.ends_with('+') => m.oif = Some(value.to_string()),
            "--ctstate" | "--state" if value.split(',').any(|v| v == "INVALID") => {
                m.ct_invalid = true
            }
            _ => {}
        }
    }
    m
}

/// The words of a rule line; a double-quoted string (a comment) is one word, so nothing in
/// it is taken for an option.
fn tokens(rule: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = rule.trim_start();
    while !rest.is_empty() {
        let end = if let Some(q) = rest.strip_prefix('"') {
            // To the closing quote (iptables escapes inner quotes as \").
            let mut esc = false;
            q.char_indices()
                .find(|&(_, c)| {
                    let close = c == '"' && !esc;
                    esc = c == '\\' && !esc;
                    close
                })
                .map_or(rest.len(), |(i, _)| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

/// Simple match fields of an nftables rule's JSON expressions.
#[cfg(test)]
pub fn nft_matcher(exprs: &[serde_json::Value]) -> Matcher {
    matches_matcher(exprs.iter().map(|e| &e["match"]))
}

/// Simple match fields of the `match` objects of an nftables rule's JSON expressions.
fn matches_matcher<'a>(matches: impl Iterator<Item = &'a serde_json::Value>) -> Matcher {
    let mut m = Matcher::default();
    for mt in matches {
        if mt["op"].as_str().is_some_and(|op| op != "==" && op != "in") {
            continue;
        }
        let right = &mt["right"];
        if mt["left"]["ct"]["key"] == "state" {
            let states = right.as_str().map(|s| vec![s]).unwrap_or_else(|| {
                right["set"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect()
            });
            m.ct_invalid |= states.contains(&"invalid");
            continue;
        }
        let payload = &mt["left"]["payload"];
        let meta = mt["left"]["meta"]["key"].as_str();
        match (
            payload["protocol"].as_str(),
            payload["field"].as_str(),
            meta,
        ) {
            (Some(proto), Some("dport"), _) => {
                m.proto = proto_number(proto);
                m.dport = nft_ports(right);
            }
            (Some(proto), Some("sport"), _) => {
                m.proto = proto_number(proto);
                m.sport = nft_ports(right);
            }
            (Some(_), Some("saddr"), _) => m.src = nft_net(right),
            (Some(_), Some("daddr"), _) => m.dst = nft_net(right),
            (Some("ip" | "ip6"), Some("protocol" | "nexthdr"), _) | (_, _, Some("l4proto")) => {
                m.proto = right.as_str().and_then(proto_number)
            }
            // A wildcard ("eth*") names no one interface.
            (_, _, Some("iifname")) => m.iif = nft_ifname(right),
            (_, _, Some("oifname")) => m.oif = nft_ifname(right),
            _ => {}
        }
    }
    m
}
fn nft_ifname(right: &serde_json::Value) -> Option<String> {
    right
        .as_str()
        .filter(|n| !n.ends_with('*'))
        .map(str::to_string)
}

/// A port or a port range (`{"range": [1000, 2000]}`) of nft's JSON.
fn nft_ports(right: &serde_json::Value) -> Option<(u16, u16)> {
    let port = |v: &serde_json::Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
    match right["range"].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => Some((port(lo)?, port(hi)?)),
        _ => port(right).map(|p| (p, p)),
    }
}

fn proto_number(name: &str) -> Option<u8> {
    crate::filter::parse_proto(name).ok()
}

fn port_range(v: &str) -> Option<(u16, u16)> {
    match v.split_once(':') {
        Some((lo, hi)) => Some((lo.parse().unwrap_or(0), hi.parse().unwrap_or(u16::MAX))),
        None => v.parse().ok().map(|p| (p, p)),
    }
}

fn net(v: &str) -> Option<IpNet> {
    crate::filter::parse_net(v).ok()
}

fn nft_net(right: &serde_json::Value) -> Option<IpNet> {
    if let Some(addr) = right.as_str() {
        return net(addr);
    }
    let p = &right["prefix"];
    net(&format!("{}/{}", p["addr"].as_str()?, p["len"].as_u64()?))
}

/// Per-namespace baselines and what moved recently.
pub struct Tracker {
    baselines: HashMap<u32, Snapshot>,
    looked: HashMap<u32, Instant>,
    /// What each look found, for `HISTORY`: a drop is explained by a rule whose counter
    /// moved recently, even when the look that saw it was taken for another drop.
    history: HashMap<u32, Vec<(Instant, Moved)>>,
    ct_history: HashMap<u32, Vec<(Instant, CtStats)>>,
    read: HashMap<u32, bool>,
    unread: HashMap<u32, Vec<(Store, String)>>,
}

/// The moment a time of the kernel's monotonic clock (a drop's `ts_ns`) stands for, as an
/// [`Instant`] (the same clock on Linux); `None` for 0 (no time) or a time not yet reached.
fn instant_of(mono_ns: u64) -> Option<Instant> {
    if mono_ns == 0 {
        return None;
    }
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    Instant::now().checked_sub(Duration::from_nanos(now_ns.checked_sub(mono_ns)?))
}

/// How often one namespace may be re-read while drops keep coming.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// How long a counter movement explains drops.
const HISTORY: Duration = Duration::from_secs(10);

impl Tracker {
    pub fn new() -> Self {
        Tracker {
            baselines: HashMap::new(),
            looked: HashMap::new(),
            history: HashMap::new(),
            ct_history: HashMap::new(),
            read: HashMap::new(),
            unread: HashMap::new(),
        }
    }

    /// Forgets a namespace that is gone (its inode may come back as another namespace).
    pub fn forget(&mut self, netns: u32) {
        self.baselines.remove(&netns);
        self.looked.remove(&netns);
        self.history.remove(&netns);
        self.ct_history.remove(&netns);
        self.read.remove(&netns);
        self.unread.remove(&netns);
    }

    /// Records the starting counters of each namespace (`None` path: dropscope's own).
    pub fn with_baselines(targets: &[(u32, Option<std::path::PathBuf>)]) -> Self {
        let mut t = Tracker::new();
        for (netns, path) in targets {
            let snap = Snapshot::take(path.as_deref());
            if !snap.is_empty() {
                t.baselines.insert(*netns, snap);
            }
        }
        t
    }

    /// What moved in `netns` in the last [`HISTORY`]: DROP/REJECT rules (most recent first)
    /// and conntrack's counters. The namespace is read again unless it was read within
    /// `MIN_INTERVAL` (one read per namespace per interval) and `fresh` does not ask for it
    /// (what was seen did not explain the drop).
    pub fn attribute(&mut self, netns: u32, path: Option<&Path>, fresh: bool) -> Attribution {
        let recently = self
            .looked
            .get(&netns)
            .is_some_and(|at| at.elapsed() < MIN_INTERVAL);
        if fresh || !recently {
            self.look(netns, path, fresh);
        }
        self.recent(netns, None)
    }

    /// What moved in `netns` with a drop at `dropped_ns` (the kernel's monotonic clock). A
    /// read that started after the drop has seen its counter move, so the namespace is read
    /// again unless such a read was already made (for another drop), or `fresh` asks for it;
    /// reads of an unchanged ruleset cost milliseconds (see [`Snapshot::reread`]), so there is
    /// no minimum interval here. Only movements seen by reads that ended after the drop can be
    /// its own (a read that started just before it may have reached the counter after it): a
    /// rule that moved for an earlier drop never explains a later one. Rules are listed from
    /// the earliest such read on. A drop without a time (0) is attributed as by
    /// [`Tracker::attribute`].
    pub fn attribute_after(
        &mut self,
        netns: u32,
        path: Option<&Path>,
        fresh: bool,
        dropped_ns: u64,
    ) -> Attribution {
        let Some(dropped) = instant_of(dropped_ns) else {
            return self.attribute(netns, path, fresh);
        };
        let seen = self.looked.get(&netns).is_some_and(|&at| at >= dropped);
        if fresh || !seen {
            self.look(netns, path, fresh);
        }
        self.recent(netns, Some(dropped))
    }

    /// Reads the namespace and adds what moved since the previous read to its history. Only
    /// what can hold a kept rule is read again while the nftables ruleset is unchanged (every
    /// iptables-legacy table when `fresh`: x_tables cannot tell that a rule was added);
    /// otherwise everything.
    fn look(&mut self, netns: u32, path: Option<&Path>, fresh: bool) {
        let before = self.baselines.remove(&netns).unwrap_or_default();
        // A counter that moved before this moment is seen by this read; one that moved before
        // it ends may be.
        let started = Instant::now();
        let (now, how) = match before.reread(path, fresh) {
            Some(now) => (now, "kept rules' chains and tables"),
            None => (Snapshot::take(path), "everything"),
        };
        tracing::debug!(
            "netns {netns}: firewall counters read ({how}) in {} ms, {} DROP/REJECT rules",
            started.elapsed().as_millis(),
            now.len()
        );
        let at = Instant::now();
        let history = self.history.entry(netns).or_default();
        history.extend(now.moved_since(&before).into_iter().map(|m| (at, m)));
        history.retain(|(t, _)| t.elapsed() < HISTORY);
        let ct = match (&now.ct, &before.ct) {
            (Some(n), Some(b)) => Some(n.since(b)),
            (n, _) => *n,
        };
        let cts = self.ct_history.entry(netns).or_default();
        if let Some(c) = ct {
            cts.push((at, c));
        }
        cts.retain(|(t, _)| t.elapsed() < HISTORY);
        self.read.insert(netns, now.read);
        self.unread.insert(netns, now.unread.clone());
        self.looked.insert(netns, started);
        self.baselines.insert(netns, now);
    }

    /// The rules that moved in the window, merged per rule: most recent first, or, `after` a
    /// drop, only those seen by reads that ended after it, earliest first. Conntrack's
    /// counters summed over the window, with the latest fill level.
    fn recent(&self, netns: u32, after: Option<Instant>) -> Attribution {
        let mut merged: Vec<(Instant, Moved)> = Vec::new();
        let entries = self.history.get(&netns).into_iter().flatten();
        for (at, m) in entries.filter(|(at, _)| after.is_none_or(|d| *at >= d)) {
            match merged.iter_mut().find(|(_, x)| x.rule == m.rule) {
                Some((t, x)) => {
                    x.packets += m.packets;
                    *t = if after.is_some() {
                        (*t).min(*at)
                    } else {
                        (*t).max(*at)
                    };
                }
                None => merged.push((*at, m.clone())),
            }
        }
        if after.is_some() {
            merged.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.packets.cmp(&a.1.packets)));
        } else {
            merged.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.packets.cmp(&a.1.packets)));
        }
        let ct = self.ct_history.get(&netns).and_then(|h| {
            h.iter().map(|(_, c)| *c).reduce(|a, b| CtStats {
                drop: a.drop + b.drop,
                insert_failed: a.insert_failed + b.insert_failed,
                invalid: a.invalid + b.invalid,
                ..b
            })
        });
        Attribution {
            moved: merged.into_iter().map(|(_, m)| m).collect(),
            ct,
            read: self.read.get(&netns).copied().unwrap_or(false),
            unread: self.unread.get(&netns).cloned().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [7:420]
:OUTPUT ACCEPT [0:0]
[2:120] -A FORWARD -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset
[3:90] -A FORWARD -p udp -m udp --dport 5353 -j REJECT
[9:900] -A FORWARD -p udp -j DROP
[1:60] -A FORWARD -j ACCEPT
COMMIT
";

    #[test]
    fn a_table_line_with_trailing_blanks_names_the_table() {
        // "*filter " named a table "filter " that no other reading calls so.
        let mut snap = Snapshot::default();
        let text = "*filter \r\n:FORWARD DROP [3:180]\r\nCOMMIT\r\n";
        assert_eq!(
            parse_iptables_save(text, "iptables-nft", &mut snap),
            vec!["filter"]
        );
        assert!(snap.rules.keys().all(|id| id.table == "filter"));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const NFT_SAVE: &str = include_str!("../../testdata/iptables-nft-save.txt");
        const NFT6_SAVE: &str = include_str!("../../testdata/ip6tables-nft-save.txt");
        const LEGACY_SAVE: &str = include_str!("../../testdata/iptables-legacy-save.txt");
        const NFT_JSON: &str = include_str!("../../testdata/nft.json");
        /// Words `nft -j` output and the parser use.
        const NFT_WORDS: &[&str] = &[
            "nftables",
            "rule",
            "family",
            "table",
            "chain",
            "handle",
            "comment",
            "expr",
            "counter",
            "packets",
            "bytes",
            "drop",
            "reject",
            "type",
            "tcp reset",
            "match",
            "op",
            "==",
            "in",
            "!=",
            "left",
            "right",
            "payload",
            "protocol",
            "field",
            "dport",
            "sport",
            "saddr",
            "daddr",
            "meta",
            "key",
            "l4proto",
            "iifname",
            "oifname",
            "ct",
            "state",
            "invalid",
            "set",
            "prefix",
            "addr",
            "len",
            "ip",
            "ip6",
            "inet",
            "tcp",
            "udp",
            "10.0.0.0",
            "fd00::",
            "10.1.2.3",
            "nexthdr",
        ];

        /// A rule as the snapshot keys it, whitespace aside: what a changed layout must keep.
        type Seen = Vec<(String, String, String, Target, Matcher, u64)>;
        fn seen(snap: &Snapshot) -> Seen {
            let mut v: Seen = snap
                .rules
                .iter()
                .map(|(id, c)| {
                    let text = id.text.split_whitespace().collect::<Vec<_>>().join(" ");
                    (
                        id.table.clone(),
                        id.chain.clone(),
                        text,
                        c.verdict.clone(),
                        c.matcher.clone(),
                        c.packets,
                    )
                })
                .collect();
            v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            v
        }

        /// `text` with counters from `counts`, extra spaces between words, comment and
        /// blank lines, and CRLF line ends where the flags say.
        fn relayout(text: &str, counts: &[u64], spaces: &[u8], crlf: bool) -> String {
            let mut out = String::new();
            let mut n = 0;
            for line in text.lines() {
                let mut line = line.to_string();
                if let Some(rest) = line.strip_prefix("[0:0]") {
                    line = format!(
                        "[{}:{}]{rest}",
                        counts[n % counts.len()],
                        counts[n % counts.len()] * 60
                    );
                } else if let Some(head) = line.strip_suffix("[0:0]") {
                    line = format!("{head}[{}:0]", counts[n % counts.len()]);
                }
                let pad = " ".repeat(usize::from(spaces[n % spaces.len()]));
                let line = line.replace(' ', &format!(" {pad}")) + &pad;
                out.push_str(&line);
                out.push_str(if crlf { "\r\n" } else { "\n" });
                if spaces[n % spaces.len()] % 3 == 0 {
                    out.push_str("# a comment [1:1] -j DROP\n\n");
                }
                n += 1;
            }
            out
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text()) {
                let mut snap = Snapshot::default();
                parse_iptables_save(&text, "iptables-nft", &mut snap);
                parse_nft_json(&text, &HashSet::new(), &mut snap);
                iptables_matcher(&text);
                snap.moved_since(&Snapshot::default());
            }

            #[test]
            fn prop_mutated_real_saves_never_panic(
                a in fuzz::mutated(NFT_SAVE),
                b in fuzz::mutated(NFT6_SAVE),
                c in fuzz::mutated(LEGACY_SAVE),
            ) {
                let mut snap = Snapshot::default();
                for text in [&a, &b, &c] {
                    parse_iptables_save(text, "iptables-legacy", &mut snap);
                    for line in text.lines() {
                        iptables_matcher(line);
                    }
                }
            }

            #[test]
            fn prop_rules_survive_counts_spacing_comments_and_line_ends(
                counts in prop::collection::vec(0u64..u64::MAX / 60, 1..8),
                spaces in prop::collection::vec(0u8..4, 1..8),
                crlf in any::<bool>(),
            ) {
                for (text, rules) in [(NFT_SAVE, 5), (NFT6_SAVE, 1), (LEGACY_SAVE, 2)] {
                    let mut plain = Snapshot::default();
                    let mut zero = Snapshot::default();
                    let tables = parse_iptables_save(text, "iptables-nft", &mut zero);
                    prop_assert_eq!(zero.rules.len(), rules);
                    parse_iptables_save(&relayout(text, &counts, &[0], false), "iptables-nft", &mut plain);
                    let mut changed = Snapshot::default();
                    let relaid = relayout(text, &counts, &spaces, crlf);
                    prop_assert_eq!(parse_iptables_save(&relaid, "iptables-nft", &mut changed), tables);
                    prop_assert_eq!(seen(&changed), seen(&plain));
                    // Every count is the one written.
                    for m in plain.moved_since(&Snapshot::default()) {
                        prop_assert!(counts.contains(&m.packets), "{:?}", m);
                    }
                }
            }

            #[test]
            fn prop_random_json_never_panics(
                a in fuzz::json(NFT_WORDS),
                b in fuzz::mutated_json(NFT_JSON, NFT_WORDS),
            ) {
                for v in [&a, &b, &serde_json::json!({"nftables": [{"rule": a.clone()}]})] {
                    let mut snap = Snapshot::default();
                    parse_nft_json(&v.to_string(), &HashSet::new(), &mut snap);
                    nft_matcher(std::slice::from_ref(v));
                    if let Some(exprs) = v.as_array() {
                        nft_matcher(exprs);
                    }
                }
            }

            #[test]
            fn prop_nft_rules_keep_their_counts_in_any_layout(
                counts in prop::collection::vec(any::<u64>(), 1..8),
                pretty in any::<bool>(),
            ) {
                let mut json: serde_json::Value = serde_json::from_str(NFT_JSON).unwrap();
                let mut n = 0;
                for item in json["nftables"].as_array_mut().unwrap() {
                    if let Some(c) = item.pointer_mut("/rule/expr").and_then(|e| e.as_array_mut()) {
                        for e in c.iter_mut().filter(|e| e.get("counter").is_some()) {
                            e["counter"]["packets"] = counts[n % counts.len()].into();
                            n += 1;
                        }
                    }
                }
                let text = if pretty { serde_json::to_string_pretty(&json) } else { serde_json::to_string(&json) }.unwrap();
                let mut snap = Snapshot::default();
                // The iptables-nft tables are read from iptables-nft-save, not from here.
                let skip = HashSet::from([("ip".to_string(), "filter".to_string()), ("ip6".to_string(), "filter".to_string())]);
                parse_nft_json(&text, &skip, &mut snap);
                let rules: Vec<&RuleId> = snap.rules.keys().collect();
                prop_assert_eq!(rules.len(), 4, "{:?}", rules);
                for c in snap.rules.values() {
                    prop_assert!(counts.contains(&c.packets));
                }
            }
        }
    }

    #[test]
    fn a_tool_that_cannot_run_says_why() {
        assert_eq!(
            each_line("dropscope-test-no-such-tool", &["-c"], |_| ()).unwrap_err(),
            "dropscope-test-no-such-tool not found"
        );
        let failed = each_line("sh", &["-c", "echo 'no table here' >&2; exit 3"], |_| ());
        assert_eq!(failed.unwrap_err(), "sh failed (exit status: 3): no table here");
        let mut lines = Vec::new();
        each_line("sh", &["-c", "echo ok"], |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["ok"]);
    }

    #[test]
    fn iptables_save_rules_and_policies() {
        let mut snap = Snapshot::default();
        assert_eq!(
            parse_iptables_save(SAVE, "iptables-nft", &mut snap),
            vec!["filter"]
        );
        assert_eq!(snap.rules.len(), 4, "ACCEPT rules are not tracked");
        let moved = snap.moved_since(&Snapshot::default());
        assert_eq!(moved[0].packets, 9);
        assert_eq!(moved[0].verdict, Target::Drop);
        let reset = moved.iter().find(|m| m.rule.text.contains("8080")).unwrap();
        assert_eq!(reset.verdict, Target::Reject("tcp-reset".into()));
        let icmp = moved.iter().find(|m| m.rule.text.contains("5353")).unwrap();
        assert_eq!(
            icmp.verdict,
            Target::Reject("icmp-port-unreachable".into())
        );
        let policy = moved.iter().find(|m| m.rule.text == "policy DROP").unwrap();
        assert_eq!((policy.rule.chain.as_str(), policy.packets), ("FORWARD", 7));
    }

    #[test]
    fn only_moved_counters_are_reported() {
        let mut before = Snapshot::default();
        parse_iptables_save(SAVE, "iptables-nft", &mut before);
        let mut after = Snapshot::default();
        parse_iptables_save(
            &SAVE.replace("[2:120]", "[4:240]"),
            "iptables-nft",
            &mut after,
        );
        let moved = after.moved_since(&before);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].packets, 2);
        assert!(moved[0]
            .rule
            .to_string()
            .starts_with("iptables-nft table filter chain FORWARD: -A FORWARD -p tcp"));
    }

    #[test]
    fn rules_that_cannot_match_the_packet_are_excluded() {
        let m =
            iptables_matcher("-A FORWARD -d 10.0.0.0/8 -i r0 -p udp -m udp --dport 9104 -j REJECT");
        let pkt = |dport| PacketFields {
            proto: Some(17),
            dport: Some(dport),
            dst: Some("10.1.2.3".parse().unwrap()),
            iif: Some("r0".into()),
            ..Default::default()
        };
        assert!(m.could_match(&pkt(9104)));
        assert!(!m.could_match(&pkt(9103)));
        assert!(!m.could_match(&PacketFields {
            proto: Some(6),
            ..pkt(9104)
        }));
        let negated = iptables_matcher("-A FORWARD ! -p udp -j DROP");
        assert_eq!(negated.proto, None, "negations are not reasoned about");
        assert_eq!(
            iptables_matcher("-A X -p tcp --dport 1000:2000 -j DROP").dport,
            Some((1000, 2000))
        );
        let exprs: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.231.2.2"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 9100}},
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "r0"}}]"#,
        )
        .unwrap();
        let m = nft_matcher(&exprs);
        assert_eq!(
            (m.proto, m.dport, m.iif.as_deref()),
            (Some(17), Some((9100, 9100)), Some("r0"))
        );
        let ct: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}]"#,
        )
        .unwrap();
        assert!(nft_matcher(&ct).ct_invalid);
        assert!(
            iptables_matcher("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP").ct_invalid
        );
        assert_eq!(m.dst, Some("10.231.2.2/32".parse().unwrap()));
    }

    #[test]
    fn a_drop_is_explained_by_a_move_seen_for_another_drop() {
        // Two rules move; the look taken for the first drop sees both. The second drop, of
        // the other rule, is still explained after a later look that saw nothing new.
        let mut t = Tracker::new();
        let mut before = Snapshot::default();
        parse_iptables_save(SAVE, "iptables-nft", &mut before);
        t.baselines.insert(1, before);
        let mut after = Snapshot::default();
        let moved = SAVE
            .replace("[2:120]", "[3:180]")
            .replace("[9:900]", "[10:1000]");
        parse_iptables_save(&moved, "iptables-nft", &mut after);
        // Stand in for Snapshot::take: record the look by hand.
        let at = Instant::now();
        let before = t.baselines.remove(&1).unwrap();
        t.history
            .entry(1)
            .or_default()
            .extend(after.moved_since(&before).into_iter().map(|m| (at, m)));
        t.baselines.insert(1, after.clone());
        t.history
            .entry(1)
            .or_default()
            .extend(after.moved_since(&after).into_iter().map(|m| (at, m)));
        let found = t.recent(1, None);
        assert_eq!(found.moved.len(), 2, "{found:?}");
        assert!(found
            .moved
            .iter()
            .any(|m| m.rule.text.contains("8080") && m.packets == 1));
    }

    #[test]
    fn nft_json_rules_with_counters() {
        let json = r#"{"nftables": [{"metainfo": {}},
          {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 3, "comment": "ds",
            "expr": [{"match": {}}, {"counter": {"packets": 5, "bytes": 300}}, {"drop": null}]}},
          {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 4,
            "expr": [{"counter": {"packets": 1, "bytes": 60}}, {"reject": {"type": "tcp reset"}}]}},
          {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 5, "expr": [{"drop": null}]}},
          {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 2,
            "expr": [{"counter": {"packets": 8, "bytes": 0}}, {"xt": {"type": "target", "name": "REJECT"}}]}}
        ]}"#;
        let mut snap = Snapshot::default();
        let skip = HashSet::from([("ip".to_string(), "filter".to_string())]);
        parse_nft_json(json, &skip, &mut snap);
        let moved = snap.moved_since(&Snapshot::default());
        assert_eq!(
            moved.len(),
            2,
            "rules without counters and iptables-nft tables are skipped: {moved:?}"
        );
        assert_eq!(
            moved[0].rule.to_string(),
            "nftables table inet drt chain fw: handle 3 comment \"ds\""
        );
        assert_eq!(moved[1].verdict, Target::Reject("tcp-reset".into()));
    }

    /// Timing of the reads of a namespace with a large ruleset, run by hand:
    /// `DROPSCOPE_RULES_NETNS=/run/netns/NAME cargo test -p dropscope rules_read_timing --
    /// --ignored --nocapture` (prints the times and this process's peak memory).
    #[test]
    #[ignore]
    fn rules_read_timing() {
        let Some(ns) = std::env::var_os("DROPSCOPE_RULES_NETNS") else {
            eprintln!("set DROPSCOPE_RULES_NETNS");
            return;
        };
        let path = std::path::PathBuf::from(ns);
        let hwm = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with("VmHWM"))
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        };
        let mut snap = Snapshot::default();
        for _ in 0..3 {
            let t = Instant::now();
            snap = Snapshot::take(Some(&path));
            println!(
                "take: {} ms, {} rules, read {}, netlink index {}, VmHWM {} kB",
                t.elapsed().as_millis(),
                snap.len(),
                snap.read,
                snap.nft.is_some(),
                hwm()
            );
        }
        for all_legacy in [false, false, false, true, true, true] {
            let t = Instant::now();
            let again = snap.reread(Some(&path), all_legacy);
            println!(
                "reread (all legacy tables: {all_legacy}): {} ms, {:?} rules, VmHWM {} kB",
                t.elapsed().as_millis(),
                again.as_ref().map(Snapshot::len),
                hwm()
            );
            assert_eq!(again.map(|a| a.len()), Some(snap.len()));
        }
    }

    /// A network namespace of a unit test, deleted afterwards. `None` unless root with the
    /// `ip` and `nft` tools (the unit tests may run anywhere; the netns ones only as root).
    struct TestNs(String);

    impl TestNs {
        fn new(tag: &str) -> Option<TestNs> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: not root");
                return None;
            }
            let name = format!("dsunit{}{tag}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(TestNs(name))
        }

        fn path(&self) -> std::path::PathBuf {
            format!("/run/netns/{}", self.0).into()
        }

        fn sh(&self, script: &str) -> String {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.0, "sh", "-ec", script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Native rules of every family and shape that dropscope reasons about.
    const NFT_RULESET: &str = r#"
table inet t {
  chain c { type filter hook forward priority 0;
    ip daddr 10.231.2.2 udp dport 9100 counter drop comment "a rule"
    counter reject
    ip protocol tcp counter reject with icmpx type admin-prohibited
    iifname "r0" oifname "r1" meta l4proto icmp counter drop
    iifname "eth*" counter drop
    ip6 daddr fd00:231::/32 tcp sport 443 counter reject with tcp reset
    ip saddr != 10.0.0.0/8 counter drop
    ip saddr { 1.2.3.4, 5.6.7.8 } counter drop
    ct state invalid counter drop
    udp dport 53 drop
    udp dport 54 counter accept
  }
}
table ip k {
  chain f { type filter hook input priority 0;
    counter reject
    counter reject with icmp type host-unreachable
    tcp dport 1000-2000 counter drop
    ct state { invalid, new } counter drop
    ip daddr 10.96.0.0/12 counter drop
    ip saddr 192.168.7.0/24 ip daddr 172.16.0.0/16 counter drop
  }
}
table ip6 x {
  chain f { type filter hook input priority 0;
    counter reject
    ip6 nexthdr udp ip6 saddr fd00:1::/64 counter reject with icmpv6 type admin-prohibited
  }
}
"#;

    /// The rules read over netlink are the ones nft's JSON shows, named and matched alike.
    #[test]
    fn netlink_reads_what_nft_json_says() {
        let Some(ns) = TestNs::new("nl") else { return };
        ns.sh(&format!("nft -f - <<'EOF'\n{NFT_RULESET}\nEOF"));
        ns.sh("iptables-nft -A FORWARD -p udp --dport 9 -j DROP");
        let snap = Snapshot::take(Some(&ns.path()));
        assert!(snap.read && snap.nft.is_some(), "{snap:?}");
        let mut json = Snapshot::default();
        let text = ns.sh("nft -j list ruleset");
        let skip = HashSet::from([("ip".to_string(), "filter".to_string())]);
        parse_nft_json(&text, &skip, &mut json);
        assert_eq!(json.rules.len(), 17, "{:#?}", json.rules.keys());
        for (id, want) in &json.rules {
            let got = snap
                .rules
                .get(id)
                .unwrap_or_else(|| panic!("{id} not read"));
            assert_eq!(
                (&got.verdict, &got.matcher, got.packets),
                (&want.verdict, &want.matcher, want.packets),
                "{id}"
            );
        }
        let ipt = snap.rules.keys().filter(|id| id.engine == "iptables-nft");
        assert_eq!(ipt.count(), 1);
        assert_eq!(snap.rules.len(), json.rules.len() + 1);
        // A few by hand, against what the rules say.
        let find = |text: &str| {
            let (id, c) = snap
                .rules
                .iter()
                .find(|(id, _)| id.text.contains(text))
                .unwrap();
            (id.clone(), c.clone())
        };
        let (id, c) = find("comment \"a rule\"");
        assert_eq!((id.table.as_str(), id.chain.as_str()), ("inet t", "c"));
        assert_eq!(c.matcher.dst, Some("10.231.2.2/32".parse().unwrap()));
        assert_eq!(
            (c.matcher.proto, c.matcher.dport),
            (Some(17), Some((9100, 9100)))
        );
        let m =
            |f: &dyn Fn(&Matcher) -> bool| snap.rules.values().filter(|c| f(&c.matcher)).count();
        assert_eq!(m(&|m| m.dport == Some((1000, 2000))), 1);
        assert_eq!(m(&|m| m.dst == Some("10.96.0.0/12".parse().unwrap())), 1);
        assert_eq!(m(&|m| m.src == Some("fd00:1::/64".parse().unwrap())), 1);
        assert_eq!(m(&|m| m.ct_invalid), 2);
        assert_eq!(
            m(&|m| m.iif.as_deref() == Some("r0") && m.oif.as_deref() == Some("r1")),
            1
        );
        assert_eq!(m(&|m| m.iif.is_some()), 1, "a wildcard is no interface");
    }

    /// A re-read follows the counters of the chains with kept rules, and gives up (for a full
    /// read) once the ruleset changed.
    #[test]
    fn reread_follows_counters_until_the_ruleset_changes() {
        let Some(ns) = TestNs::new("rr") else { return };
        ns.sh("ip link set lo up; nft add table inet t; nft add chain inet t c '{ type filter hook output priority 0; }'; \
               nft add rule inet t c udp dport 9 counter drop comment '\"nine\"'; \
               iptables-nft -A OUTPUT -p udp --dport 10 -j REJECT; \
               iptables-nft -P FORWARD DROP; \
               iptables-legacy -A OUTPUT -p udp --dport 11 -j DROP");
        let before = Snapshot::take(Some(&ns.path()));
        assert_eq!(before.len(), 4, "{:#?}", before.rules.keys());
        for port in [9, 10, 11, 9] {
            let _ = ns.sh(&format!(
                "bash -c 'echo x > /dev/udp/127.0.0.1/{port}' || true"
            ));
        }
        let after = before
            .reread(Some(&ns.path()), false)
            .expect("a targeted read");
        let moved = after.moved_since(&before);
        let by = |t: &str| {
            moved
                .iter()
                .find(|m| m.rule.text.contains(t))
                .map(|m| m.packets)
        };
        assert_eq!(by("nine"), Some(2), "{moved:#?}");
        assert_eq!(by("--dport 10"), Some(1), "{moved:#?}");
        assert_eq!(by("--dport 11"), Some(1), "{moved:#?}");
        assert_eq!(moved.len(), 3);
        ns.sh("nft add rule inet t c udp dport 12 counter drop");
        assert!(after.reread(Some(&ns.path()), false).is_none());
        assert_eq!(Snapshot::take(Some(&ns.path())).len(), 5);
    }

    const KP_FILTER: &str = include_str!("rules/testdata/kube-proxy-filter.save");
    const KP_NAT: &str = include_str!("rules/testdata/kube-proxy-nat.save");
    const KP_NFT: &str = include_str!("rules/testdata/kube-proxy-nft.json");
    const NFT_SAMPLE: &str = r#"{"nftables": [{"metainfo": {}},
      {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 3, "comment": "ds",
        "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"counter": {"packets": 5, "bytes": 300}}, {"drop": null}]}},
      {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 4,
        "expr": [{"counter": {"packets": 1, "bytes": 60}}, {"reject": {"type": "tcp reset"}}]}},
      {"rule": {"family": "inet", "table": "drt", "chain": "fw", "handle": 5, "expr": [{"drop": null}]}},
      {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 2,
        "expr": [{"counter": {"packets": 8, "bytes": 0}}, {"xt": {"type": "target", "name": "REJECT"}}]}}
    ]}"#;

    fn same(new: &HashMap<RuleId, Counted>, old: &old_parsers::Rules, what: &str) {
        let mut a: Vec<_> = new.keys().collect();
        let mut b: Vec<_> = old.keys().collect();
        a.sort_by_key(|id| id.to_string());
        b.sort_by_key(|id| id.to_string());
        assert_eq!(a, b, "{what}: the same rules");
        for (id, n) in new {
            let o = &old[id];
            assert_eq!(
                (&n.verdict, &n.matcher, n.packets),
                (&o.verdict, &o.matcher, o.packets),
                "{what}: {id}"
            );
        }
    }

    fn save_both(text: &str, engine: &'static str) -> (Snapshot, old_parsers::Rules) {
        let mut new = Snapshot::default();
        let tables = parse_iptables_save(text, engine, &mut new);
        let mut old = HashMap::new();
        assert_eq!(
            tables,
            old_parsers::parse_iptables_save(text, engine, &mut old)
        );
        (new, old)
    }

    fn json_both(text: &str, skip: &HashSet<(String, String)>) -> (Snapshot, old_parsers::Rules) {
        let mut new = Snapshot::default();
        parse_nft_json(text, skip, &mut new);
        let mut old = HashMap::new();
        old_parsers::parse_nft_json(text, skip, &mut old);
        (new, old)
    }

    #[test]
    fn streaming_save_reader_agrees_with_the_old_parser() {
        for (text, engine, kept) in [
            (SAVE, "iptables-nft", 4),
            (KP_FILTER, "iptables-nft", 12),
            (KP_NAT, "iptables-legacy", 0),
        ] {
            let (new, old) = save_both(text, engine);
            same(&new.rules, &old, engine);
            assert_eq!(new.len(), kept);
        }
        let (snap, _) = save_both(KP_FILTER, "iptables-nft");
        let (id, c) = snap
            .rules
            .iter()
            .find(|(id, _)| id.text.contains("svc1257:http has no endpoints"))
            .unwrap();
        assert_eq!(
            id.to_string(),
            "iptables-nft table filter chain KUBE-SERVICES: -A KUBE-SERVICES -d 10.96.5.8/32 -p tcp \
             -m comment --comment \"ns17/svc1257:http has no endpoints\" -m tcp --dport 80 -j REJECT \
             --reject-with icmp-port-unreachable"
        );
        assert_eq!(c.verdict, Target::Reject("icmp-port-unreachable".into()));
        assert_eq!(
            (c.packets, c.matcher.proto, c.matcher.dport),
            (2, Some(6), Some((80, 80)))
        );
        let (_, c) = snap
            .rules
            .iter()
            .find(|(id, _)| id.chain == "KUBE-FORWARD")
            .unwrap();
        assert!(c.matcher.ct_invalid && c.packets == 7 && c.verdict == Target::Drop);
    }

    #[test]
    fn a_comment_is_no_option_and_the_target_is_the_last() {
        let line =
            "[4:240] -A X -p tcp -m comment --comment \"was: -p udp --dport 9 -j DROP\" -j ACCEPT";
        let mut snap = Snapshot::default();
        parse_iptables_save(
            &format!("*filter\n{line}\nCOMMIT\n"),
            "iptables-nft",
            &mut snap,
        );
        assert!(snap.rules.is_empty(), "an ACCEPT rule: {snap:?}");
        let m = iptables_matcher(
            "-A X -p tcp -m comment --comment \"not -p udp --dport 9\" --dport 80 -j DROP",
        );
        assert_eq!((m.proto, m.dport), (Some(6), Some((80, 80))));
    }

    #[test]
    fn streaming_nft_json_reader_agrees_with_the_old_parser() {
        let none = HashSet::new();
        let ipt = HashSet::from([("ip".to_string(), "filter".to_string())]);
        for (text, skip, kept) in [
            (NFT_SAMPLE, &none, 2),
            (NFT_SAMPLE, &ipt, 2),
            (KP_NFT, &none, 4),
        ] {
            let (new, old) = json_both(text, skip);
            same(&new.rules, &old, "nft json");
            assert_eq!(new.len(), kept, "{:#?}", new.rules.keys());
        }
        // kube-proxy's nftables mode: the counted firewall drop and the ClusterIP rules.
        let (snap, _) = json_both(KP_NFT, &none);
        let names: Vec<String> = snap.rules.keys().map(|id| id.to_string()).collect();
        assert!(
            names.iter().any(|n| n.starts_with(
                "nftables table ip kube-proxy chain firewall-OPXO4WWF-ns3/svc3/tcp/http: handle "
            ) && n.ends_with("comment \"ns3/svc3:http source ranges\"")),
            "{names:#?}"
        );
        let drop_unallocated = snap
            .rules
            .iter()
            .find(|(id, _)| id.text.contains("unallocated"))
            .unwrap();
        assert_eq!(
            drop_unallocated.1.matcher.dst,
            Some("10.104.0.0/16".parse().unwrap())
        );
    }

    /// A small deterministic generator (xorshift) for the robustness tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// `text` damaged the way a truncated, interleaved or corrupted output could be.
    fn mangle(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
        const BITS: [&[u8]; 14] = [
            b"[",
            b"]",
            b":",
            b"*",
            b"\"",
            b" -j ",
            b"REJECT",
            b"DROP",
            b"{",
            b"}",
            b",",
            b"\n",
            b"\xff\xfe",
            b"--reject-with ",
        ];
        let mut out = text.to_vec();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(out.len() + 1);
            match rng.below(4) {
                0 => out.truncate(at),
                1 => {
                    let bit = BITS[rng.below(BITS.len())];
                    out.splice(at..at, bit.iter().copied());
                }
                2 => {
                    let end = (at + rng.below(40)).min(out.len());
                    out.drain(at..end);
                }
                _ => {
                    if let Some(b) = out.get_mut(at) {
                        *b = rng.next() as u8;
                    }
                }
            }
        }
        out
    }

    /// Garbage never panics a reader; damaged nft JSON that is still JSON reads as the old
    /// parser read it.
    #[test]
    fn damaged_outputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let saves = [SAVE, KP_FILTER, KP_NAT];
        let jsons = [NFT_SAMPLE, KP_NFT];
        let skip = HashSet::from([("ip".to_string(), "filter".to_string())]);
        for _ in 0..3000 {
            let pick = saves[rng.below(saves.len())];
            let text = mangle(&mut rng, pick.as_bytes());
            let mut parser = SaveParser::new("iptables-nft");
            for line in text.split(|&b| b == b'\n') {
                let _ = parser.line(&String::from_utf8_lossy(line));
            }
            let pick = jsons[rng.below(jsons.len())];
            let text = mangle(&mut rng, pick.as_bytes());
            let mut new = Vec::new();
            let streamed = nft_json::read(&text[..], &skip, &mut |id, c| new.push((id, c)));
            if let Ok(valid) = std::str::from_utf8(&text) {
                if serde_json::from_str::<serde_json::Value>(valid).is_ok() {
                    assert!(streamed.is_ok(), "{valid}");
                    let (new, old) = json_both(valid, &skip);
                    same(&new.rules, &old, valid);
                }
            }
        }
    }

    /// A netlink attribute (value padded to 4 bytes).
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn expr(name: &str, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        nla(1, &[nla(1, &n), nla(2, &attrs.concat())].concat())
    }

    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn data(v: &[u8]) -> Vec<u8> {
        nla(1, v)
    }

    /// An NFT_MSG_NEWRULE body: ip t c handle 7 "ip daddr 10.1.2.0/24 tcp dport 8080 counter
    /// packets 42 drop comment "x"", as the kernel sends it.
    fn rule_message() -> Vec<u8> {
        let exprs = [
            expr(
                "payload",
                &[
                    nla(1, &be(1)),
                    nla(2, &be(1)),
                    nla(3, &be(16)),
                    nla(4, &be(3)),
                ],
            ),
            expr(
                "cmp",
                &[nla(1, &be(1)), nla(2, &be(0)), nla(3, &data(&[10, 1, 2]))],
            ),
            expr("meta", &[nla(2, &be(16)), nla(1, &be(1))]),
            expr(
                "cmp",
                &[nla(1, &be(1)), nla(2, &be(0)), nla(3, &data(&[6]))],
            ),
            expr(
                "payload",
                &[
                    nla(1, &be(1)),
                    nla(2, &be(2)),
                    nla(3, &be(2)),
                    nla(4, &be(2)),
                ],
            ),
            expr(
                "cmp",
                &[
                    nla(1, &be(1)),
                    nla(2, &be(0)),
                    nla(3, &data(&8080u16.to_be_bytes())),
                ],
            ),
            expr(
                "counter",
                &[nla(1, &900u64.to_be_bytes()), nla(2, &42u64.to_be_bytes())],
            ),
            expr(
                "immediate",
                &[nla(1, &be(0)), nla(2, &nla(2, &nla(1, &be(0))))],
            ),
        ]
        .concat();
        let mut body = vec![2, 0, 0, 0];
        body.extend(nla(1, b"t\0"));
        body.extend(nla(2, b"c\0"));
        body.extend(nla(3, &7u64.to_be_bytes()));
        body.extend(nla(4, &exprs));
        body.extend(nla(7, &[0, 2, b'x', 0]));
        body
    }

    #[test]
    fn netlink_rule_messages_decode_and_damaged_ones_never_panic() {
        let body = rule_message();
        let rule = nft_netlink::parse_rule(&body).unwrap();
        let (id, c, ct_set) = rule.decode().unwrap();
        assert_eq!(
            id.to_string(),
            "nftables table ip t chain c: handle 7 comment \"x\""
        );
        assert_eq!(
            (c.verdict.clone(), c.packets, ct_set),
            (Target::Drop, 42, None)
        );
        assert_eq!(c.matcher.dst, Some("10.1.2.0/24".parse().unwrap()));
        assert_eq!(
            (c.matcher.proto, c.matcher.dport),
            (Some(6), Some((8080, 8080)))
        );
        let mut rng = Rng(42);
        for _ in 0..5000 {
            let damaged = mangle(&mut rng, &body);
            if let Some(r) = nft_netlink::parse_rule(&damaged) {
                let _ = (r.decode(), r.packets(), r.comment());
            }
            let mut noise = vec![0u8; rng.below(200)];
            noise.iter_mut().for_each(|b| *b = rng.next() as u8);
            if let Some(r) = nft_netlink::parse_rule(&noise) {
                let _ = (r.decode(), r.packets(), r.comment());
            }
        }
    }

    /// A drop is explained by what reads after it saw, the earliest first; what moved before
    /// it (for another drop) never explains it.
    #[test]
    fn only_reads_after_a_drop_explain_it() {
        let mut t = Tracker::new();
        let moved = |text: &str| Moved {
            rule: RuleId {
                engine: "iptables-nft",
                table: "filter".into(),
                chain: "X".into(),
                text: text.into(),
            },
            verdict: Target::Drop,
            matcher: Matcher::default(),
            packets: 1,
        };
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        let t2 = t0 + Duration::from_millis(20);
        t.history.insert(
            1,
            vec![
                (t0, moved("invalid")),
                (t2, moved("firewall")),
                (t2 + Duration::from_millis(5), moved("later")),
            ],
        );
        let texts =
            |a: Attribution| -> Vec<String> { a.moved.into_iter().map(|m| m.rule.text).collect() };
        assert_eq!(texts(t.recent(1, Some(t1))), ["firewall", "later"]);
        assert_eq!(
            texts(t.recent(1, Some(t0))),
            ["invalid", "firewall", "later"]
        );
        assert_eq!(texts(t.recent(1, None)), ["later", "firewall", "invalid"]);
    }
}
