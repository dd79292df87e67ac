//! The text-buffering parsers dropscope used before the streaming readers, kept verbatim
//! (but for the map they fill) as the reference the streaming readers are compared with.
use std::collections::{HashMap, HashSet};

use ipnet::IpNet;

use super::{Counted, Matcher, RuleId, Target};

pub type Rules = HashMap<RuleId, Counted>;

/// Parses `iptables-save -c` into `snap`; returns the tables it listed.
pub fn parse_iptables_save(text: &str, engine: &'static str, snap: &mut Rules) -> Vec<String> {
    let mut tables = Vec::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
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
                snap.insert(
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
                snap.insert(
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

fn verdict_of_target(target: &str, with: &str) -> Option<Target> {
    match target {
        "DROP" => Some(Target::Drop),
        "REJECT" => Some(Target::Reject(if with.is_empty() {
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
pub fn parse_nft_json(text: &str, skip: &HashSet<(String, String)>, snap: &mut Rules) {
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
                Some(Target::Drop)
            } else if let Some(r) = e.get("reject") {
                let with = match (r["type"].as_str(), r["expr"].as_str()) {
                    (Some("tcp reset"), _) => "tcp-reset".to_string(),
                    (_, Some(code)) => code.to_string(),
                    _ => "icmp-port-unreachable".to_string(),
                };
                Some(Target::Reject(with))
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
            snap.insert(
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
