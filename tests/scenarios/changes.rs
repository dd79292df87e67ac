//! Who changed it: a setting changed while dropscope watches, then packets dropped because of
//! it. The change is reported on its own (key, old -> new, process and its parents) and the
//! drops it explains carry it in their evidence; changes elsewhere are not blamed, and with no
//! change the evidence says the setting has not moved since dropscope started.
//!
//! vm-test: core
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use dropscope_tests::{
    kubelet::Driver,
    iptables_rule_packets, nft_rule_packets, observer::temp_path,
    topology::B4,
    traffic::Udp,
    Kubelet, Netns, Nstat, Observer, Report, Topology,
};
use serde_json::Value;

use crate::{evidence, Expect};

/// A directory of links to system binaries under names of our choosing: the kernel names a
/// process after the file it executed, so `fwdkiller -w ...` is sysctl reported as
/// "fwdkiller". Removed on drop.
struct Aliases(PathBuf);

impl Aliases {
    fn new() -> Self {
        let dir = temp_path("dropscope-aliases");
        std::fs::create_dir_all(&dir).unwrap();
        Aliases(dir)
    }

    /// `name`, a link to the binary `program` found on PATH.
    fn link(&self, name: &str, program: &str) -> PathBuf {
        let target = which(program);
        let path = self.0.join(name);
        std::os::unix::fs::symlink(target, &path).unwrap();
        path
    }

    /// `name`, an executable shell script with `body`.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Aliases {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(program: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} not installed"))
}

/// The change records for `key`.
fn changes<'a>(report: &'a Report, key: &str) -> Vec<&'a Value> {
    report
        .records
        .iter()
        .filter(|r| r["type"] == "change" && r["key"] == key)
        .collect()
}

/// The one change record for `key` in namespace `ns`.
fn change<'a>(report: &'a Report, key: &str, ns: &Netns) -> &'a Value {
    let found: Vec<_> = changes(report, key)
        .into_iter()
        .filter(|r| r["netns"].as_u64() == Some(ns.inode()))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one change of {key} in {}; got {:#?}\nstderr: {}",
        ns.name,
        report.records,
        report.stderr
    );
    found[0]
}

#[test]
fn forwarding_turned_off_names_the_process_that_did_it() {
    let t = Topology::new();
    let decoy_ns = Netns::new("decoy");
    let bin = Aliases::new();
    let fwdkiller = bin.link("fwdkiller", "sysctl");
    let decoy = bin.link("decoy", "sysctl");
    let obs = Observer::start(&["--netns", &t.r.name]);
    let before = Nstat::read(&t.r);
    t.r.sh(&format!("{} -qw net.ipv4.ip_forward=0", fwdkiller.display()));
    // Changed later, but in another namespace and a setting these drops do not depend on.
    decoy_ns.sh(&format!("{} -qw net.ipv4.ip_forward=0", decoy.display()));
    t.r.sh(&format!(
        "{} -qw net.ipv4.tcp_syncookies=0",
        decoy.display()
    ));
    Udp::to(B4, 9500).count(3).send(&t.a);
    let report = obs.stop();
    let kernel = Nstat::delta(&t.r, &before, "IpInAddrErrors");

    let counted = Expect::routed(&t, "forwarding_disabled", 9500).check(&report);
    assert_eq!((counted, kernel), (3, 3));
    let c = change(&report, "net.ipv4.ip_forward", &t.r);
    assert_eq!((&c["kind"], &c["old"], &c["new"]), (&"sysctl".into(), &"1".into(), &"0".into()), "{c:#}");
    assert_eq!(c["process"]["comm"], "fwdkiller", "{c:#}");
    assert_eq!(c["netns_name"], t.r.name.as_str(), "{c:#}");
    // Writing ip_forward rewrites every device's forwarding: one change, not one per device.
    assert!(
        changes(&report, "net.ipv4.conf.all.forwarding").is_empty()
            && changes(&report, "net.ipv4.conf.r0.forwarding").is_empty(),
        "echoes of the ip_forward write reported: {:#?}",
        report.records
    );
    let ev = evidence(&report, "forwarding_disabled");
    assert!(
        ev.contains("net.ipv4.ip_forward changed 1 -> 0 at ") && ev.contains("by fwdkiller (pid "),
        "{ev}"
    );
    assert!(ev.contains(" before this drop"), "{ev}");
    assert!(!ev.contains("decoy"), "a change elsewhere was blamed: {ev}");
    // The decoy's namespace is not watched: its change is not reported either.
    assert!(
        changes(&report, "net.ipv4.ip_forward")
            .iter()
            .all(|r| r["netns"].as_u64() != Some(decoy_ns.inode())),
        "a change in an unwatched namespace was reported"
    );
    // The summary keeps the change with the cause.
    let detail = report.summary()["details"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["cause"] == "forwarding_disabled"))
        .expect("summary details of the cause");
    assert!(
        detail["changes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["key"] == "net.ipv4.ip_forward")),
        "summary: {detail:#}"
    );
}

#[test]
fn setting_unchanged_while_watched_says_so() {
    let t = Topology::new();
    t.r.sh("sysctl -qw net.ipv4.ip_forward=0");
    let obs = Observer::start(&["--netns", &t.r.name]);
    Udp::to(B4, 9501).count(2).send(&t.a);
    let report = obs.stop();
    Expect::routed(&t, "forwarding_disabled", 9501).check(&report);
    let ev = evidence(&report, "forwarding_disabled");
    assert!(ev.contains("unchanged since dropscope started at "), "{ev}");
    assert!(!ev.contains(" changed "), "{ev}");
}

#[test]
fn rp_filter_written_by_a_shell_names_the_shell() {
    let t = Topology::new();
    t.a.sh("ip addr add 10.231.9.2/32 dev a0");
    t.r.sh("ip route add 10.231.9.0/24 via 10.231.2.2");
    let old = t.r.sh("cat /proc/sys/net/ipv4/conf/all/rp_filter").trim().to_string();
    assert_ne!(old, "1", "namespace starts in strict mode");
    let bin = Aliases::new();
    let script = bin.script(
        "tighten-rpf",
        "echo 1 > /proc/sys/net/ipv4/conf/all/rp_filter",
    );
    let obs = Observer::start(&["--netns", &t.r.name]);
    let before = Nstat::read(&t.r);
    t.r.sh(&script.display().to_string());
    Udp::to(B4, 9502).from("10.231.9.2").count(2).send(&t.a);
    let report = obs.stop();
    let kernel = Nstat::delta(&t.r, &before, "TcpExtIPReversePathFilter");
    let e = Expect {
        src: "10.231.9.2",
        ..Expect::routed(&t, "rp_filter", 9502)
    };
    assert_eq!((e.check(&report), kernel), (2, 2));
    let c = change(&report, "net.ipv4.conf.all.rp_filter", &t.r);
    // A script runs under its own name; the write is the shell's.
    assert_eq!(c["process"]["comm"], "tighten-rpf", "{c:#}");
    assert_eq!((&c["old"], &c["new"]), (&old.as_str().into(), &"1".into()));
    let ev = evidence(&report, "rp_filter");
    assert!(
        ev.contains(&format!("net.ipv4.conf.all.rp_filter changed {old} -> 1 at "))
            && ev.contains("by tighten-rpf (pid "),
        "{ev}"
    );
}

#[test]
fn nft_rule_added_by_a_renamed_nft_names_it() {
    let t = Topology::new();
    let bin = Aliases::new();
    let policyd = bin.link("fwpolicyd", "nft");
    let obs = Observer::start(&["--netns", &t.r.name]);
    t.r.sh(&format!(
        "{p} add table inet dsguard; \
         {p} add chain inet dsguard guarded '{{ type filter hook forward priority 0; }}'; \
         {p} add rule inet dsguard guarded udp dport 9503 counter drop comment guard",
        p = policyd.display()
    ));
    Udp::to(B4, 9503).count(4).send(&t.a);
    let report = obs.stop();
    let kernel = nft_rule_packets(&t.r, "guard");
    assert_eq!(
        (
            Expect::routed(&t, "netfilter_drop", 9503).check(&report),
            kernel
        ),
        (4, 4)
    );
    let recs = changes(&report, "nftables.inet dsguard");
    assert!(!recs.is_empty(), "{:#?}", report.records);
    assert!(
        recs.iter().all(|c| c["process"]["comm"] == "fwpolicyd"),
        "{recs:#?}"
    );
    assert!(
        recs.iter().any(|c| c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("udp dport 9503"))),
        "the rule text is in the change: {recs:#?}"
    );
    let ev = evidence(&report, "netfilter_drop");
    assert!(
        ev.contains("nftables.inet dsguard changed at ") && ev.contains("by fwpolicyd (pid "),
        "{ev}"
    );
}

#[test]
fn iptables_legacy_replaced_by_a_script_names_script_and_binary() {
    let t = Topology::new();
    if t.r.try_sh("iptables-legacy -L -n").status.code() != Some(0) {
        panic!("iptables-legacy is required: the product attributes legacy rules");
    }
    let bin = Aliases::new();
    let agent = bin.script(
        "policy-agent",
        "iptables-legacy -A FORWARD -p udp --dport 9504 -j DROP\nexit $?",
    );
    let obs = Observer::start(&["--netns", &t.r.name]);
    t.r.sh(&agent.display().to_string());
    Udp::to(B4, 9504).count(3).send(&t.a);
    let report = obs.stop();
    let kernel = iptables_rule_packets(&t.r, "iptables-legacy", "--dport 9504");
    assert_eq!(
        (
            Expect::routed(&t, "netfilter_drop", 9504).check(&report),
            kernel
        ),
        (3, 3)
    );
    let c = change(&report, "iptables-legacy.ip filter", &t.r);
    assert_eq!(c["process"]["comm"], "iptables-legacy", "{c:#}");
    let parents = c["parents"].to_string();
    assert!(parents.contains("policy-agent"), "{c:#}");
    let ev = evidence(&report, "netfilter_drop");
    assert!(
        ev.contains("iptables-legacy.ip filter changed at ")
            && ev.contains("by iptables-legacy (pid ")
            && ev.contains("<- policy-agent (pid "),
        "{ev}"
    );
}

#[test]
fn mtu_lowered_is_dated_with_old_and_new() {
    let t = Topology::new();
    let obs = Observer::start(&["--netns", &t.r.name]);
    let before = Nstat::read(&t.r);
    t.r.sh("ip link set r1 mtu 1280");
    t.a.sh("ip route flush cache");
    Udp::to(B4, 9505)
        .payload(1400)
        .dont_fragment()
        .count(2)
        .send(&t.a);
    let report = obs.stop();
    let kernel = Nstat::delta(&t.r, &before, "IpFragFails");
    assert_eq!(
        (
            Expect::routed(&t, "mtu_exceeded", 9505).check(&report),
            kernel
        ),
        (2, 2)
    );
    let c = change(&report, "link.r1.mtu", &t.r);
    assert_eq!((&c["kind"], &c["old"], &c["new"]), (&"link".into(), &"1500".into(), &"1280".into()), "{c:#}");
    let ev = evidence(&report, "mtu_exceeded");
    assert!(ev.contains("link.r1.mtu changed 1500 -> 1280 at "), "{ev}");
}

#[test]
fn sysctl_written_from_a_pod_names_the_pod() {
    let t = Topology::new();
    let mut k = Kubelet::new();
    // A privileged agent pod sharing R's network namespace, like a CNI or proxy DaemonSet.
    let pod = k.run_pod(&t.r, "kube-system", "net-tuner", &["tuner"], Driver::Systemd, true);
    let bin = Aliases::new();
    let tuner = bin.link("tuner", "sysctl");
    let obs = Observer::start(&["--netns", &t.r.name, "--pods-root", k.root_arg()]);
    k.exec(&t.r, &pod, "tuner", &tuner, &["-qw", "net.ipv4.ip_forward=0"]);
    Udp::to(B4, 9506).count(2).send(&t.a);
    let report = obs.stop();
    Expect::routed(&t, "forwarding_disabled", 9506).check(&report);
    let c = change(&report, "net.ipv4.ip_forward", &t.r);
    assert_eq!(
        (&c["pod_namespace"], &c["pod"], &c["container"]),
        (&"kube-system".into(), &"net-tuner".into(), &"tuner".into()),
        "{c:#}"
    );
    let ev = evidence(&report, "forwarding_disabled");
    assert!(ev.contains("pod kube-system/net-tuner"), "{ev}");
}

#[test]
fn serve_counts_and_logs_changes() {
    let t = Topology::new();
    let addr = format!("127.0.0.1:{}", dropscope_tests::http::free_port());
    let obs = Observer::serve(&["--netns", &t.r.name, "--metrics", &addr]);
    t.r.sh("sysctl -qw net.ipv4.conf.all.rp_filter=1; ip link set r1 mtu 1400");
    let series = |kind: &str| {
        let (_, body) = dropscope_tests::http::get(&format!("http://{addr}/metrics"), &[])
            .expect("metrics endpoint answers");
        dropscope_tests::http::sample(&body, "dropscope_changes_total", &[("kind", kind)])
    };
    dropscope_tests::wait_for("the changes to be counted", 10.0, || {
        series("sysctl") == Some(1.0) && series("link") == Some(1.0)
    });
    let report = obs.stop();
    let logged: Vec<_> = report
        .records
        .iter()
        .filter(|r| r["type"] == "change")
        .map(|r| r["key"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(logged, ["net.ipv4.conf.all.rp_filter", "link.r1.mtu"], "{:#?}", report.records);
}
