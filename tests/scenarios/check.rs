//! `dropscope check`: findings from configuration alone, no traffic.
use std::process::Command;

use dropscope_tests::{observer::binary, Netns, Topology};
use serde_json::Value;

/// Runs `dropscope check --format json` on the given namespaces: (exit code, findings).
fn check(namespaces: &[&Netns]) -> (i32, Vec<Value>) {
    let mut cmd = Command::new(binary());
    cmd.args(["check", "--format", "json"]);
    for ns in namespaces {
        cmd.args(["--netns", &ns.name]);
    }
    let out = cmd.output().expect("run dropscope check");
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let summary = records.last().expect("summary");
    assert_eq!(
        summary["type"],
        "check_summary",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        summary["namespaces"].as_u64(),
        Some(namespaces.len() as u64)
    );
    let findings = records
        .iter()
        .filter(|r| r["type"] == "finding")
        .cloned()
        .collect();
    (out.status.code().unwrap(), findings)
}

fn find<'a>(findings: &'a [Value], check: &str, ns: &Netns) -> Vec<&'a Value> {
    findings
        .iter()
        .filter(|f| f["check"] == check && f["netns"].as_u64() == Some(ns.inode()))
        .collect()
}

#[test]
fn a_healthy_topology_has_no_problems() {
    let t = Topology::new();
    let (code, findings) = check(&[&t.a, &t.r, &t.b]);
    assert!(
        findings.iter().all(|f| f["severity"] != "problem"),
        "{findings:#?}"
    );
    assert_eq!(code, 0);
}

#[test]
fn rules_in_both_engines_are_a_split_brain() {
    let t = Topology::new();
    t.r.sh("iptables-legacy -A FORWARD -p tcp --dport 22 -j DROP; nft add table inet fw; \
            nft add chain inet fw f '{ type filter hook forward priority 0; }'; nft add rule inet fw f udp dport 53 drop");
    let (code, findings) = check(&[&t.r, &t.b]);
    let hits = find(&findings, "split_brain", &t.r);
    assert_eq!(hits.len(), 1, "{findings:#?}");
    assert_eq!(hits[0]["severity"], "problem");
    assert!(hits[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("1 iptables-legacy rules and 1 nftables rules"));
    assert!(find(&findings, "split_brain", &t.b).is_empty());
    assert_eq!(code, 3, "problems found -> exit status 3");
}

#[test]
fn mismatched_veth_mtu_and_device_forwarding_are_found() {
    let t = Topology::new();
    t.r.sh("ip link set r0 mtu 1280; sysctl -qw net.ipv4.conf.r1.forwarding=0 net.ipv4.conf.all.rp_filter=1");
    let (code, findings) = check(&[&t.a, &t.r, &t.b]);
    assert_eq!(code, 3);
    let veth = find(&findings, "veth_mtu_mismatch", &t.a);
    assert_eq!(
        veth.len(),
        1,
        "reported once, on the larger end: {findings:#?}"
    );
    let msg = veth[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("a0")
            && msg.contains("MTU 1500")
            && msg.contains("r0")
            && msg.contains("MTU 1280"),
        "{msg}"
    );
    assert!(veth[0]["fix"].as_str().unwrap().starts_with(&format!(
        "ip netns exec {} ip link set dev a0 mtu 1280",
        t.a.name
    )));
    let fwd = find(&findings, "forwarding", &t.r);
    assert!(
        fwd.iter()
            .any(|f| f["subject"] == "r1" && f["severity"] == "problem"),
        "{fwd:#?}"
    );
    let rp = find(&findings, "rp_filter", &t.r);
    assert_eq!(rp.len(), 2, "strict on both of R's interfaces: {rp:#?}");
    // A and B have a single interface: nothing to route, no forwarding/rp_filter findings.
    assert!(
        find(&findings, "forwarding", &t.a).is_empty()
            && find(&findings, "rp_filter", &t.b).is_empty()
    );
}

#[test]
fn vxlan_larger_than_its_underlay_is_found() {
    let t = Topology::new();
    // Without a lower device the kernel does not police the MTU: the default route tells.
    t.b.sh(
        "ip link add vx0 type vxlan id 7 dstport 4789 local 10.231.2.2; ip link set vx0 mtu 1500",
    );
    let (_, findings) = check(&[&t.b]);
    let hits = find(&findings, "overlay_mtu", &t.b);
    assert_eq!(hits.len(), 1, "{findings:#?}");
    assert!(hits[0]["fix"]
        .as_str()
        .unwrap()
        .ends_with("ip link set dev vx0 mtu 1450"));
}
