//! Tunnel devices of a namespace, found by the outer addresses of a packet they sent: the
//! device a "too big after encapsulation" drop belongs to, and its encapsulation overhead.
use std::{net::IpAddr, path::Path, process::Command};

use serde_json::Value;

use crate::netns::in_namespace;

/// A tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    /// `ip link` type: vxlan, geneve, gre, gretap, ipip, sit, ip6gre, ip6tnl, wireguard.
    pub kind: String,
    pub mtu: u32,
    /// Bytes the encapsulation adds for this outer family (base headers, no options).
    pub overhead: u32,
    /// How the device was matched ("remote and local", "remote", "forwarding entry", ...).
    pub matched_by: &'static str,
    /// The far end of the tunnel, when the device has a fixed one.
    pub remote: Option<IpAddr>,
}

/// The tunnel device of a drop in the namespace at `ns`: the device `dev` itself when it is
/// a tunnel (the tunnel driver refused the inner packet), else the one sending `src` -> `dst`
/// outer packets.
pub fn find(ns: Option<&Path>, dev: Option<String>, src: IpAddr, dst: IpAddr) -> Option<Tunnel> {
    in_namespace(ns, move || {
        let links = ip_json(&["-d", "-j", "link", "show"])?;
        let fdb = || ip_json_tool("bridge", &["-j", "fdb", "show"]);
        pick(&links, dev.as_deref(), src, dst, fdb)
    })
    .flatten()
}

fn ip_json(args: &[&str]) -> Option<Value> {
    ip_json_tool("ip", args)
}

fn ip_json_tool(tool: &str, args: &[&str]) -> Option<Value> {
    let out = Command::new(tool).args(args).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Encapsulation overhead of a tunnel kind over an outer IPv4 / IPv6 header.
pub fn overhead(kind: &str, outer_v6: bool) -> u32 {
    let ip = if outer_v6 { 40 } else { 20 };
    match kind {
        // outer IP + UDP 8 + VXLAN/GENEVE 8 + inner Ethernet 14
        "vxlan" | "geneve" => ip + 30,
        "gretap" | "ip6gretap" => ip + 4 + 14,
        "gre" | "ip6gre" => ip + 4,
        "wireguard" => ip + 40,
        // ipip, sit, ip6tnl: the outer header alone
        _ => ip,
    }
}

const TUNNEL_KINDS: [&str; 10] = [
    "vxlan",
    "geneve",
    "gre",
    "gretap",
    "ipip",
    "sit",
    "ip6gre",
    "ip6gretap",
    "ip6tnl",
    "wireguard",
];

/// Chooses the device from `ip -d -j link show` output: remote and local both matching,
/// else the remote, else a VXLAN forwarding entry towards `dst`, else the only tunnel whose
/// local address is `src`.
pub fn pick(
    links: &Value,
    dev: Option<&str>,
    src: IpAddr,
    dst: IpAddr,
    fdb: impl FnOnce() -> Option<Value>,
) -> Option<Tunnel> {
    let tunnels: Vec<&Value> = links
        .as_array()?
        .iter()
        .filter(|l| {
            l["linkinfo"]["info_kind"]
                .as_str()
                .is_some_and(|k| TUNNEL_KINDS.contains(&k))
        })
        .collect();
    let addr = |l: &Value, keys: [&str; 2]| -> Option<IpAddr> {
        let d = &l["linkinfo"]["info_data"];
        keys.iter()
            .find_map(|k| d[*k].as_str())
            .and_then(|a| a.parse().ok())
    };
    let remote = |l: &&Value| addr(l, ["remote", "remote6"]);
    let local = |l: &&Value| addr(l, ["local", "local6"]);
    let make = |l: &Value, matched_by| {
        let kind = l["linkinfo"]["info_kind"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let remote = addr(l, ["remote", "remote6"]);
        Some(Tunnel {
            name: l["ifname"].as_str()?.to_string(),
            overhead: overhead(&kind, remote.map_or(dst.is_ipv6(), |r| r.is_ipv6())),
            kind,
            mtu: l["mtu"].as_u64().unwrap_or(0) as u32,
            matched_by,
            remote,
        })
    };
    if let Some(l) = dev.and_then(|d| tunnels.iter().find(|l| l["ifname"] == d)) {
        return make(l, "the device the packet was sent on");
    }
    if let Some(l) = tunnels
        .iter()
        .find(|l| remote(l) == Some(dst) && local(l) == Some(src))
    {
        return make(l, "remote and local address");
    }
    if let Some(l) = tunnels.iter().find(|l| remote(l) == Some(dst)) {
        return make(l, "remote address");
    }
    // VXLAN devices without a fixed remote send by forwarding entry ("dst" of `bridge fdb`).
    if tunnels.iter().any(|l| remote(l).is_none()) {
        if let Some(entries) = fdb() {
            let dev = entries.as_array().into_iter().flatten().find_map(|e| {
                let to: IpAddr = e["dst"].as_str()?.parse().ok()?;
                (to == dst).then(|| e["ifname"].as_str())?
            });
            if let Some(l) = dev.and_then(|d| tunnels.iter().find(|l| l["ifname"] == d)) {
                return make(l, "forwarding entry to the remote");
            }
        }
    }
    let by_local: Vec<&&Value> = tunnels.iter().filter(|l| local(l) == Some(src)).collect();
    match by_local.as_slice() {
        [only] => make(only, "local address"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Value {
        serde_json::json!([
            {"ifname": "lo", "mtu": 65536},
            {"ifname": "a0", "mtu": 1500, "linkinfo": {"info_kind": "veth"}},
            {"ifname": "t0", "mtu": 1500, "linkinfo": {"info_kind": "vxlan",
                "info_data": {"id": 42, "remote": "10.77.2.2", "local": "10.77.1.2"}}},
            {"ifname": "t6", "mtu": 1450, "linkinfo": {"info_kind": "vxlan",
                "info_data": {"id": 43, "remote6": "fd77:2::2", "local6": "fd77:1::2"}}},
            {"ifname": "flannel.1", "mtu": 1450, "linkinfo": {"info_kind": "vxlan",
                "info_data": {"id": 1, "local": "10.0.0.5"}}}
        ])
    }

    #[test]
    fn matches_by_outer_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t = pick(&links(), None, ip("10.77.1.2"), ip("10.77.2.2"), || None).unwrap();
        assert_eq!((t.name.as_str(), t.overhead), ("t0", 50));
        let t = pick(&links(), None, ip("fd77:1::2"), ip("fd77:2::2"), || None).unwrap();
        assert_eq!((t.name.as_str(), t.overhead), ("t6", 70));
        let fdb = serde_json::json!([{"mac": "aa:bb:cc:dd:ee:ff", "ifname": "flannel.1", "dst": "10.0.0.9"}]);
        let t = pick(&links(), None, ip("10.0.0.5"), ip("10.0.0.9"), || Some(fdb)).unwrap();
        assert_eq!(
            (t.name.as_str(), t.matched_by),
            ("flannel.1", "forwarding entry to the remote")
        );
        let t = pick(&links(), None, ip("10.0.0.5"), ip("10.0.0.8"), || None).unwrap();
        assert_eq!(t.matched_by, "local address");
        assert!(pick(&links(), None, ip("10.1.1.1"), ip("10.2.2.2"), || None).is_none());
        // The inner packet of a tunnel that refused it: the device itself, and its remote.
        let t = pick(
            &links(),
            Some("t0"),
            ip("192.168.1.1"),
            ip("192.168.1.2"),
            || None,
        )
        .unwrap();
        assert_eq!((t.name.as_str(), t.remote), ("t0", Some(ip("10.77.2.2"))));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const LINKS: &str = include_str!("../../testdata/links.json");
        const FDB: &str = include_str!("../../testdata/fdb.json");
        const WORDS: &[&str] = &[
            "ifname",
            "mtu",
            "linkinfo",
            "info_kind",
            "info_data",
            "remote",
            "local",
            "remote6",
            "local6",
            "vxlan",
            "gre",
            "ipip",
            "wireguard",
            "geneve",
            "veth",
            "dst",
            "vx0",
            "vx1",
            "fz0",
            "10.250.1.2",
            "10.250.1.1",
            "10.250.1.9",
            "fd00::2",
        ];

        fn addr() -> impl Strategy<Value = IpAddr> {
            fuzz::addr(&["10.250.1.1", "10.250.1.2", "10.250.1.9", "fd00::2"])
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_json_never_panics(
                links in prop_oneof![fuzz::json(WORDS), fuzz::mutated_json(LINKS, WORDS)],
                fdb in prop_oneof![fuzz::json(WORDS), fuzz::mutated_json(FDB, WORDS)],
                dev in proptest::option::of(prop::sample::select(&["vx0", "vx1", "fz0", "x"][..])),
                src in addr(),
                dst in addr(),
            ) {
                pick(&links, dev, src, dst, || Some(fdb));
            }

            #[test]
            fn prop_the_real_devices_are_found(mtu in any::<u32>()) {
                let mut links: Value = serde_json::from_str(LINKS).unwrap();
                for l in links.as_array_mut().unwrap() {
                    l["mtu"] = mtu.into();
                }
                let fdb = || serde_json::from_str(FDB).ok();
                let ip = |s: &str| s.parse::<IpAddr>().unwrap();
                let t = pick(&links, None, ip("10.250.1.1"), ip("10.250.1.2"), fdb).unwrap();
                prop_assert_eq!((t.name.as_str(), t.mtu, t.overhead), ("vx0", mtu, 50));
                let t = pick(&links, None, ip("10.250.1.1"), ip("10.250.1.9"), fdb).unwrap();
                prop_assert_eq!((t.name.as_str(), t.matched_by), ("vx1", "forwarding entry to the remote"));
            }
        }
    }
}
