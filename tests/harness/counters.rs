//! Independent oracles: the kernel's own counters, read without dropscope.
use std::collections::HashMap;

use crate::netns::Netns;

/// A snapshot of `nstat -az` (SNMP and netstat counters) in one namespace.
pub struct Nstat(HashMap<String, u64>);

impl Nstat {
    pub fn read(ns: &Netns) -> Self {
        let text = ns.sh("nstat -az");
        Nstat(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    Some((it.next()?.to_string(), it.next()?.parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> u64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("nstat has no counter {name}"))
    }

    /// How much `name` grew between `before` and now.
    pub fn delta(ns: &Netns, before: &Nstat, name: &str) -> u64 {
        Nstat::read(ns).get(name) - before.get(name)
    }
}

/// UdpNoPorts (datagrams to a port nothing listens on) of the calling thread's namespace,
/// straight from the kernel: cheap enough to read in a loop (see `Netns::run`).
pub fn udp_no_ports() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .expect("Udp NoPorts");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// An nftables table `table` in `ns` whose forward chain drops UDP to `dport`, counted by a
/// rule carrying `comment "<tag>"` (read back with [`nft_rule_packets`]).
pub fn nft_forward_drop(ns: &Netns, table: &str, dport: u16, tag: &str) {
    ns.sh(&format!(
        "nft add table inet {table}; nft add chain inet {table} f '{{ type filter hook forward priority 0; }}'; \
         nft add rule inet {table} f udp dport {dport} counter drop comment '\"{tag}\"'"
    ));
}

/// Packets counted by the nftables rule carrying `comment "<tag>"`.
pub fn nft_rule_packets(ns: &Netns, tag: &str) -> u64 {
    nft_rule_counter(ns, tag).0
}

/// (packets, bytes) counted by the nftables rule carrying `comment "<tag>"`.
pub fn nft_rule_counter(ns: &Netns, tag: &str) -> (u64, u64) {
    let json: serde_json::Value =
        serde_json::from_str(&ns.sh("nft -j list ruleset")).expect("nft json");
    for item in json["nftables"].as_array().expect("nftables array") {
        let rule = &item["rule"];
        if rule["comment"].as_str() == Some(tag) {
            for expr in rule["expr"].as_array().into_iter().flatten() {
                let counter = &expr["counter"];
                if let (Some(p), Some(b)) = (counter["packets"].as_u64(), counter["bytes"].as_u64())
                {
                    return (p, b);
                }
            }
        }
    }
    panic!(
        "no nft rule with comment {tag} and a counter in {}",
        ns.name
    )
}

/// Packets counted by the iptables rule whose `-save -c` line contains `needle`.
/// `tool` is `iptables-nft`, `iptables-legacy`, `ip6tables-nft`, ...
pub fn iptables_rule_packets(ns: &Netns, tool: &str, needle: &str) -> u64 {
    let text = ns.sh(&format!("{tool}-save -c"));
    for line in text.lines() {
        // "[12:1008] -A FORWARD -p udp ... -j DROP"
        if line.starts_with('[') && line.contains(needle) {
            let counts = &line[1..line.find(']').unwrap()];
            return counts.split(':').next().unwrap().parse().unwrap();
        }
    }
    panic!("no {tool} rule matching {needle:?} in {}:\n{text}", ns.name)
}

/// A counter from `tc -s` output: the number after `key` (e.g. "dropped ").
pub fn tc_stat(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {text}"));
    text[at + key.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}
