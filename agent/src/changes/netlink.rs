//! Netlink monitors of one network namespace: rtnetlink (device IP configuration, links,
//! routes, addresses) and nftables (committed generations, with the committing process).
//! The sockets are opened inside the namespace and then read from dropscope's own thread.
use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
};

use anyhow::{Context, Result};
use netlink_packet_core::{NlaBuffer, NlasIterator, NLMSG_DONE, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::{protocols, Socket, SocketAddr};

use super::{process::Process, Change, ChangeKind};
use crate::{evidence::rules::nft_family_name, netns::in_namespace};

// rtnetlink message types and multicast groups (uapi linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNETCONF: u16 = 80;
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV4_NETCONF: u32 = 24;
const RTNLGRP_IPV6_NETCONF: u32 = 25;
// nftables (uapi linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWGEN: u16 = 15;
/// Items of one nftables commit described in its change, at most.
const SHOWN: usize = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The monitors of one namespace and what they know of its current state.
pub struct NsMonitor {
    pub netns: u32,
    /// How to enter it (`None`: dropscope's own), for the rule text of nftables changes.
    path: Option<PathBuf>,
    rtnl: Socket,
    nft: Option<Socket>,
    /// ifindex -> (name, mtu, up).
    links: HashMap<u32, (String, u32, bool)>,
    /// Device IP settings as sysctl names: "net.ipv4.conf.r0.forwarding" -> "1".
    conf: HashMap<String, String>,
    /// nftables objects changed in the generation being committed.
    /// The first [`SHOWN`] items of the commit under way, and how many more it has.
    batch: Vec<Item>,
    batch_more: usize,
    batch_tables: BTreeSet<String>,
}

impl NsMonitor {
    /// Opens the sockets inside the namespace at `path` and reads its starting state.
    pub fn open(netns: u32, path: Option<PathBuf>) -> Result<NsMonitor> {
        let p = path.clone();
        let (rtnl, nft, conf) = in_namespace(p.as_deref(), || -> Result<_> {
            let mut rtnl = Socket::new(protocols::NETLINK_ROUTE).context("rtnetlink socket")?;
            let groups = [
                RTNLGRP_LINK,
                RTNLGRP_IPV4_IFADDR,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_IFADDR,
                RTNLGRP_IPV6_ROUTE,
                RTNLGRP_IPV4_NETCONF,
                RTNLGRP_IPV6_NETCONF,
            ]
            .iter()
            .fold(0u32, |m, g| m | (1 << (g - 1)));
            rtnl.bind(&SocketAddr::new(0, groups))
                .context("binding rtnetlink")?;
            // nftables may be absent (no nf_tables in this kernel): rtnetlink still runs.
            let nft = Socket::new(protocols::NETLINK_NETFILTER)
                .and_then(|mut s| {
                    s.bind(&SocketAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)))?;
                    Ok(s)
                })
                .ok();
            Ok((rtnl, nft, read_conf()))
        })
        .context("cannot enter the namespace")??;
        let mut m = NsMonitor {
            netns,
            path,
            rtnl,
            nft,
            links: HashMap::new(),
            conf,
            batch: Vec::new(),
            batch_more: 0,
            batch_tables: BTreeSet::new(),
        };
        m.dump_links()?;
        m.rtnl.set_non_blocking(true)?;
        if let Some(s) = &m.nft {
            s.set_non_blocking(true)?;
        }
        Ok(m)
    }

    /// The file descriptors to poll.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.rtnl.as_raw_fd()];
        fds.extend(self.nft.as_ref().map(|s| s.as_raw_fd()));
        fds
    }

    /// Reads every pending message; `now_ns` stamps the changes.
    pub fn read(&mut self, now_ns: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Ok((buf, _)) = self.rtnl.recv_from_full() {
            if buf.is_empty() {
                break;
            }
            for (ty, payload) in messages(&buf) {
                changes.extend(self.on_rtnl(ty, payload, now_ns));
            }
        }
        loop {
            let Some(nft) = &self.nft else { break };
            let Ok((buf, _)) = nft.recv_from_full() else {
                break;
            };
            if buf.is_empty() {
                break;
            }
            for (ty, payload) in messages(&buf) {
                changes.extend(self.on_nft(ty, payload, now_ns));
            }
        }
        changes
    }

    /// Learns the links (name, MTU, state) with one dump.
    fn dump_links(&mut self) -> Result<()> {
        let mut req = Vec::with_capacity(32);
        req.extend_from_slice(&32u32.to_ne_bytes());
        req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&1u32.to_ne_bytes()); // seq
        req.extend_from_slice(&0u32.to_ne_bytes()); // pid
        req.extend_from_slice(&[0u8; 16]); // struct ifinfomsg, AF_UNSPEC
        self.rtnl
            .send_to(&req, &SocketAddr::new(0, 0), 0)
            .context("asking for the links")?;
        loop {
            let (buf, _) = self.rtnl.recv_from_full()?;
            let mut done = buf.is_empty();
            for (ty, payload) in messages(&buf) {
                match ty {
                    RTM_NEWLINK => {
                        if let Some((idx, name, mtu, up)) = parse_link(payload) {
                            self.links.insert(idx, (name, mtu, up));
                        }
                    }
                    NLMSG_DONE => done = true,
                    _ => {}
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    fn change(
        &self,
        now_ns: u64,
        kind: ChangeKind,
        key: String,
        old: Option<String>,
        new: Option<String>,
        detail: Option<String>,
    ) -> Change {
        Change {
            ts_ns: now_ns,
            netns: self.netns,
            kind,
            key,
            old,
            new,
            detail,
            echoes: Vec::new(),
            process: None,
        }
    }

    fn on_rtnl(&mut self, ty: u16, p: &[u8], now_ns: u64) -> Vec<Change> {
        let mut out = Vec::new();
        match ty {
            RTM_NEWLINK => {
                let Some((idx, name, mtu, up)) = parse_link(p) else {
                    return out;
                };
                match self.links.insert(idx, (name.clone(), mtu, up)) {
                    None => out.push(self.change(
                        now_ns,
                        ChangeKind::Link,
                        format!("link.{name}"),
                        None,
                        None,
                        Some(format!("added (MTU {mtu})")),
                    )),
                    Some((_, old_mtu, old_up)) => {
                        if old_mtu != mtu {
                            out.push(self.change(
                                now_ns,
                                ChangeKind::Link,
                                format!("link.{name}.mtu"),
                                Some(old_mtu.to_string()),
                                Some(mtu.to_string()),
                                None,
                            ));
                        }
                        if old_up != up {
                            let s = |u: bool| if u { "up" } else { "down" }.to_string();
                            out.push(self.change(
                                now_ns,
                                ChangeKind::Link,
                                format!("link.{name}.state"),
                                Some(s(old_up)),
                                Some(s(up)),
                                None,
                            ));
                        }
                    }
                }
            }
            RTM_DELLINK => {
                if let Some((idx, name, ..)) = parse_link(p) {
                    self.links.remove(&idx);
                    out.push(self.change(
                        now_ns,
                        ChangeKind::Link,
                        format!("link.{name}"),
                        None,
                        None,
                        Some("removed".into()),
                    ));
                }
            }
            RTM_NEWROUTE | RTM_DELROUTE => {
                if let Some((table, text)) = parse_route(p, &self.links) {
                    let verb = if ty == RTM_NEWROUTE {
                        "added"
                    } else {
                        "removed"
                    };
                    out.push(self.change(
                        now_ns,
                        ChangeKind::Route,
                        format!("route.{table}"),
                        None,
                        None,
                        Some(format!("{verb} {text}")),
                    ));
                }
            }
            RTM_NEWADDR | RTM_DELADDR => {
                if let Some((dev, addr)) = parse_addr(p, &self.links) {
                    let verb = if ty == RTM_NEWADDR {
                        "added"
                    } else {
                        "removed"
                    };
                    out.push(self.change(
                        now_ns,
                        ChangeKind::Address,
                        format!("addr.{dev}"),
                        None,
                        None,
                        Some(format!("{verb} {addr}")),
                    ));
                }
            }
            RTM_NEWNETCONF => {
                for (key, value) in parse_netconf(p, &self.links) {
                    let old = self.conf.insert(key.clone(), value.clone());
                    if old.as_deref() != Some(value.as_str()) {
                        out.push(self.change(
                            now_ns,
                            ChangeKind::Netconf,
                            key,
                            old,
                            Some(value),
                            None,
                        ));
                    }
                }
            }
            _ => {}
        }
        out
    }

    fn on_nft(&mut self, ty: u16, p: &[u8], now_ns: u64) -> Vec<Change> {
        if ty >> 8 != NFNL_SUBSYS_NFTABLES || p.len() < 4 {
            return Vec::new();
        }
        let family = nft_family_name(p[0]).to_string();
        let attrs = nlas(&p[4..]);
        let text = |kind: u16| attrs.get(&kind).map(|v| c_str(v)).unwrap_or_default();
        let msg = ty & 0xff;
        match msg {
            NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => {
                let verb = if msg == NFT_MSG_NEWTABLE {
                    "added"
                } else {
                    "removed"
                };
                let table = format!("{family} {}", text(1));
                self.note(Item::Text(format!("table {table} {verb}")), table);
            }
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => {
                let verb = if msg == NFT_MSG_NEWCHAIN {
                    "added"
                } else {
                    "removed"
                };
                self.note(
                    Item::Text(format!("chain {} {verb}", text(3))),
                    format!("{family} {}", text(1)),
                );
            }
            NFT_MSG_NEWRULE | NFT_MSG_DELRULE => {
                let (table, chain) = (text(1), text(2));
                let handle = attrs
                    .get(&3)
                    .and_then(|v| v.get(..8))
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0);
                let what = match msg {
                    // Its text is read once the commit's process is known (below).
                    NFT_MSG_NEWRULE => Item::Rule {
                        family: family.clone(),
                        table: table.clone(),
                        chain,
                        handle,
                    },
                    _ => Item::Text(format!("rule removed from chain {chain} (handle {handle})")),
                };
                self.note(what, format!("{family} {table}"));
            }
            NFT_MSG_NEWGEN => {
                let pid = attrs
                    .get(&2)
                    .and_then(|v| v.get(..4))
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0);
                let name = text(3);
                // First, while the committing process may still run; then the rule texts,
                // which cost an `nft` run each (only for the few items shown).
                let process = (pid != 0).then(|| Process::from_pid(pid, &name));
                let tables = std::mem::take(&mut self.batch_tables);
                let items: Vec<String> = std::mem::take(&mut self.batch)
                    .into_iter()
                    .map(|item| match item {
                        Item::Text(t) => t,
                        Item::Rule {
                            family,
                            table,
                            chain,
                            handle,
                        } => {
                            let rule = self.rule_text(&family, &table, &chain, handle);
                            format!("rule added to chain {chain}: {rule}")
                        }
                    })
                    .collect();
                let detail = summarize(&items, std::mem::take(&mut self.batch_more));
                if tables.is_empty() {
                    return Vec::new();
                }
                return tables
                    .into_iter()
                    .map(|t| Change {
                        process: process.clone(),
                        ..self.change(
                            now_ns,
                            ChangeKind::Nftables,
                            format!("nftables.{t}"),
                            None,
                            None,
                            Some(detail.clone()),
                        )
                    })
                    .collect();
            }
            _ => {}
        }
        Vec::new()
    }

    /// Adds one item of the commit under way, touching `table`.
    fn note(&mut self, item: Item, table: String) {
        if self.batch.len() < SHOWN {
            self.batch.push(item);
        } else {
            self.batch_more += 1;
        }
        if !self.batch_tables.contains(&table) {
            self.batch_tables.insert(table);
        }
    }

    /// The text of rule `handle` as `nft -a list chain` prints it (the kernel sends its
    /// expressions, not a text).
    fn rule_text(&self, family: &str, table: &str, chain: &str, handle: u64) -> String {
        let args = [
            "-a".to_string(),
            "list".into(),
            "chain".into(),
            family.to_string(),
            table.to_string(),
            chain.to_string(),
        ];
        let out = in_namespace(self.path.as_deref(), move || {
            std::process::Command::new("nft").args(&args).output().ok()
        })
        .flatten();
        let wanted = format!("# handle {handle}");
        out.and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.trim_end().ends_with(&wanted))
                .map(|l| without_counts(l.trim()))
        })
        .unwrap_or_else(|| format!("handle {handle}"))
    }
}

/// One item of an nftables commit.
enum Item {
    Text(String),
    /// A rule added, described by its text once the commit is complete.
    Rule {
        family: String,
        table: String,
        chain: String,
        handle: u64,
    },
}

/// A rule's text without its counter's values ("counter packets 0 bytes 0" -> "counter").
fn without_counts(rule: &str) -> String {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "packets" && words.get(i + 2) == Some(&"bytes") {
            i += 4;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

/// A short summary of a generation's object changes.
fn summarize(items: &[String], more: usize) -> String {
    let mut s = items.join("; ");
    if more > 0 {
        s.push_str(&format!("; and {more} more"));
    }
    s
}

/// Forwarding and rp_filter of `all`, `default` and every device, read from /proc/sys in the
/// calling thread's namespace, keyed by sysctl name.
fn read_conf() -> HashMap<String, String> {
    let mut conf = HashMap::new();
    for (family, keys) in [
        ("ipv4", &["forwarding", "rp_filter"][..]),
        ("ipv6", &["forwarding"][..]),
    ] {
        let dir = format!("/proc/sys/net/{family}/conf");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let dev = e.file_name().to_string_lossy().into_owned();
            for key in keys {
                if let Ok(v) = std::fs::read_to_string(e.path().join(key)) {
                    conf.insert(format!("net.{family}.conf.{dev}.{key}"), v.trim().to_string());
                }
            }
        }
    }
    conf
}

/// The netlink messages in a datagram: (type, payload after the 16-byte header).
pub fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
        out.push((ty, &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Attributes of a message body, by type (nested and byte-order flags stripped).
pub fn nlas(body: &[u8]) -> HashMap<u16, Vec<u8>> {
    NlasIterator::new(body)
        .filter_map(Result::ok)
        .map(|n: NlaBuffer<&[u8]>| (n.kind() & 0x3fff, n.value().to_vec()))
        .collect()
}

fn c_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn u32_of(v: Option<&Vec<u8>>) -> Option<u32> {
    Some(u32::from_ne_bytes(v?.get(..4)?.try_into().ok()?))
}

/// An RTM_NEWLINK/DELLINK body: (ifindex, name, mtu, up).
pub fn parse_link(p: &[u8]) -> Option<(u32, String, u32, bool)> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let idx = u32::from_ne_bytes(p.get(4..8)?.try_into().ok()?);
    let flags = u32::from_ne_bytes(p.get(8..12)?.try_into().ok()?);
    let a = nlas(p.get(16..)?);
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MTU: u16 = 4;
    const IFF_UP: u32 = 1;
    Some((
        idx,
        c_str(a.get(&IFLA_IFNAME)?),
        u32_of(a.get(&IFLA_MTU)).unwrap_or(0),
        flags & IFF_UP != 0,
    ))
}

/// An RTM_NEWROUTE/DELROUTE body: (table, "10.0.0.0/24 via 10.1.1.1 dev r1"), or `None` for
/// routes the kernel makes for itself (cloned, cache, and the `local` table's entries).
pub fn parse_route(p: &[u8], links: &HashMap<u32, (String, u32, bool)>) -> Option<(String, String)> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let family = *p.first()?;
    let dst_len = *p.get(1)?;
    let rtm_type = *p.get(7)?;
    let flags = u32::from_ne_bytes(p.get(8..12)?.try_into().ok()?);
    const RTM_F_CLONED: u32 = 0x200;
    if flags & RTM_F_CLONED != 0 {
        return None;
    }
    let a = nlas(p.get(12..)?);
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_TABLE: u16 = 15;
    let table = u32_of(a.get(&RTA_TABLE)).unwrap_or(u32::from(*p.get(4)?));
    let table_name = match table {
        253 => "default".to_string(),
        254 => "main".to_string(),
        255 => return None,
        t => t.to_string(),
    };
    let addr = |v: &Vec<u8>| -> Option<String> {
        match family {
            AF_INET => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?).to_string()),
            AF_INET6 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?).to_string()),
            _ => None,
        }
    };
    let kind = match rtm_type {
        6 => "blackhole ",
        7 => "unreachable ",
        8 => "prohibit ",
        9 => "throw ",
        _ => "",
    };
    let mut text = match a.get(&RTA_DST).and_then(addr) {
        Some(d) => format!("{kind}{d}/{dst_len}"),
        None => format!("{kind}default"),
    };
    if let Some(gw) = a.get(&RTA_GATEWAY).and_then(addr) {
        text.push_str(&format!(" via {gw}"));
    }
    if let Some((dev, ..)) = u32_of(a.get(&RTA_OIF)).and_then(|i| links.get(&i)) {
        text.push_str(&format!(" dev {dev}"));
    }
    Some((table_name, text))
}

/// An RTM_NEWADDR/DELADDR body: (device, "10.0.0.1/24").
pub fn parse_addr(p: &[u8], links: &HashMap<u32, (String, u32, bool)>) -> Option<(String, String)> {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    let family = *p.first()?;
    let prefix = *p.get(1)?;
    let idx = u32::from_ne_bytes(p.get(4..8)?.try_into().ok()?);
    let a = nlas(p.get(8..)?);
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    let raw = a.get(&IFA_LOCAL).or(a.get(&IFA_ADDRESS))?;
    let addr = match family {
        AF_INET => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(raw.get(..4)?).ok()?).to_string(),
        AF_INET6 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(raw.get(..16)?).ok()?).to_string(),
        _ => return None,
    };
    let dev = links.get(&idx).map_or_else(|| format!("if{idx}"), |l| l.0.clone());
    Some((dev, format!("{addr}/{prefix}")))
}

/// An RTM_NEWNETCONF body: the settings it carries, as (sysctl name, value).
pub fn parse_netconf(
    p: &[u8],
    links: &HashMap<u32, (String, u32, bool)>,
) -> Vec<(String, String)> {
    // struct netconfmsg: family (padded to 4 bytes).
    let Some(&family) = p.first() else {
        return Vec::new();
    };
    let fam = match family {
        AF_INET => "ipv4",
        AF_INET6 => "ipv6",
        _ => return Vec::new(),
    };
    let a = nlas(p.get(4..).unwrap_or_default());
    const NETCONFA_IFINDEX: u16 = 1;
    const NETCONFA_FORWARDING: u16 = 2;
    const NETCONFA_RP_FILTER: u16 = 3;
    let Some(idx) = u32_of(a.get(&NETCONFA_IFINDEX)).map(|v| v as i32) else {
        return Vec::new();
    };
    let dev = match idx {
        -1 => "all".to_string(),
        -2 => "default".to_string(),
        i => match links.get(&(i as u32)) {
            Some(l) => l.0.clone(),
            None => return Vec::new(),
        },
    };
    let mut out = Vec::new();
    for (attr, name) in [
        (NETCONFA_FORWARDING, "forwarding"),
        (NETCONFA_RP_FILTER, "rp_filter"),
    ] {
        if let Some(v) = u32_of(a.get(&attr)) {
            out.push((format!("net.{fam}.conf.{dev}.{name}"), (v as i32).to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn links() -> HashMap<u32, (String, u32, bool)> {
        HashMap::from([(3, ("r0".to_string(), 1500, true))])
    }

    #[test]
    fn netconf_names_the_sysctl_it_changed() {
        let mut p = vec![AF_INET, 0, 0, 0];
        p.extend(nla(1, &(-1i32).to_ne_bytes()));
        p.extend(nla(2, &0i32.to_ne_bytes()));
        assert_eq!(
            parse_netconf(&p, &links()),
            vec![("net.ipv4.conf.all.forwarding".into(), "0".into())]
        );
        let mut p = vec![AF_INET, 0, 0, 0];
        p.extend(nla(1, &3i32.to_ne_bytes()));
        p.extend(nla(3, &1i32.to_ne_bytes()));
        assert_eq!(
            parse_netconf(&p, &links()),
            vec![("net.ipv4.conf.r0.rp_filter".into(), "1".into())]
        );
    }

    #[test]
    fn links_routes_and_addresses_parse() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&3u32.to_ne_bytes());
        p[8..12].copy_from_slice(&1u32.to_ne_bytes());
        p.extend(nla(3, b"r0\0"));
        p.extend(nla(4, &1280u32.to_ne_bytes()));
        assert_eq!(parse_link(&p), Some((3, "r0".into(), 1280, true)));
        let mut r = vec![AF_INET, 24, 0, 0, 254, 4, 0, 7, 0, 0, 0, 0];
        r.extend(nla(1, &[10, 231, 66, 0]));
        r.extend(nla(4, &3u32.to_ne_bytes()));
        assert_eq!(
            parse_route(&r, &links()),
            Some(("main".into(), "unreachable 10.231.66.0/24 dev r0".into()))
        );
        let mut a = vec![AF_INET, 24, 0, 0];
        a.extend_from_slice(&3u32.to_ne_bytes());
        a.extend(nla(2, &[10, 0, 0, 1]));
        assert_eq!(
            parse_addr(&a, &links()),
            Some(("r0".into(), "10.0.0.1/24".into()))
        );
    }

    #[test]
    fn datagrams_split_into_messages() {
        let mut buf = Vec::new();
        for ty in [RTM_NEWLINK, NLMSG_DONE] {
            buf.extend_from_slice(&20u32.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&[1, 2, 3, 4]);
        }
        let m = messages(&buf);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[0].1), (RTM_NEWLINK, &[1u8, 2, 3, 4][..]));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        /// A datagram of messages with these types and payloads, framed as the kernel does.
        fn datagram(msgs: &[(u16, Vec<u8>)]) -> Vec<u8> {
            let mut buf = Vec::new();
            for (ty, payload) in msgs {
                buf.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
                buf.extend_from_slice(&ty.to_ne_bytes());
                buf.extend_from_slice(&[0; 10]);
                buf.extend_from_slice(payload);
                while buf.len() % 4 != 0 {
                    buf.push(0);
                }
            }
            buf
        }

        /// Attributes: well-formed (random kinds and values) or raw garbage.
        fn attrs() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec((0u16..20, fuzz::bytes(20)), 0..6)
                    .prop_map(|a| a.iter().flat_map(|(k, v)| nla(*k, v)).collect()),
                fuzz::bytes(64),
            ]
        }

        /// A message body: a header of `head` random bytes, then attributes, maybe cut.
        fn body() -> impl Strategy<Value = Vec<u8>> {
            (
                fuzz::bytes(20),
                attrs(),
                any::<prop::sample::Index>(),
                any::<bool>(),
            )
                .prop_map(|(head, attrs, cut, whole)| {
                    let mut v = head;
                    v.extend(attrs);
                    if !whole {
                        v.truncate(cut.index(v.len() + 1));
                    }
                    v
                })
        }

        /// A monitor of no namespace: its sockets are never read here.
        fn monitor() -> NsMonitor {
            NsMonitor {
                netns: 1,
                path: None,
                rtnl: Socket::new(protocols::NETLINK_ROUTE).unwrap(),
                nft: None,
                links: links(),
                conf: HashMap::new(),
                batch: Vec::new(),
                batch_more: 0,
                batch_tables: BTreeSet::new(),
            }
        }

        /// The first datagram of this namespace's link dump, as the kernel sends it.
        fn link_dump() -> Vec<u8> {
            let s = Socket::new(protocols::NETLINK_ROUTE).unwrap();
            let mut req = Vec::new();
            req.extend_from_slice(&32u32.to_ne_bytes());
            req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
            req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
            req.extend_from_slice(&[0; 24]);
            s.send_to(&req, &SocketAddr::new(0, 0), 0).unwrap();
            let (buf, _) = s.recv_from_full().unwrap();
            assert!(messages(&buf)
                .iter()
                .any(|(t, p)| *t == RTM_NEWLINK && parse_link(p).is_some()));
            buf
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_a_mutated_real_link_dump_never_panics(buf in fuzz::mutated_bytes(link_dump())) {
                let mut m = monitor();
                for (ty, payload) in messages(&buf) {
                    parse_link(payload);
                    m.on_rtnl(ty, payload, 1);
                }
            }

            #[test]
            fn prop_any_datagram_splits_within_its_bounds(buf in fuzz::bytes(256)) {
                let mut total = 0;
                for (_, payload) in messages(&buf) {
                    total += payload.len() + 16;
                }
                prop_assert!(total <= buf.len());
            }

            #[test]
            fn prop_messages_read_back_and_a_cut_datagram_loses_only_its_tail(
                msgs in prop::collection::vec((any::<u16>(), fuzz::bytes(40)), 0..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let buf = datagram(&msgs);
                let got: Vec<(u16, Vec<u8>)> =
                    messages(&buf).into_iter().map(|(t, p)| (t, p.to_vec())).collect();
                prop_assert_eq!(&got, &msgs);
                let cut = &buf[..cut.index(buf.len() + 1)];
                let got: Vec<(u16, Vec<u8>)> =
                    messages(cut).into_iter().map(|(t, p)| (t, p.to_vec())).collect();
                prop_assert!(msgs.starts_with(&got), "{:?} from a cut datagram", got);
            }

            #[test]
            fn prop_attributes_never_outgrow_their_body(body in fuzz::bytes(300)) {
                // Whatever the length fields say, what is kept was in the body.
                let a = nlas(&body);
                prop_assert!(a.values().map(|v| v.len() + 4).sum::<usize>() <= body.len());
            }

            #[test]
            fn prop_any_body_never_panics(body in body()) {
                parse_link(&body);
                parse_route(&body, &links());
                parse_addr(&body, &links());
                parse_netconf(&body, &links());
            }

            #[test]
            fn prop_a_link_reads_back_and_cut_attributes_are_not_read(
                idx in any::<u32>(),
                flags in any::<u32>(),
                name in "[a-z0-9@.-]{1,15}",
                mtu in any::<u32>(),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut p = vec![0u8; 16];
                p[4..8].copy_from_slice(&idx.to_ne_bytes());
                p[8..12].copy_from_slice(&flags.to_ne_bytes());
                p.extend(nla(3, format!("{name}\0").as_bytes()));
                p.extend(nla(4, &mtu.to_ne_bytes()));
                prop_assert_eq!(parse_link(&p), Some((idx, name.clone(), mtu, flags & 1 != 0)));
                // A body cut short: no link, or the name without the cut-off MTU.
                match parse_link(&p[..cut.index(p.len())]) {
                    None => {}
                    Some(l) => prop_assert_eq!(l, (idx, name, 0, flags & 1 != 0)),
                }
            }

            #[test]
            fn prop_routes_and_addresses_read_back(
                v4 in any::<[u8; 4]>(),
                v6 in any::<[u8; 16]>(),
                len in any::<u8>(),
                six in any::<bool>(),
            ) {
                let (family, addr, text): (u8, Vec<u8>, String) = if six {
                    (AF_INET6, v6.to_vec(), std::net::Ipv6Addr::from(v6).to_string())
                } else {
                    (AF_INET, v4.to_vec(), std::net::Ipv4Addr::from(v4).to_string())
                };
                let mut r = vec![family, len, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
                r.extend(nla(1, &addr));
                r.extend(nla(5, &addr));
                r.extend(nla(4, &3u32.to_ne_bytes()));
                prop_assert_eq!(
                    parse_route(&r, &links()),
                    Some(("main".to_string(), format!("{text}/{len} via {text} dev r0")))
                );
                let mut a = vec![family, len, 0, 0];
                a.extend_from_slice(&3u32.to_ne_bytes());
                a.extend(nla(2, &addr));
                prop_assert_eq!(parse_addr(&a, &links()), Some(("r0".to_string(), format!("{text}/{len}"))));
                // The address attribute cut short is not an address.
                let short = a.len() - addr.len() / 2;
                let mut cut = a[..short].to_vec();
                cut[8..10].copy_from_slice(&((4 + addr.len() / 2) as u16).to_ne_bytes());
                prop_assert_eq!(parse_addr(&cut, &links()), None);
            }

            #[test]
            fn prop_any_message_to_a_monitor_never_panics(
                msgs in prop::collection::vec(
                    (prop_oneof![
                        prop::sample::select(&[RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNETCONF][..]),
                        any::<u16>(),
                    ], body()),
                    0..8,
                ),
                nft in prop::collection::vec(
                    (prop::sample::select(&[NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_NEWGEN, 99][..]), body()),
                    0..8,
                ),
            ) {
                let mut m = monitor();
                for (ty, body) in &msgs {
                    for c in m.on_rtnl(*ty, body, 1) {
                        let _ = c.what();
                    }
                }
                for (msg, body) in &nft {
                    // NEWGEN may name a process: a pid of 0 keeps /proc out of it.
                    let mut body = body.clone();
                    // The first rules of a commit are described by running `nft`: not here.
                    while *msg == NFT_MSG_NEWRULE && m.batch.len() < SHOWN {
                        m.batch.push(Item::Text("rule".into()));
                    }
                    if *msg == NFT_MSG_NEWGEN {
                        body = [&[2u8, 0, 0, 0][..], &nla(2, &[0; 4]), &nla(3, b"nft\0")].concat();
                    }
                    for c in m.on_nft((NFNL_SUBSYS_NFTABLES << 8) | msg, &body, 1) {
                        let _ = c.what();
                    }
                    m.on_nft(*msg, &body, 1);
                }
                prop_assert!(m.batch.len() <= SHOWN);
            }
        }
    }
}
