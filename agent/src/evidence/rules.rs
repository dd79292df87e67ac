//! Naming the firewall rule behind a netfilter drop, by its packet counters.
//!
//! At start-up dropscope snapshots the per-rule counters of both engines (iptables-legacy and
//! nftables, including iptables-nft) in every namespace with rules. When a netfilter drop
//! appears, the namespace is snapshotted again: the DROP/REJECT rules whose counters moved are
//! the ones that dropped it. Read-only: the ruleset is never modified.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use std::net::IpAddr;

use super::{conntrack::CtStats, netns::run_in};

/// A terminal verdict a rule (or chain policy) can give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
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
    pub verdict: Verdict,
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
    pub fn of(d: &crate::events::Drop) -> Self {
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
    verdict: Verdict,
    matcher: Matcher,
    packets: u64,
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

impl Snapshot {
    /// Reads all engines inside the namespace at `ns` (`None`: dropscope's own).
    pub fn take(ns: Option<&Path>) -> Self {
        let read = move || {
            let mut snap = Snapshot {
                ct: CtStats::read(),
                ..Default::default()
            };
            let mut seen_tables = HashSet::new();
            let mut read_any = false;
            let mut nf_failed = Vec::new();
            for (tool, engine, family) in [
                ("iptables-nft-save", "iptables-nft", "ip"),
                ("ip6tables-nft-save", "ip6tables-nft", "ip6"),
            ] {
                match output(tool, &["-c"]) {
                    Ok(text) => {
                        read_any = true;
                        for table in parse_iptables_save(&text, engine, &mut snap) {
                            seen_tables.insert((family.to_string(), table));
                        }
                    }
                    Err(why) => nf_failed.push(why),
                }
            }
            match output("nft", &["-j", "list", "ruleset"]) {
                Ok(text) => {
                    read_any = true;
                    parse_nft_json(&text, &seen_tables, &mut snap);
                }
                // nft alone lists every nf_tables rule; without it, native nftables rules
                // (and whatever the iptables-nft tools could not list) are unseen.
                Err(why) => {
                    nf_failed.insert(0, why);
                    snap.unread
                        .extend(nf_failed.into_iter().map(|w| (Store::NfTables, w)));
                }
            }
            for (names, tool, engine) in [
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
            ] {
                // Only ask x_tables when it has tables here (asking could load modules).
                if std::fs::read_to_string(names).is_ok_and(|t| !t.trim().is_empty()) {
                    match output(tool, &["-c"]) {
                        Ok(text) => {
                            parse_iptables_save(&text, engine, &mut snap);
                        }
                        // x_tables has tables here but they could not be read.
                        Err(why) => {
                            read_any = false;
                            snap.unread.push((Store::XTables, why));
                        }
                    }
                }
            }
            snap.read = read_any;
            snap
        };
        match ns {
            Some(path) => run_in(path, read).unwrap_or_default(),
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
}

/// A tool's output, or why there is none ("nft not found", "nft failed: ...").
fn output(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{tool} not found"),
            _ => format!("{tool} could not run: {e}"),
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(format!("{tool} failed ({}): {}", out.status, why.trim())
        .trim_end_matches([':', ' '])
        .to_string())
}

/// Parses `iptables-save -c` into `snap`; returns the tables it listed.
pub fn parse_iptables_save(text: &str, engine: &'static str, snap: &mut Snapshot) -> Vec<String> {
    let mut tables = Vec::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            tables.push(table.clone());
        } else if let Some(policy) = line.strip_prefix(':') {
            // ":FORWARD DROP [5:300]"
            let mut it = policy.split_whitespace();
            let (Some(chain), Some(target), Some(counts)) = (it.next(), it.next(), it.next())
            else {
                continue;
            };
            if let (Some(verdict), Some(packets)) =
                (verdict_of_target(target, ""), packets_of(counts))
            {
                let id = RuleId {
                    engine,
                    table: table.clone(),
                    chain: chain.into(),
                    text: format!("policy {target}"),
                };
                snap.rules.insert(
                    id,
                    Counted {
                        verdict,
                        matcher: Matcher::default(),
                        packets,
                    },
                );
            }
        } else if line.starts_with('[') {
            // "[2:120] -A FORWARD -p tcp ... -j REJECT --reject-with tcp-reset"
            let Some((counts, rule)) = line.split_once(' ') else {
                continue;
            };
            let chain = rule.split_whitespace().nth(1).unwrap_or("").to_string();
            let target = rule
                .split(" -j ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("");
            let with = rule
                .split("--reject-with ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("");
            if let (Some(verdict), Some(packets)) =
                (verdict_of_target(target, with), packets_of(counts))
            {
                let id = RuleId {
                    engine,
                    table: table.clone(),
                    chain,
                    text: rule.to_string(),
                };
                snap.rules.insert(
                    id,
                    Counted {
                        verdict,
                        matcher: iptables_matcher(rule),
                        packets,
                    },
                );
            }
        }
    }
    tables
}

fn verdict_of_target(target: &str, with: &str) -> Option<Verdict> {
    match target {
        "DROP" => Some(Verdict::Drop),
        "REJECT" => Some(Verdict::Reject(if with.is_empty() {
            "icmp-port-unreachable".into()
        } else {
            with.into()
        })),
        _ => None,
    }
}

fn packets_of(counts: &str) -> Option<u64> {
    counts
        .trim_start_matches('[')
        .split(':')
        .next()?
        .parse()
        .ok()
}

/// Parses `nft -j list ruleset` into `snap`, skipping tables already read through iptables-nft.
pub fn parse_nft_json(text: &str, skip: &HashSet<(String, String)>, snap: &mut Snapshot) {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    for item in json["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let (Some(family), Some(table), Some(chain)) = (
            rule["family"].as_str(),
            rule["table"].as_str(),
            rule["chain"].as_str(),
        ) else {
            continue;
        };
        if skip.contains(&(family.to_string(), table.to_string())) {
            continue;
        }
        let exprs = rule["expr"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let packets = exprs.iter().find_map(|e| e["counter"]["packets"].as_u64());
        let verdict = exprs.iter().find_map(|e| {
            if e.get("drop").is_some() {
                Some(Verdict::Drop)
            } else if let Some(r) = e.get("reject") {
                let with = match (r["type"].as_str(), r["expr"].as_str()) {
                    (Some("tcp reset"), _) => "tcp-reset".to_string(),
                    (_, Some(code)) => code.to_string(),
                    _ => "icmp-port-unreachable".to_string(),
                };
                Some(Verdict::Reject(with))
            } else {
                None
            }
        });
        if let (Some(verdict), Some(packets)) = (verdict, packets) {
            let handle = rule["handle"].as_u64().unwrap_or(0);
            let comment = rule["comment"]
                .as_str()
                .map(|c| format!(" comment \"{c}\""))
                .unwrap_or_default();
            let id = RuleId {
                engine: "nftables",
                table: format!("{family} {table}"),
                chain: chain.to_string(),
                text: format!("handle {handle}{comment}"),
            };
            snap.rules.insert(
                id,
                Counted {
                    verdict,
                    matcher: nft_matcher(exprs),
                    packets,
                },
            );
        }
    }
}

/// Simple match fields of an `iptables-save` rule line.
pub fn iptables_matcher(rule: &str) -> Matcher {
    let mut m = Matcher::default();
    let tokens: Vec<&str> = rule.split_whitespace().collect();
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

/// Simple match fields of an nftables rule's JSON expressions.
pub fn nft_matcher(exprs: &[serde_json::Value]) -> Matcher {
    let mut m = Matcher::default();
    for e in exprs {
        let mt = &e["match"];
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
                m.dport = right.as_u64().map(|p| (p as u16, p as u16));
            }
            (Some(proto), Some("sport"), _) => {
                m.proto = proto_number(proto);
                m.sport = right.as_u64().map(|p| (p as u16, p as u16));
            }
            (Some(_), Some("saddr"), _) => m.src = nft_net(right),
            (Some(_), Some("daddr"), _) => m.dst = nft_net(right),
            (Some("ip" | "ip6"), Some("protocol" | "nexthdr"), _) | (_, _, Some("l4proto")) => {
                m.proto = right.as_str().and_then(proto_number)
            }
            (_, _, Some("iifname")) => m.iif = right.as_str().map(str::to_string),
            (_, _, Some("oifname")) => m.oif = right.as_str().map(str::to_string),
            _ => {}
        }
    }
    m
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

    /// Forgets a namespace that is gone (its inode may come back as another namespace).
    pub fn forget(&mut self, netns: u32) {
        self.baselines.remove(&netns);
        self.looked.remove(&netns);
        self.history.remove(&netns);
        self.ct_history.remove(&netns);
        self.read.remove(&netns);
        self.unread.remove(&netns);
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
            self.look(netns, path);
        }
        self.recent(netns)
    }

    /// Reads the namespace and adds what moved since the previous read to its history.
    fn look(&mut self, netns: u32, path: Option<&Path>) {
        let now = Snapshot::take(path);
        let at = Instant::now();
        let before = self.baselines.remove(&netns).unwrap_or_default();
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
        self.looked.insert(netns, at);
        self.baselines.insert(netns, now);
    }

    /// The rules that moved in the window, merged per rule, most recent first; conntrack's
    /// counters summed over the window, with the latest fill level.
    fn recent(&self, netns: u32) -> Attribution {
        let mut merged: Vec<(Instant, Moved)> = Vec::new();
        for (at, m) in self.history.get(&netns).into_iter().flatten() {
            match merged.iter_mut().find(|(_, x)| x.rule == m.rule) {
                Some((t, x)) => {
                    x.packets += m.packets;
                    *t = (*t).max(*at);
                }
                None => merged.push((*at, m.clone())),
            }
        }
        merged.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.packets.cmp(&a.1.packets)));
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
    fn a_tool_that_cannot_run_says_why() {
        assert_eq!(
            output("dropscope-test-no-such-tool", &["-c"]).unwrap_err(),
            "dropscope-test-no-such-tool not found"
        );
        let failed = output("sh", &["-c", "echo 'no table here' >&2; exit 3"]).unwrap_err();
        assert_eq!(failed, "sh failed (exit status: 3): no table here");
        assert_eq!(output("sh", &["-c", "echo ok"]).unwrap(), "ok\n");
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
        assert_eq!(moved[0].verdict, Verdict::Drop);
        let reset = moved.iter().find(|m| m.rule.text.contains("8080")).unwrap();
        assert_eq!(reset.verdict, Verdict::Reject("tcp-reset".into()));
        let icmp = moved.iter().find(|m| m.rule.text.contains("5353")).unwrap();
        assert_eq!(
            icmp.verdict,
            Verdict::Reject("icmp-port-unreachable".into())
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
        let found = t.recent(1);
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
        assert_eq!(moved[1].verdict, Verdict::Reject("tcp-reset".into()));
    }

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
        type Seen = Vec<(String, String, String, Verdict, Matcher, u64)>;
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
}
