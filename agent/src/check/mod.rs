//! `dropscope check`: a node health snapshot that needs no traffic. It reads every network
//! namespace (or the ones asked for) and reports the settings that make the kernel drop
//! packets: forwarding, rp_filter, rules split across iptables-legacy and nftables, conntrack
//! fill, MTU mismatches between veth peers and between overlay and underlay.
mod state;

use std::{collections::HashMap, io::Write};

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::{
    cli::{CheckArgs, Format},
    netns::{self, NetnsRef},
};
pub use state::NsState;

/// How bad a finding is. Problems make `check` exit with status 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Problem,
    Warning,
    Info,
}

/// One thing worth telling the operator.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable id of the check ("split_brain", "veth_mtu_mismatch", ...).
    pub check: &'static str,
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    pub subject: String,
    pub message: String,
    pub fix: String,
}

/// A namespace and what was read in it.
pub struct Scanned {
    pub ns: NetnsRef,
    pub own: bool,
    pub state: NsState,
}

/// Exit status when problems were found.
pub const EXIT_PROBLEMS: i32 = 3;

/// Runs the check and prints the findings; returns the process exit status.
pub fn run(args: &CheckArgs) -> Result<i32> {
    crate::kernel::preflight::check_privileges_for("check", "enter network namespaces")?;
    let wanted: Vec<u32> = args
        .netns
        .iter()
        .map(|n| netns::resolve_arg(n))
        .collect::<Result<_>>()?;
    let mut registry = netns::Registry::new();
    let own = registry.own();
    let mut scanned = Vec::new();
    for ns in registry.all() {
        if !wanted.is_empty() && !wanted.contains(&ns.inode) {
            continue;
        }
        let state = if ns.inode == own {
            NsState::read()
        } else {
            netns::run_in(&ns.path, NsState::read)?
        };
        scanned.push(Scanned {
            own: ns.inode == own,
            ns,
            state,
        });
    }
    scanned.sort_by_key(|s| (!s.own, s.ns.name.clone(), s.ns.inode));
    let mut findings = analyze(&scanned);
    findings.sort_by(|a, b| {
        a.severity
            .cmp(&b.severity)
            .then(a.netns.cmp(&b.netns))
            .then(a.subject.cmp(&b.subject))
    });
    let out = &mut std::io::stdout().lock();
    match args.format {
        Format::Json => {
            for f in &findings {
                let mut v = serde_json::to_value(f)?;
                v["type"] = json!("finding");
                writeln!(out, "{v}")?;
            }
            writeln!(
                out,
                "{}",
                json!({"type": "check_summary", "namespaces": scanned.len(),
                "problems": count(&findings, Severity::Problem), "warnings": count(&findings, Severity::Warning)})
            )?;
        }
        Format::Text => print_text(out, &scanned, &findings)?,
    }
    Ok(if count(&findings, Severity::Problem) > 0 {
        EXIT_PROBLEMS
    } else {
        0
    })
}

fn count(findings: &[Finding], s: Severity) -> usize {
    findings.iter().filter(|f| f.severity == s).count()
}

fn print_text(out: &mut impl Write, scanned: &[Scanned], findings: &[Finding]) -> Result<()> {
    for f in findings {
        let ns = f.netns_name.clone().unwrap_or_else(|| f.netns.to_string());
        let sev = match f.severity {
            Severity::Problem => "PROBLEM",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        writeln!(
            out,
            "{sev:<8} {:<18} netns {ns}  {}: {}",
            f.check, f.subject, f.message
        )?;
        writeln!(out, "         fix: {}", f.fix)?;
    }
    writeln!(
        out,
        "checked {} network namespaces: {} problems, {} warnings",
        scanned.len(),
        count(findings, Severity::Problem),
        count(findings, Severity::Warning)
    )?;
    Ok(())
}

/// Turns the namespaces' state into findings.
pub fn analyze(scanned: &[Scanned]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for s in scanned {
        let st = &s.state;
        let prefix = if s.own {
            String::new()
        } else {
            s.ns.exec_prefix()
        };
        let mut add = |severity, check, subject: String, message: String, fix: String| {
            findings.push(Finding {
                severity,
                check,
                netns: s.ns.inode,
                netns_name: s.ns.name.clone(),
                subject,
                message,
                fix,
            });
        };
        let links: Vec<_> = st.real_links().collect();
        let routes_between = links.len() >= 2;

        // Forwarding: only meaningful where there is something to route between.
        if routes_between && st.ip_forward == Some(0) {
            add(Severity::Warning, "forwarding", "net.ipv4.ip_forward".into(),
                format!("IPv4 forwarding is off with {} interfaces: packets routed through this namespace are dropped (forwarding_disabled)", links.len()),
                format!("{prefix}sysctl -w net.ipv4.ip_forward=1   # if this namespace should route"));
        }
        if st.ip_forward == Some(1) {
            for l in &links {
                if st.devs.get(&l.ifname).and_then(|c| c.forwarding) == Some(0) {
                    add(Severity::Problem, "forwarding", l.ifname.clone(),
                        format!("forwarding is on for the namespace but off on {}: packets arriving there are not routed", l.ifname),
                        format!("{prefix}sysctl -w net.ipv4.conf.{}.forwarding=1", l.ifname));
                }
            }
        }
        // rp_filter: strict mode drops on asymmetric paths.
        if routes_between {
            for l in &links {
                let dev = st.devs.get(&l.ifname).and_then(|c| c.rp_filter);
                let effective = dev.max(st.all.rp_filter);
                if effective == Some(1) {
                    add(Severity::Warning, "rp_filter", l.ifname.clone(),
                        format!("strict rp_filter (all={}, {}={}): packets whose return route leaves by another interface are dropped",
                            show(st.all.rp_filter), l.ifname, show(dev)),
                        format!("{prefix}sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{}.rp_filter=2", l.ifname));
                }
            }
        }
        // The split brain: two engines, each unaware of the other's rules.
        if st.legacy_rules > 0 && st.nft_rules > 0 {
            add(Severity::Problem, "split_brain", "iptables-legacy + nftables".into(),
                format!("{} iptables-legacy rules and {} nftables rules (incl. iptables-nft) are both active: `iptables` shows only one of them, and either can drop", st.legacy_rules, st.nft_rules),
                format!("list both: {prefix}iptables-legacy-save; {prefix}nft list ruleset; migrate to one engine (iptables-legacy-save | iptables-nft-restore) and flush the other"));
        }
        if let Some(ct) = st.ct {
            if let (Some(c), Some(m)) = (ct.count, ct.max) {
                let fill = c as f64 / m.max(1) as f64;
                let sev = if fill >= 0.9 {
                    Some(Severity::Problem)
                } else if fill >= 0.75 {
                    Some(Severity::Warning)
                } else {
                    None
                };
                if let Some(sev) = sev {
                    add(sev, "conntrack", "nf_conntrack_count".into(),
                        format!("conntrack table {:.0}% full ({c} of {m}): new connections are dropped when it fills", fill * 100.0),
                        "sysctl -w net.netfilter.nf_conntrack_max=<larger> (host namespace); shorten conntrack timeouts".into());
                }
            }
        }
        if st.bridge_nf_call_iptables == Some(1)
            && st.links.iter().any(|l| l.kind() == Some("bridge"))
        {
            add(Severity::Info, "bridge_netfilter", "net.bridge.bridge-nf-call-iptables".into(),
                "bridged traffic goes through iptables/nftables rules (needed by kube-proxy; surprising elsewhere)".into(),
                format!("{prefix}sysctl -w net.bridge.bridge-nf-call-iptables=0   # only if no one relies on it"));
        }
        // Overlay vs underlay: VXLAN adds 50 bytes.
        for l in st.links.iter().filter(|l| l.kind() == Some("vxlan")) {
            let lower = l
                .link_index
                .and_then(|i| st.links.iter().find(|u| u.ifindex == i))
                .or_else(|| {
                    st.default_dev
                        .as_ref()
                        .and_then(|d| st.links.iter().find(|u| &u.ifname == d))
                });
            if let Some(u) = lower {
                if l.mtu + 50 > u.mtu {
                    add(Severity::Problem, "overlay_mtu", l.ifname.clone(),
                        format!("VXLAN {} has MTU {} but its underlay {} has MTU {}: encapsulated packets above {} bytes are dropped", l.ifname, l.mtu, u.ifname, u.mtu, u.mtu.saturating_sub(50)),
                        format!("{prefix}ip link set dev {} mtu {}", l.ifname, u.mtu.saturating_sub(50)));
                }
            }
        }
    }
    findings.extend(veth_mismatches(scanned));
    findings
}

fn show(v: Option<u8>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

/// veth pairs whose ends have different MTUs. A peer is found through the namespace's nsid
/// table when the peer namespace is named, else as the unique interface pointing back.
fn veth_mismatches(scanned: &[Scanned]) -> Vec<Finding> {
    let by_name: HashMap<&str, usize> = scanned
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((s.ns.name.as_deref()?, i)))
        .collect();
    let mut findings = Vec::new();
    let mut reported = std::collections::HashSet::new();
    for (i, s) in scanned.iter().enumerate() {
        for l in s.state.links.iter().filter(|l| l.kind() == Some("veth")) {
            let Some(peer_index) = l.link_index else {
                continue;
            };
            let candidates: Vec<(usize, &state::Link)> = match l
                .link_netnsid
                .and_then(|id| s.state.nsid_names.get(&id))
                .and_then(|n| by_name.get(n.as_str()))
            {
                Some(&j) => scanned[j]
                    .state
                    .links
                    .iter()
                    .filter(|p| p.ifindex == peer_index)
                    .map(|p| (j, p))
                    .collect(),
                None => scanned
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| l.link_netnsid.is_some() != (*j == i))
                    .flat_map(|(j, o)| {
                        o.state
                            .links
                            .iter()
                            .filter(|p| {
                                p.ifindex == peer_index
                                    && p.link_index == Some(l.ifindex)
                                    && p.kind() == Some("veth")
                            })
                            .map(move |p| (j, p))
                    })
                    .collect(),
            };
            let [(j, peer)] = candidates[..] else {
                continue;
            };
            if peer.mtu == l.mtu
                || !reported.insert((
                    s.ns.inode.min(scanned[j].ns.inode),
                    l.ifindex.min(peer.ifindex),
                    l.mtu.max(peer.mtu),
                ))
            {
                continue;
            }
            let (small, big) = if l.mtu < peer.mtu {
                ((s, l), (&scanned[j], peer))
            } else {
                ((&scanned[j], peer), (s, l))
            };
            let name = |x: &Scanned| x.ns.name.clone().unwrap_or_else(|| x.ns.inode.to_string());
            let prefix = if big.0.own {
                String::new()
            } else {
                big.0.ns.exec_prefix()
            };
            findings.push(Finding {
                severity: Severity::Problem,
                check: "veth_mtu_mismatch",
                netns: big.0.ns.inode,
                netns_name: big.0.ns.name.clone(),
                subject: big.1.ifname.clone(),
                message: format!(
                    "veth {} (netns {}) has MTU {} but its peer {} (netns {}) has MTU {}: packets above {} bytes sent from {} are dropped",
                    big.1.ifname, name(big.0), big.1.mtu, small.1.ifname, name(small.0), small.1.mtu, small.1.mtu, big.1.ifname
                ),
                fix: format!("{prefix}ip link set dev {} mtu {}   # or raise the peer; fix the CNI MTU", big.1.ifname, small.1.mtu),
            });
        }
    }
    findings
}
