//! Faults on a real node: the agent killed, crashed or stopped; tracefs, BTF or the firewall
//! tools missing; a ring buffer that overflows; a namespace deleted while its evidence is
//! read; hostile HTTP clients against `serve`; an observe loop that stops ticking.
use std::{
    collections::HashSet,
    fs,
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use dropscope_tests::{
    http::{free_port, get},
    iptables_rule_packets, nft_rule_packets,
    observer::{binary, temp_path},
    process, udp_no_ports, wait_for, Netns, Observer,
};
use nix::sys::signal::Signal;
use serde_json::Value;

// ---- What is attached: programs and links, from the kernel's point of view. ----

/// IDs of the BPF objects (`key` = "prog_id" or "link_id") process `pid` holds.
fn held(pid: u32, key: &str) -> HashSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(':')
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .collect()
}

/// IDs bpftool lists (`what` = "prog" or "link").
fn listed(what: &str) -> HashSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .expect("bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The cgroup v2 root, where dropscope attaches its sysctl program.
fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// Programs attached to the cgroup v2 root (a program attached without a link stays there
/// after its process is gone).
fn attached_to_root_cgroup() -> HashSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup2_root())
        .output()
        .expect("bpftool cgroup show");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Programs loaded now that no process holds, directly or through a link.
fn unheld_programs() -> HashSet<u64> {
    let mut holders = HashSet::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            holders.extend(held(pid, "prog_id"));
        }
    }
    &listed("prog") - &holders
}

/// What one dropscope holds in the kernel.
struct Attached {
    progs: HashSet<u64>,
    links: HashSet<u64>,
}

impl Attached {
    fn of(pid: u32) -> Self {
        let a = Attached {
            progs: held(pid, "prog_id"),
            links: held(pid, "link_id"),
        };
        assert!(a.progs.len() >= 3, "programs {:?}", a.progs);
        assert!(a.links.len() >= 3, "links {:?}", a.links);
        // bpftool sees them (the comparison below means something).
        assert!(a.progs.is_subset(&listed("prog")));
        assert!(a.links.is_subset(&listed("link")));
        a
    }

    /// Waits for the kernel to let go of all of it (programs go after an RCU grace period),
    /// and for no program loaded since `before` to be left without an owner.
    fn assert_released(&self, before: &HashSet<u64>, after: &str) {
        let mut left = String::new();
        wait_for(
            &format!("the kernel to release dropscope's programs and links after {after}"),
            10.0,
            || {
                let progs: Vec<_> = self.progs.intersection(&listed("prog")).copied().collect();
                let links: Vec<_> = self.links.intersection(&listed("link")).copied().collect();
                let cgroup: Vec<_> = self
                    .progs
                    .intersection(&attached_to_root_cgroup())
                    .copied()
                    .collect();
                let orphans: Vec<_> = unheld_programs().difference(before).copied().collect();
                left = format!("programs {progs:?}, links {links:?}, on the root cgroup {cgroup:?}, new programs nobody holds {orphans:?}");
                progs.is_empty() && links.is_empty() && cgroup.is_empty() && orphans.is_empty()
            },
        );
        eprintln!("after {after}: {left}");
    }
}

fn quiet_namespace() -> Netns {
    Netns::new("f")
}

#[test]
fn sigkill_leaves_no_program_or_link_behind() {
    let ns = quiet_namespace();
    let before = listed("prog");
    let obs = Observer::start(&["--netns", &ns.name]);
    let attached = Attached::of(obs.pid());
    let status = obs.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    attached.assert_released(&before, "SIGKILL");
}

#[test]
fn sigterm_leaves_no_program_or_link_behind() {
    let ns = quiet_namespace();
    let before = listed("prog");
    let obs = Observer::start(&["--netns", &ns.name]);
    let attached = Attached::of(obs.pid());
    let report = obs.stop_with(Signal::SIGTERM);
    assert!(report.status.success(), "{}", report.stderr);
    report.summary();
    attached.assert_released(&before, "SIGTERM");
}

#[test]
fn a_panic_leaves_no_program_or_link_behind() {
    let ns = quiet_namespace();
    let before = listed("prog");
    // The loop panics two seconds after attaching (a hidden switch for this test only).
    let obs = Observer::start_wrapped(&["env", "DROPSCOPE_FAULT=panic@2"], &["--netns", &ns.name]);
    let attached = Attached::of(obs.pid());
    let (status, _, stderr) = obs.wait_exit(30.0);
    assert_eq!(status.code(), Some(101), "a panic: {stderr}");
    assert!(stderr.contains("DROPSCOPE_FAULT=panic"), "{stderr}");
    attached.assert_released(&before, "a panic");
}

// ---- tracefs ----

/// Runs the rest of the command line in a private mount namespace without tracefs (and
/// without debugfs, whose tracing directory would mount it on access).
const NO_TRACEFS: &str = "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; \
     umount /sys/kernel/tracing 2>/dev/null; \
     if grep -q ' - tracefs ' /proc/self/mountinfo; then echo 'tracefs still mounted' >&2; exit 97; fi; \
     exec \"$@\"";

fn no_tracefs(then: &[&'static str]) -> Vec<&'static str> {
    let mut w = vec![
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        NO_TRACEFS,
        "sh",
    ];
    w.extend_from_slice(then);
    w
}

/// Without SYS_ADMIN nothing can be mounted (BPF and PERFMON stay).
const NO_SYS_ADMIN: [&str; 5] = [
    "setpriv",
    "--bounding-set",
    "-sys_admin",
    "--inh-caps",
    "-sys_admin",
];

/// UDP to a closed port in `ns`: (port, UdpNoPorts that grew).
fn closed_port_drops(ns: &Netns, port: u16, count: usize) -> u64 {
    let before = ns.run(udp_no_ports);
    ns.run(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..count {
            let _ = s.send_to(b"x", ("127.0.0.1", port));
        }
    });
    let mut grew = 0;
    wait_for("UdpNoPorts to count the datagrams", 10.0, || {
        grew = ns.run(udp_no_ports) - before;
        grew >= count as u64
    });
    grew
}

fn probe<'a>(attach: &'a Value, name: &str) -> &'a Value {
    attach["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["probe"] == name)
        .unwrap_or_else(|| panic!("no probe {name}: {attach}"))
}

#[test]
fn without_tracefs_dropscope_mounts_it_for_itself_only() {
    let ns = quiet_namespace();
    let host_tracefs = |pid: &str| {
        fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - tracefs "))
            .count()
    };
    let on_host = host_tracefs("self");
    let obs = Observer::start_wrapped(&no_tracefs(&[]), &["--netns", &ns.name]);
    let pid = obs.pid().to_string();
    assert!(
        host_tracefs(&pid) >= 1,
        "dropscope mounted tracefs in its namespace"
    );
    let sent = closed_port_drops(&ns, 9601, 3);
    let report = obs.stop();
    report.assert_consistent();
    assert_eq!(
        probe(report.attach(), "xt_replace")["mode"],
        "tracepoint",
        "the classic tracepoints work on the tracefs it mounted"
    );
    assert_eq!(report.count("no_listener"), sent);
    assert_eq!(
        host_tracefs("self"),
        on_host,
        "the host's mounts are untouched"
    );
}

#[test]
fn without_tracefs_and_unable_to_mount_it_dropscope_says_why() {
    let ns = quiet_namespace();
    let wrapper = no_tracefs(&NO_SYS_ADMIN);
    let obs = Observer::start_wrapped(&wrapper, &["--netns", &ns.name]);
    let sent = closed_port_drops(&ns, 9602, 3);
    let report = obs.stop();
    report.assert_consistent();
    let attach = report.attach();
    // The drop probes need no tracefs; what does says so.
    assert_eq!(probe(attach, "kfree_skb")["mode"], "tp_btf");
    let xt = probe(attach, "xt_replace");
    assert_eq!(xt["mode"], "unavailable", "{xt}");
    assert!(xt["note"].as_str().unwrap().contains("tracefs"), "{xt}");
    assert_eq!(report.count("no_listener"), sent, "causes are still named");

    // Asked for the classic tracepoints, which need it: one clear line, exit status 1.
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..]).arg(binary()).args([
        "--attach",
        "tracepoint",
        "--netns",
        &ns.name,
        "--duration",
        "1",
    ]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("tracefs is not mounted and mounting it failed"),
        "{err}"
    );
}

// ---- BTF ----

#[test]
fn unreadable_btf_is_one_line_and_leaves_nothing_attached() {
    let dir = temp_path("dropscope-btf");
    fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty");
    fs::write(&empty, b"").unwrap();
    let garbage = dir.join("garbage");
    fs::write(
        &garbage,
        (0..8192u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let before = listed("prog");
    for file in [&empty, &garbage] {
        let script = format!(
            "mount --bind {} /sys/kernel/btf/vmlinux && exec \"$@\"",
            file.display()
        );
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
            .arg(binary())
            .args(["--netns", "1", "--duration", "5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", file.display());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("BTF"), "{err}");
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    wait_for("no new program left without an owner", 10.0, || {
        unheld_programs().difference(&before).next().is_none()
    });
    let _ = fs::remove_dir_all(dir);
}

// ---- Firewall tools missing ----

/// A directory of links to every program on the usual PATH except those whose names start
/// with one of `without`.
fn path_without(without: &[&str]) -> PathBuf {
    let dir = temp_path("dropscope-path");
    fs::create_dir_all(&dir).unwrap();
    for from in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        for e in fs::read_dir(from).into_iter().flatten().flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if without.iter().any(|w| n.starts_with(w)) || dir.join(&name).exists() {
                continue;
            }
            let _ = symlink(e.path(), dir.join(&name));
        }
    }
    dir
}

/// A namespace with a native nftables rule (UDP 9711) and an iptables-legacy rule (UDP 9712)
/// dropping input; sends 3 datagrams to each.
fn two_engines() -> Netns {
    let ns = quiet_namespace();
    ns.sh(
        "nft add table inet nt && nft add chain inet nt in '{ type filter hook input priority 0; }' && \
         nft add rule inet nt in udp dport 9711 counter drop comment '\"native\"' && \
         iptables-legacy -A INPUT -p udp --dport 9712 -j DROP",
    );
    ns
}

fn send_to_both(ns: &Netns) {
    ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for port in [9711u16, 9712] {
            for _ in 0..3 {
                let _ = s.send_to(b"x", ("127.0.0.1", port));
            }
        }
    });
    wait_for("the rules to count the datagrams", 10.0, || {
        nft_rule_packets(ns, "native") == 3
            && iptables_rule_packets(ns, "iptables-legacy", "--dport 9712") == 3
    });
}

fn records_to(report: &dropscope_tests::Report, port: u16) -> Vec<&Value> {
    report
        .drops()
        .into_iter()
        .filter(|r| r["dport"] == port)
        .collect()
}

/// Packets the records stand for.
fn packets(records: &[Value]) -> u64 {
    records.iter().map(|r| r["count"].as_u64().unwrap()).sum()
}

/// Watches `two_engines` with a PATH that has no program whose name starts with one of
/// `without`: the records of the drops to 9711 (native nftables) and to 9712
/// (iptables-legacy), each adding up to the rule's 3 packets.
fn observe_without(without: &[&str]) -> (Vec<Value>, Vec<Value>) {
    let ns = two_engines();
    let path = path_without(without);
    let env_path = format!("PATH={}", path.display());
    let obs = Observer::start_wrapped(&["env", &env_path], &["--netns", &ns.name]);
    send_to_both(&ns);
    let report = obs.stop();
    let _ = fs::remove_dir_all(path);
    report.assert_consistent();
    assert!(report.stderr.is_empty(), "{}", report.stderr);
    let to = |port| -> Vec<Value> { records_to(&report, port).into_iter().cloned().collect() };
    let (native, legacy) = (to(9711), to(9712));
    assert_eq!(packets(&native), 3, "{native:#?}");
    assert_eq!(packets(&legacy), 3, "{legacy:#?}");
    (native, legacy)
}

#[test]
fn without_the_firewall_tools_causes_are_named_and_the_rule_says_what_was_not_read() {
    let (native, legacy) = observe_without(&[
        "nft",
        "iptables",
        "ip6tables",
        "xtables",
        "arptables",
        "ebtables",
    ]);
    for r in &native {
        // nftables rules are read from the kernel over netlink: no tool is needed.
        assert_eq!(r["cause"], "netfilter_drop", "{r:#}");
        let rule = r["rule"].as_str().unwrap_or("");
        assert!(rule.contains("comment \"native\""), "{r:#}");
    }
    for r in &legacy {
        // x_tables is read only by its tool: no rule is named, and the evidence says why.
        assert!(r["rule"].is_null(), "{r:#}");
        assert_eq!(r["cause"], "netfilter_unidentified", "{r:#}");
        let evidence = r["evidence"].as_str().unwrap();
        assert!(!evidence.contains("no rule counter moved"), "{r:#}");
        assert!(evidence.contains("iptables-legacy-save not found"), "{r:#}");
    }
}

#[test]
fn without_nft_every_rule_is_still_named() {
    let (native, legacy) = observe_without(&["nft"]);
    for r in &native {
        assert_eq!(r["cause"], "netfilter_drop", "{r:#}");
        let rule = r["rule"].as_str().unwrap_or("");
        assert!(rule.contains("comment \"native\""), "{r:#}");
    }
    for r in &legacy {
        assert_eq!(r["cause"], "netfilter_drop", "{r:#}");
        let rule = r["rule"].as_str().unwrap_or("");
        assert!(rule.contains("--dport 9712 -j DROP"), "{r:#}");
    }
}

// ---- Ring buffer overflow ----

#[test]
fn an_overflowing_ring_buffer_keeps_exact_totals() {
    let ns = quiet_namespace();
    ns.sh(
        "nft add table inet st && nft add chain inet st in '{ type filter hook input priority 0; }' && \
         nft add rule inet st in udp dport 9720 counter drop comment '\"storm\"'",
    );
    // --sample 0 sends every drop. dropscope is stopped (SIGSTOP) while a storm larger than
    // the ring (16384 events) arrives, as a consumer that cannot keep up would be: the rest of
    // the storm finds the ring full. Two kinds of drop: a firewall rule and a closed port.
    let obs = Observer::start(&["--netns", &ns.name, "--sample", "0"]);
    let pid = nix::unistd::Pid::from_raw(obs.pid() as i32);
    let before = ns.run(udp_no_ports);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..25_000 {
            for port in [9720u16, 9721] {
                let _ = s.send_to(b"x", ("127.0.0.1", port));
            }
        }
    });
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    let nft = nft_rule_packets(&ns, "storm");
    let no_ports = ns.run(udp_no_ports) - before;
    let report = obs.stop();
    assert!(report.status.success(), "{}", report.stderr);
    let s = report.summary();
    assert!(
        s["lost"].as_u64().unwrap() > 0,
        "the storm did not overflow the ring: {s}"
    );
    assert_eq!(s["counts_exact"], true, "{s}");
    // Per kind: the lost events are reported as records of their cause, the records add up
    // to the kernel's counters, and the summary counts the lost ones per cause.
    let mut lost_drops = 0;
    for (port, cause, kernel) in [
        (9720u16, "netfilter_drop", nft),
        (9721, "no_listener", no_ports),
    ] {
        let records = records_to(&report, port);
        assert!(records.iter().all(|r| r["cause"] == cause), "{records:#?}");
        let total: u64 = records.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        assert_eq!(
            total, kernel,
            "{cause}: drops reported vs the kernel's counter"
        );
        assert_eq!(s["causes"][cause], kernel, "{s}");
        let lost: u64 = records
            .iter()
            .filter(|r| r["lost"] == true)
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        assert!(lost > 0, "{cause}: no lost record");
        assert_eq!(s["lost_by_cause"][cause], lost, "{s}");
        lost_drops += lost;
    }
    // The kernel's total also counts lost answers (ICMP errors) that are no drops.
    assert!(lost_drops <= s["lost"].as_u64().unwrap(), "{s}");
}

// ---- A namespace deleted while its evidence is read ----

/// A stand-in for `tool` that, once `armed` exists, says so in `started` and waits (at most
/// 30 s) for namespace `ns` to be deleted before running the real tool, which it does from
/// inside the namespace dropscope entered for it.
fn slow_tool(dir: &Path, tool: &str, armed: &Path, started: &Path, ns: &str) {
    let real = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap();
    let script = format!(
        "#!/bin/sh\nif [ -e {armed} ]; then\n  rm -f {armed}; touch {started}\n  \
         i=0; while [ -e /run/netns/{ns} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\nfi\n\
         exec {real} \"$@\"\n",
        armed = armed.display(),
        started = started.display(),
        real = real.display()
    );
    let path = dir.join(tool);
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_namespace_deleted_while_its_evidence_is_read_keeps_its_drops() {
    let ns = quiet_namespace();
    ns.sh(
        "nft add table inet gone && nft add chain inet gone in '{ type filter hook input priority 0; }' && \
         nft add rule inet gone in udp dport 9730 counter drop comment '\"gone\"'",
    );
    let (name, inode) = (ns.name.clone(), ns.inode());
    let dir = temp_path("dropscope-slow");
    fs::create_dir_all(&dir).unwrap();
    let (armed, started) = (dir.join("armed"), dir.join("started"));
    slow_tool(&dir, "iptables-nft-save", &armed, &started, &name);
    let env_path = format!("PATH={}:{}", dir.display(), std::env::var("PATH").unwrap());
    let obs = Observer::start_wrapped(&["env", &env_path], &["--netns", &name]);
    fs::write(&armed, b"").unwrap();
    // A new ruleset generation: the next read is a full one, through the stand-in (an
    // unchanged nftables ruleset is re-read over netlink, without the tools).
    ns.sh("nft add table inet bump");
    // A firewall drop: reading its rule counters blocks in the stand-in...
    ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = s.send_to(b"x", ("127.0.0.1", 9730));
    });
    wait_for("dropscope to read the rule counters", 20.0, || {
        started.exists()
    });
    // ... while more drops queue up behind it, explained only after the namespace is gone.
    let no_ports = closed_port_drops(&ns, 9731, 4);
    let nft = nft_rule_packets(&ns, "gone");
    drop(ns);
    let began = Instant::now();
    let report = obs.stop();
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "stopping took {:?}",
        began.elapsed()
    );
    report.assert_consistent();
    assert!(report.stderr.is_empty(), "{}", report.stderr);
    for (port, cause, kernel) in [
        (9730u16, "netfilter_drop", nft),
        (9731, "no_listener", no_ports),
    ] {
        let recs = records_to(&report, port);
        assert_eq!(
            recs.iter()
                .map(|r| r["count"].as_u64().unwrap())
                .sum::<u64>(),
            kernel,
            "{recs:#?}"
        );
        for r in &recs {
            assert_eq!(r["cause"], cause, "{r:#}");
            assert_eq!(r["netns"], inode, "{r:#}");
        }
    }
    let _ = fs::remove_dir_all(dir);
}

// ---- serve against hostile clients, and a stuck loop ----

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `request` and reads the status line of the answer; `None` if the connection was
/// closed without one.
fn status_of(addr: &str, request: &[u8]) -> Option<u16> {
    let mut s = connect(addr);
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Whether the server closed `s` (EOF or reset), waiting at most the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[test]
fn serve_survives_hostile_http() {
    let ns = quiet_namespace();
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&["--netns", &ns.name, "--metrics", &addr]);
    let pid = obs.pid();
    let metrics = format!("http://{addr}/metrics");
    let scrape_ok = || {
        get(&metrics, &[])
            .is_some_and(|(code, body)| code == 200 && body.contains("dropscope_build_info"))
    };
    assert!(scrape_ok());
    let (fds0, rss0) = (process::fds(pid).len(), process::rss_kib(pid));

    // Requests no one should send.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    assert!(
        matches!(
            status_of(&addr, huge.as_bytes()),
            // The answer, or a reset if it came while the rest was still being sent.
            None | Some(431)
        ),
        "huge headers"
    );
    let many = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-A: b\r\n".repeat(5000)
    );
    assert!(
        matches!(status_of(&addr, many.as_bytes()), None | Some(431)),
        "many headers"
    );
    assert_eq!(
        status_of(
            &addr,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ),
        Some(404)
    );
    assert_eq!(status_of(&addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"), Some(405));
    assert_eq!(
        status_of(&addr, b"BREW /metrics HTCPCP/1.0\r\n\r\n"),
        Some(400)
    );
    assert_eq!(
        status_of(
            &addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"
        ),
        Some(400)
    );
    assert!(scrape_ok());

    // Slowloris: connections that send a request a byte at a time, and connections that
    // send nothing at all, far more of them than the endpoint serves at once.
    let mut slow: Vec<TcpStream> = (0..150).map(|_| connect(&addr)).collect();
    let mut idle: Vec<TcpStream> = (0..600).map(|_| connect(&addr)).collect();
    let started = Instant::now();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(8) {
        for s in &mut slow {
            let _ = s.write_all(&request[sent % request.len()..][..1]);
        }
        sent += 1;
        // A normal client keeps being answered meanwhile.
        assert!(scrape_ok(), "a scrape failed under a slowloris");
        assert_eq!(
            get(&format!("http://{addr}/healthz"), &[]).map(|r| r.0),
            Some(200)
        );
        // At most 32 connections, and a few descriptors that come and go.
        let fds = process::fds(pid).len();
        assert!(
            fds <= fds0 + 40,
            "dropscope holds {fds} descriptors (at rest {fds0})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The endpoint closes what does not finish its request in time.
    let (mut closed, mut total) = (0, 0);
    for s in slow.iter_mut().chain(idle.iter_mut()).take(200) {
        total += 1;
        closed += usize::from(closed_by_server(s));
    }
    assert_eq!(closed, total, "connections left open by the endpoint");
    drop(slow);
    drop(idle);
    wait_for("descriptors back to rest", 10.0, || {
        process::fds(pid).len() <= fds0 + 2
    });
    let rss = process::rss_kib(pid);
    assert!(rss < rss0 + 16 * 1024, "RSS grew from {rss0} to {rss} KiB");
    assert!(scrape_ok());
    let report = obs.stop_with(Signal::SIGTERM);
    assert!(report.status.success(), "{}", report.stderr);
}

#[test]
fn healthz_turns_unhealthy_while_the_loop_is_stuck() {
    let ns = quiet_namespace();
    let addr = format!("127.0.0.1:{}", free_port());
    // The loop stalls for 9 s, one second after attaching (a hidden switch for this test);
    // with --interval 0.1 the threshold is its floor, 5 s.
    let obs = Observer::serve_wrapped(
        &["env", "DROPSCOPE_FAULT=stall=9@1"],
        &["--netns", &ns.name, "--metrics", &addr, "--interval", "0.1"],
    );
    let healthz = format!("http://{addr}/healthz");
    assert_eq!(
        get(&healthz, &[]).map(|r| r.0),
        Some(200),
        "healthy while ticking"
    );
    let mut answer = None;
    wait_for("/healthz to report the stuck loop", 15.0, || {
        answer = get(&healthz, &[]);
        answer.as_ref().is_some_and(|r| r.0 == 503)
    });
    let body = answer.unwrap().1;
    assert!(body.contains("has not ticked"), "{body}");
    // The endpoint itself still answers.
    assert_eq!(
        get(&format!("http://{addr}/metrics"), &[]).map(|r| r.0),
        Some(200)
    );
    wait_for(
        "/healthz to recover once the loop ticks again",
        20.0,
        || get(&healthz, &[]).is_some_and(|r| r.0 == 200),
    );
    let report = obs.stop_with(Signal::SIGTERM);
    assert!(report.status.success(), "{}", report.stderr);
}
