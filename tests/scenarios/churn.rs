//! Namespace churn on a busy node: 200 network namespaces created and deleted in waves while
//! packets drop inside them, dropscope watching every namespace. Its descriptors, threads and
//! memory must not grow from wave to wave (a monitor socket or a thread left in a deleted
//! namespace would also keep that namespace alive), and drops from namespaces that are gone
//! keep their namespace and cause, against the kernel's counters read before deletion.
use std::{collections::HashSet, fs, net::UdpSocket, os::unix::fs::MetadataExt, time::Instant};

use dropscope_tests::{
    http::{free_port, get, sample},
    nft_rule_packets, process, udp_no_ports, wait_for, Netns, Observer, Report,
};
use nix::sys::signal::Signal;

const WAVES: usize = 20;
const PER_WAVE: usize = 10;
/// Packets of each kind per namespace.
const PACKETS: usize = 3;
/// Churn packets go to an address of 127.77/16 (all of 127/8 is local on `lo`), one per test,
/// so a kernel-side `--dst` filter keeps other tests' drops out while every namespace is
/// still watched.
const JSON_DST: &str = "127.77.0.1";
const SERVE_DST: &str = "127.77.0.2";

/// A namespace of the churn, after its deletion: what the kernel counted in it.
struct Gone {
    name: String,
    inode: u64,
    /// UDP to this port found no socket (no_listener); `no_ports` is UdpNoPorts.
    closed_port: u16,
    no_ports: u64,
    /// UDP to this port was dropped by an nftables rule; `nft_drops` is its counter.
    drop_port: u16,
    nft_drops: u64,
}

/// dropscope's resources once it has settled after a wave.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Open descriptors, leaving out sockets in other live namespaces (monitors of namespaces
    /// other tests create meanwhile).
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

/// One namespace of the churn: an nftables rule dropping UDP to `drop_port`.
fn build(drop_port: u16) -> Netns {
    let ns = Netns::new("c");
    ns.sh(&format!(
        "nft add table inet churn && \
         nft add chain inet churn in '{{ type filter hook input priority 0; }}' && \
         nft add rule inet churn in udp dport {drop_port} counter drop comment '\"churn{drop_port}\"'"
    ));
    ns
}

/// Sends the namespace's drops and waits until the kernel has counted them all.
fn drop_packets(ns: &Netns, dst: &'static str, closed_port: u16, drop_port: u16) -> Gone {
    let before = ns.run(udp_no_ports);
    ns.run(move || {
        let sock = UdpSocket::bind(format!("{dst}:0")).expect("bind");
        for port in [closed_port, drop_port] {
            for _ in 0..PACKETS {
                let _ = sock.send_to(b"churn", (dst, port));
            }
        }
    });
    // Loopback delivers in softirq context, possibly after send_to returned.
    let mut no_ports = 0;
    wait_for("the kernel to count the closed-port drops", 10.0, || {
        no_ports = ns.run(udp_no_ports) - before;
        no_ports >= PACKETS as u64
    });
    let tag = format!("churn{drop_port}");
    let mut nft_drops = 0;
    wait_for("the nftables rule to count its drops", 10.0, || {
        nft_drops = nft_rule_packets(ns, &tag);
        nft_drops >= PACKETS as u64
    });
    Gone {
        name: ns.name.clone(),
        inode: ns.inode(),
        closed_port,
        no_ports,
        drop_port,
        nft_drops,
    }
}

/// Namespaces some process or `ip netns` name holds right now.
fn reachable_namespaces() -> HashSet<u64> {
    let mut found = HashSet::new();
    for dir in ["/run/netns", "/proc"] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = if dir == "/proc" {
                e.path().join("ns/net")
            } else {
                e.path()
            };
            if let Ok(m) = fs::metadata(path) {
                found.insert(m.ino());
            }
        }
    }
    found
}

/// Waits until dropscope holds nothing in the namespaces of a deleted wave (no socket, no
/// thread: either would keep the namespace alive), runs no helper process, has no thread
/// outside its own namespace, and two readings of its resources in a row agree; returns them.
fn settle(pid: u32, wave: &[u64], deadline_secs: f64) -> Usage {
    let own = process::netns_of(pid);
    let wave: HashSet<u64> = wave.iter().copied().collect();
    let mut held = Vec::new();
    let mut previous: Option<Usage> = None;
    let mut usage = None;
    wait_for(
        "dropscope to let go of the deleted namespaces",
        deadline_secs,
        || {
            // A deleted namespace's inode may already be reused by a new namespace of another
            // test: that one is reachable, ours are not.
            let reachable = reachable_namespaces();
            let zombie = |ns: &u64| wave.contains(ns) && !reachable.contains(ns);
            held = process::sockets(pid)
                .into_iter()
                .filter(|(_, ns)| zombie(ns))
                .map(|(fd, ns)| format!("socket fd {fd} in netns {ns}"))
                .chain(
                    process::thread_netns(pid)
                        .into_iter()
                        .filter(|(_, ns)| zombie(ns))
                        .map(|(tid, ns)| format!("thread {tid} in netns {ns}")),
                )
                .collect();
            let quiet = held.is_empty()
                && process::children(pid).is_empty()
                && process::thread_netns(pid).iter().all(|(_, ns)| *ns == own);
            let now = quiet.then(|| usage_of(pid, own));
            let stable = now.is_some()
                && previous.is_some_and(|p| {
                    (p.fds, p.threads) == (now.unwrap().fds, now.unwrap().threads)
                });
            previous = now;
            usage = now;
            stable
        },
    );
    assert!(held.is_empty(), "{held:?}");
    usage.unwrap()
}

fn usage_of(pid: u32, own: u64) -> Usage {
    let foreign: HashSet<i32> = process::sockets(pid)
        .into_iter()
        .filter(|(_, ns)| *ns != own)
        .map(|(fd, _)| fd)
        .collect();
    Usage {
        fds: process::fds(pid)
            .iter()
            .filter(|(fd, _)| !foreign.contains(fd))
            .count(),
        threads: process::threads(pid).len(),
        rss_kib: process::rss_kib(pid),
    }
}

/// Runs the waves against the dropscope at `pid`, sending to `dst`: ports `port_base + i`
/// stay closed, `port_base + 1000 + i` are dropped by a rule. Returns the namespaces and the
/// usage after each wave.
fn churn(pid: u32, dst: &'static str, port_base: u16) -> (Vec<Gone>, Vec<Usage>) {
    let (mut gone, mut usage) = (Vec::new(), Vec::new());
    for wave in 0..WAVES {
        let started = Instant::now();
        let spaces: Vec<(Netns, u16, u16)> = (0..PER_WAVE)
            .map(|i| {
                let n = (wave * PER_WAVE + i) as u16;
                let (closed, dropped) = (port_base + n, port_base + 1000 + n);
                (build(dropped), closed, dropped)
            })
            .collect();
        // Each namespace lives until dropscope watches it (its rescan opens a netlink
        // monitor there), so that closing the monitors of deleted namespaces is exercised.
        let inodes: Vec<u64> = spaces.iter().map(|(ns, ..)| ns.inode()).collect();
        wait_for("dropscope to watch the new namespaces", 20.0, || {
            let watched: HashSet<u64> = process::sockets(pid).into_iter().map(|s| s.1).collect();
            inodes.iter().all(|ns| watched.contains(ns))
        });
        for (ns, closed, dropped) in &spaces {
            gone.push(drop_packets(ns, dst, *closed, *dropped));
        }
        // Deleted right after their drops: some are explained after the namespace is gone.
        drop(spaces);
        let u = settle(pid, &inodes, 20.0);
        eprintln!(
            "churn wave {:2}: {} namespaces in {:.1} s; dropscope fds {} threads {} rss {} KiB",
            wave + 1,
            PER_WAVE,
            started.elapsed().as_secs_f64(),
            u.fds,
            u.threads,
            u.rss_kib
        );
        usage.push(u);
    }
    (gone, usage)
}

/// Descriptors and threads are back to what they were after wave 2 (polled: a monitor of a
/// namespace another test just created may be opening), and memory grew by less than
/// `WAVES` namespaces' worth of tolerance.
fn assert_no_growth(pid: u32, usage: &[Usage]) {
    let (steady, last) = (usage[1], usage[usage.len() - 1]);
    let mut now = last;
    wait_for(
        &format!("descriptors and threads back to wave 2's {steady:?} (last wave: {last:?})"),
        20.0,
        || {
            now = settle(pid, &[], 20.0);
            now.fds <= steady.fds && now.threads <= steady.threads
        },
    );
    // The allocator keeps some freed memory; a leak of a few KiB per namespace over 180
    // namespaces, or of anything per drop, shows well above this.
    let tolerance = (steady.rss_kib / 10).max(4096);
    assert!(
        now.rss_kib <= steady.rss_kib + tolerance,
        "RSS grew from {} KiB after wave 2 to {} KiB after wave {WAVES}",
        steady.rss_kib,
        now.rss_kib
    );
}

/// Nothing on stderr: no warning, no error, no panic.
fn assert_quiet(report: &Report) {
    assert!(
        report.status.success(),
        "dropscope failed ({}): {}",
        report.status,
        report.stderr
    );
    assert!(
        report.stderr.trim().is_empty(),
        "dropscope wrote to stderr:\n{}",
        report.stderr
    );
}

#[test]
fn namespace_churn_leaks_nothing_and_gone_namespaces_keep_their_drops() {
    let obs = Observer::start(&["--dst", JSON_DST]);
    let pid = obs.pid();
    let (gone, usage) = churn(pid, JSON_DST, 21000);
    assert_no_growth(pid, &usage);
    let report = obs.stop();
    assert_quiet(&report);
    report.assert_consistent();

    let drops = report.drops();
    for g in &gone {
        for (port, cause, kernel) in [
            (g.closed_port, "no_listener", g.no_ports),
            (g.drop_port, "netfilter_drop", g.nft_drops),
        ] {
            let recs: Vec<_> = drops
                .iter()
                .filter(|r| r["dport"] == port && r["netns"] == g.inode)
                .collect();
            let counted: u64 = recs.iter().map(|r| r["count"].as_u64().unwrap()).sum();
            assert_eq!(
                counted, kernel,
                "{} (netns {}) port {port}: dropscope counted {counted}, the kernel {kernel}: {recs:#?}",
                g.name, g.inode
            );
            for r in &recs {
                assert_eq!(r["cause"], cause, "{r:#}");
                // The inode may have been reused by a later namespace: a name, when given,
                // must be this one's.
                if let Some(name) = r["netns_name"].as_str() {
                    assert_eq!(name, g.name, "wrong namespace name: {r:#}");
                }
                // Never another namespace's rule.
                if let Some(rule) = r["rule"].as_str() {
                    assert!(rule.contains(&format!("churn{port}")), "wrong rule: {r:#}");
                }
            }
        }
    }
    // Every churn drop is one of those (no drop lost its namespace).
    let ours: u64 = gone.iter().map(|g| g.no_ports + g.nft_drops).sum();
    let reported: u64 = drops.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(
        reported, ours,
        "drops to {JSON_DST} outside the churn's accounting"
    );
}

#[test]
fn serve_holds_up_under_namespace_churn() {
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&["--dst", SERVE_DST, "--metrics", &addr]);
    let pid = obs.pid();
    let (gone, usage) = churn(pid, SERVE_DST, 24000);
    assert_no_growth(pid, &usage);
    // The metrics add up to the kernel's counters once the last drops are reconciled.
    let url = format!("http://{addr}/metrics");
    let want = |f: fn(&Gone) -> u64| gone.iter().map(f).sum::<u64>() as f64;
    let (no_ports, nft) = (want(|g| g.no_ports), want(|g| g.nft_drops));
    let mut last = String::new();
    let total = |text: &str, cause: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("dropscope_drops_total{") && l.contains(&format!("cause=\"{cause}\""))
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let counted = |text: &str| (total(text, "no_listener"), total(text, "netfilter_drop"));
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while counted(&last) != (no_ports, nft) && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        last = get(&url, &[]).map(|r| r.1).unwrap_or_default();
    }
    assert_eq!(
        counted(&last),
        (no_ports, nft),
        "(no_listener, netfilter_drop) in the metrics vs the kernel's UdpNoPorts and rule counters:\n{last}"
    );
    assert_eq!(sample(&last, "dropscope_events_lost_total", &[]), Some(0.0));
    assert_eq!(
        get(&format!("http://{addr}/healthz"), &[]).map(|r| r.0),
        Some(200)
    );
    let report = obs.stop_with(Signal::SIGTERM);
    assert_quiet(&report);
    let summary = report.summary();
    assert_eq!(summary["lost"], 0, "{summary}");
}
