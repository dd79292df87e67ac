//! The observer itself: quiet when nothing drops, benign noise hidden, fallback attach mode,
//! clean detach on every signal, and clear errors on bad input.
use std::process::Command;

use dropscope_tests::{
    http::{free_port, get},
    observer::binary,
    topology::{A4, B4},
    traffic::{udp_listener, Udp},
    wait_for, Nstat, Observer, Topology,
};
use nix::sys::signal::Signal;

use crate::Expect;

#[test]
// vm-test: core
// vm-test: no-reasons
fn a_healthy_network_reports_no_drops() {
    let t = Topology::new();
    let listener = udp_listener(&t.b, "10.231.2.2:9400");
    let obs = Observer::start(&[
        "--netns", &t.a.name, "--netns", &t.r.name, "--netns", &t.b.name,
    ]);
    Udp::to(B4, 9400).count(5).send(&t.a);
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        listener.recv(&mut buf).expect("datagram delivered");
    }
    let report = obs.stop();
    report.assert_consistent();
    assert!(report.drops().is_empty(), "{:#?}", report.drops());
    assert!(report.causes().is_empty());
    // (IPv6 multicast housekeeping may still be counted as suppressed benign noise.)
}

#[test]
// vm-test: core
fn benign_ping_noise_is_suppressed_and_counted() {
    let t = Topology::new();
    let before = Nstat::read(&t.a);
    let obs = Observer::start(&["--netns", &t.a.name]);
    t.a.sh("ping -c3 -i0.2 -W2 10.231.2.2 >/dev/null");
    let report = obs.stop();
    report.assert_consistent();
    let replies = Nstat::delta(&t.a, &before, "IcmpInEchoReps");
    assert_eq!(replies, 3);
    assert!(
        report.drops().is_empty(),
        "benign drops shown without --all: {:#?}",
        report.drops()
    );
    // Other IPv6 multicast housekeeping may be suppressed too, so at least the replies.
    assert!(
        report.summary()["suppressed"].as_u64().unwrap() >= replies,
        "{}",
        report.summary()
    );

    // With --all the same noise is shown, as "benign", one per echo reply.
    let before = Nstat::read(&t.a);
    let obs = Observer::start(&["--netns", &t.a.name, "--all"]);
    t.a.sh("ping -c2 -i0.2 -W2 10.231.2.2 >/dev/null");
    let report = obs.stop();
    report.assert_consistent();
    // Freed in ping_rcv (6.12+) or icmp_rcv (6.1): an echo reply either way.
    let at_ping: u64 = report
        .of("benign")
        .iter()
        .filter(|r| r["proto"] == "icmp" && r["icmp_type"] == 0)
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(at_ping, Nstat::delta(&t.a, &before, "IcmpInEchoReps"));
    assert_eq!(at_ping, 2);
}

#[test]
fn classic_tracepoint_fallback_gives_the_same_answer() {
    let t = Topology::new();
    t.r.sh("sysctl -qw net.ipv4.ip_forward=0");
    let before = Nstat::read(&t.r);
    let obs = Observer::start(&["--netns", &t.r.name, "--attach", "tracepoint"]);
    Udp::to(B4, 9401).count(2).send(&t.a);
    let report = obs.stop();
    let probes = report.attach()["probes"].as_array().unwrap().clone();
    // The drop probes; the context probes (--context) are independent of --attach.
    let drop_probes = ["kfree_skb", "icmp_send", "tcp_send_reset"];
    let modes: Vec<_> = probes
        .iter()
        .filter(|p| drop_probes.iter().any(|d| p["probe"] == *d))
        .collect();
    assert_eq!(modes.len(), 3, "{probes:?}");
    assert!(
        modes.iter().all(|p| p["mode"] == "tracepoint"),
        "{probes:?}"
    );
    let e = Expect {
        cause: "forwarding_disabled",
        ifname: "r0",
        family: "ipv4",
        proto: "udp",
        src: A4,
        dst: B4,
        dport: Some(9401),
        netns: t.r.inode(),
    };
    assert_eq!(
        e.check(&report),
        Nstat::delta(&t.r, &before, "IpInAddrErrors")
    );
}

/// IDs of the BPF programs a process holds, from its fds (/proc/PID/fdinfo: "prog_id").
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("prog_id:")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Which of `ids` are still loaded in the kernel, according to bpftool.
fn loaded(ids: &[u64]) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .filter(|id| ids.contains(id))
        .collect()
}

fn detaches_on(obs: Observer, sig: Signal) {
    let ids = programs_of(obs.pid());
    assert!(
        ids.len() >= 3,
        "expected kfree_skb, icmp_send and tcp_send_reset programs, got {ids:?}"
    );
    assert_eq!(loaded(&ids), ids, "bpftool sees them while dropscope runs");
    let report = obs.stop_with(sig);
    assert!(report.status.success(), "{sig}: {}", report.stderr);
    report.summary();
    // The kernel frees programs after an RCU grace period: wait for that, briefly.
    wait_for(
        &format!("programs {ids:?} to be unloaded after {sig}"),
        5.0,
        || loaded(&ids).is_empty(),
    );
}

#[test]
// vm-test: core
// vm-test: no-reasons
fn nothing_stays_attached_after_sigint() {
    detaches_on(Observer::start(&["--netns", "1"]), Signal::SIGINT);
}

#[test]
// vm-test: core
// vm-test: no-reasons
fn nothing_stays_attached_after_sigterm() {
    detaches_on(Observer::start(&["--netns", "1"]), Signal::SIGTERM);
}

#[test]
fn serve_detaches_and_closes_its_endpoint_after_sigterm() {
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&["--netns", "1", "--metrics", &addr]);
    let healthz = format!("http://{addr}/healthz");
    assert_eq!(get(&healthz, &[]).map(|r| r.0), Some(200));
    detaches_on(obs, Signal::SIGTERM);
    assert_eq!(
        get(&healthz, &[]),
        None,
        "the endpoint is closed after exit"
    );
}

/// Runs dropscope to completion and returns (exit code, stderr).
fn run_fail(args: &[&str], wrap: Option<&[&str]>) -> (i32, String) {
    let mut cmd = match wrap {
        Some(w) => {
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(binary());
            c
        }
        None => Command::new(binary()),
    };
    let out = cmd.args(args).output().expect("run dropscope");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
    )
}

#[test]
fn bad_input_is_one_clear_line() {
    let (code, err) = run_fail(&["--btf", "/nonexistent/vmlinux", "--duration", "1"], None);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");

    let (code, err) = run_fail(&["--format", "yaml"], None);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("'yaml'") && err.contains("text, json"),
        "{err}"
    );

    let (code, err) = run_fail(&["--netns", "no-such-namespace", "--duration", "1"], None);
    assert_eq!(code, 1);
    assert!(err.contains("no such namespace"), "{err}");

    let (code, err) = run_fail(
        &["--duration", "1"],
        Some(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]),
    );
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn filters_apply_in_the_kernel() {
    let t = Topology::new();
    t.r.sh("iptables-nft -A FORWARD -p udp -j DROP");
    // Drops in R on two ports and in B; only R port 9402 is asked for.
    let before_b = Nstat::read(&t.b);
    let obs = Observer::start(&["--netns", &t.r.name, "--port", "9402"]);
    Udp::to(B4, 9402).count(3).send(&t.a);
    Udp::to(B4, 9403).count(4).send(&t.a);
    t.b.run(|| {
        let s = std::net::UdpSocket::bind("10.231.2.2:0").unwrap();
        for _ in 0..5 {
            let _ = s.send_to(b"x", "10.231.2.1:9404");
        }
    });
    let report = obs.stop();
    report.assert_consistent();
    assert_eq!(report.causes(), vec![("netfilter_drop".to_string(), 3)]);
    let s = report.summary();
    // Only the 3 wanted drops crossed into userspace; the other 4 (R) and 5 (R, no listener)
    // were left out by the programs themselves.
    assert_eq!(s["decoded"], 3, "{s}");
    assert!(s["filtered_in_kernel"].as_u64().unwrap() >= 9, "{s}");
    assert_eq!(Nstat::delta(&t.b, &before_b, "UdpOutDatagrams"), 5);
}

#[test]
fn top_view_ranks_causes_in_plain_lines_off_a_terminal() {
    let t = Topology::new();
    t.r.sh("sysctl -qw net.ipv4.ip_forward=0");
    let ready = std::env::temp_dir().join(format!("dropscope-top-{}", std::process::id()));
    let child = Command::new(binary())
        .args([
            "--top",
            "--interval",
            "0.2",
            "--duration",
            "2",
            "--netns",
            &t.r.name,
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start dropscope --top");
    let timeout = dropscope_tests::observer::attach_timeout().as_secs_f64();
    wait_for("dropscope to attach", timeout, || ready.exists());
    Udp::to(B4, 9405).count(3).send(&t.a);
    let out = child.wait_with_output().expect("dropscope --top");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rfind(|l| l.contains(" forwarding_disabled rate="))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("total=3") && line.contains("IP_INADDRERRORS @ ip_error, r0"),
        "{line}"
    );
    assert!(
        text.contains("── dropscope summary"),
        "the summary follows: {text}"
    );
}
