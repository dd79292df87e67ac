//! What `dropscope check` reads in one network namespace: sysctls, links, rule counts,
//! conntrack fill. Read from procfs inside the namespace and from `ip -j`/`nft -j` there.
use std::{collections::HashMap, fs, process::Command};

use serde::Deserialize;

use crate::evidence::conntrack::CtStats;

/// One network device.
#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
    /// Peer ifindex (veth) or lower device (vxlan, vlan).
    pub link_index: Option<u32>,
    /// Namespace id (as this namespace numbers it) of the peer / lower device.
    pub link_netnsid: Option<i32>,
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LinkInfo {
    pub info_kind: Option<String>,
}

impl Link {
    pub fn kind(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_kind.as_deref()
    }
}

/// Per-device IPv4 configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevConf {
    pub forwarding: Option<u8>,
    pub rp_filter: Option<u8>,
}

/// The state of one namespace.
#[derive(Debug, Clone, Default)]
pub struct NsState {
    pub ip_forward: Option<u8>,
    pub all: DevConf,
    pub devs: HashMap<String, DevConf>,
    pub bridge_nf_call_iptables: Option<u8>,
    pub links: Vec<Link>,
    /// nsid -> `ip netns` name, for peers in named namespaces.
    pub nsid_names: HashMap<i32, String>,
    pub default_dev: Option<String>,
    /// Rules appended through iptables-legacy (x_tables) and through nftables (incl. iptables-nft).
    pub legacy_rules: usize,
    pub nft_rules: usize,
    pub ct: Option<CtStats>,
}

fn num(path: &str) -> Option<u8> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn json(cmd: &str, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(cmd).args(args).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

impl NsState {
    /// Reads the calling thread's namespace (run inside `netns::run_in`).
    pub fn read() -> Self {
        let mut s = NsState {
            ip_forward: num("/proc/sys/net/ipv4/ip_forward"),
            all: DevConf {
                forwarding: num("/proc/sys/net/ipv4/conf/all/forwarding"),
                rp_filter: num("/proc/sys/net/ipv4/conf/all/rp_filter"),
            },
            bridge_nf_call_iptables: num("/proc/sys/net/bridge/bridge-nf-call-iptables"),
            ct: CtStats::read(),
            ..Default::default()
        };
        if let Some(v) = json("ip", &["-d", "-j", "link", "show"]) {
            s.links = serde_json::from_value(v).unwrap_or_default();
        }
        for link in &s.links {
            let conf = |key: &str| num(&format!("/proc/sys/net/ipv4/conf/{}/{key}", link.ifname));
            s.devs.insert(
                link.ifname.clone(),
                DevConf {
                    forwarding: conf("forwarding"),
                    rp_filter: conf("rp_filter"),
                },
            );
        }
        if let Some(ids) = json("ip", &["-j", "netns", "list-id"]) {
            for id in ids.as_array().into_iter().flatten() {
                if let (Some(nsid), Some(name)) = (id["nsid"].as_i64(), id["name"].as_str()) {
                    s.nsid_names.insert(nsid as i32, name.to_string());
                }
            }
        }
        s.default_dev = json("ip", &["-4", "-j", "route", "show", "default"])
            .and_then(|v| v[0]["dev"].as_str().map(str::to_string));
        if fs::read_to_string("/proc/thread-self/net/ip_tables_names")
            .is_ok_and(|t| !t.trim().is_empty())
        {
            let out = Command::new("iptables-legacy-save").output().ok();
            s.legacy_rules = out.map_or(0, |o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count()
            });
        }
        if let Some(v) = json("nft", &["-j", "list", "ruleset"]) {
            s.nft_rules = v["nftables"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|i| i.get("rule").is_some()).count());
        }
        s
    }

    /// Interfaces other than loopback.
    pub fn real_links(&self) -> impl Iterator<Item = &Link> {
        self.links.iter().filter(|l| l.ifname != "lo")
    }
}
