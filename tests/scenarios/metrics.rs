//! `dropscope serve`: a real Prometheus scrapes it while the router drops packets, and the
//! counters it stores equal the firewall rule's own counter; the exposition passes promtool;
//! readiness follows the attach; the endpoint stays on loopback unless asked.
use std::{
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use dropscope_tests::{
    http::{free_port, get, sample},
    nft_rule_counter,
    observer::{attach_timeout, binary, temp_path},
    prometheus::Prometheus,
    topology::{A4, B4},
    traffic::Udp,
    wait_for, Netns, Observer, Topology,
};
use nix::{sys::signal::Signal, unistd::Pid};

/// Adds an nftables rule in R's forward hook that counts and drops UDP to `dport`.
fn drop_rule(r: &Netns, daddr: &str, dport: u16, tag: &str) {
    r.sh(&format!(
        "nft add table inet ms 2>/dev/null; nft add chain inet ms f '{{ type filter hook forward priority 0; }}'; \
         nft add rule inet ms f ip daddr {daddr} udp dport {dport} counter drop comment '\"{tag}\"'"
    ));
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// dropscope's own exposition (the classic text format, as curl gets it).
fn exposition(addr: &str) -> String {
    let (status, body) =
        get(&format!("http://{addr}/metrics"), &[]).expect("metrics endpoint answers");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn prometheus_stores_exact_drop_counts() {
    let t = Topology::new();
    drop_rule(&t.r, B4, 9700, "ds-metrics");
    let addr = format!("127.0.0.1:{}", free_port());
    // --sample 5: most drops reach the metrics as kernel counts, not as events.
    let obs = Observer::serve(&[
        "--netns",
        &t.r.name,
        "--metrics",
        &addr,
        "--interval",
        "0.2",
        "--log-interval",
        "0.5",
        "--sample",
        "5",
    ]);
    let prometheus = Prometheus::start(&addr);
    wait_for("prometheus to scrape dropscope", 30.0, || {
        prometheus.query(r#"up{job="dropscope"} == 1"#).len() == 1
    });

    Udp::to(B4, 9700).count(60).send(&t.a);
    wait_for("the rule to count 60 drops", 5.0, || {
        nft_rule_counter(&t.r, "ds-metrics").0 == 60
    });
    let (packets, bytes) = nft_rule_counter(&t.r, "ds-metrics");
    // Once dropscope itself shows every drop, any later scrape must hold exactly the kernel's count.
    let labels = [("cause", "netfilter_drop"), ("iface", "r0")];
    wait_for("dropscope to count the drops", 10.0, || {
        sample(&exposition(&addr), "dropscope_drops_total", &labels).unwrap_or(0.0)
            >= packets as f64
    });
    let caught_up = now();
    let scraped = |selector: &str| prometheus.scraped_after(selector, caught_up, 20.0);
    let drops = scraped(
        r#"dropscope_drops_total{cause="netfilter_drop",reason="NETFILTER_DROP",iface="r0",pod=""}"#,
    );
    assert_eq!(drops, packets as f64, "Prometheus vs the nft rule counter");
    assert_eq!(
        scraped(r#"sum(dropscope_drops_total)"#),
        packets as f64,
        "nothing else dropped in R"
    );
    assert_eq!(
        scraped(r#"dropscope_drop_bytes_total{cause="netfilter_drop",iface="r0"}"#),
        bytes as f64
    );
    assert!(
        scraped(r#"dropscope_drops_unsent_total{kind="sampled"}"#) > 0.0,
        "sampling was exercised"
    );
    assert_eq!(scraped(r#"dropscope_events_lost_total"#), 0.0);
    assert_eq!(
        scraped(r#"count(dropscope_probe_info{probe="kfree_skb",mode=~"tp_btf|tracepoint"} == 1)"#),
        1.0
    );
    assert_eq!(scraped(r#"dropscope_build_info"#), 1.0);
    assert_eq!(scraped(r#"dropscope_label_sets_folded_total"#), 0.0);

    // The raw exposition passes Prometheus's own linter.
    let text = exposition(&addr);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );

    // The log: the attach line, the drop explained once, digests adding up to the kernel's count.
    let report = obs.stop_with(Signal::SIGTERM);
    assert!(report.status.success(), "{}", report.stderr);
    assert_eq!(report.attach()["metrics"], format!("http://{addr}/metrics"));
    let explained = report.of("netfilter_drop");
    assert!(
        !explained.is_empty() && explained.len() == report.drops().len(),
        "{:#?}",
        report.drops()
    );
    assert!(
        explained[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("comment \"ds-metrics\""),
        "{}",
        explained[0]
    );
    let digests: Vec<_> = report
        .records
        .iter()
        .filter(|r| r["type"] == "digest")
        .collect();
    let logged: u64 = digests
        .iter()
        .map(|d| d["causes"]["netfilter_drop"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(logged, packets, "digests: {digests:#?}");
    assert_eq!(report.summary()["causes"]["netfilter_drop"], packets);
}

#[test]
fn label_sets_beyond_max_series_fold_into_other() {
    let t = Topology::new();
    drop_rule(&t.r, B4, 9701, "a-to-b");
    drop_rule(&t.r, A4, 9702, "b-to-a");
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&[
        "--netns",
        &t.r.name,
        "--metrics",
        &addr,
        "--interval",
        "0.2",
        "--max-series",
        "1",
    ]);
    let drops = |labels: &[(&str, &str)]| {
        sample(&exposition(&addr), "dropscope_drops_total", labels).unwrap_or(0.0)
    };
    // The first label set (ingress r0) takes the only place; r1's drops fold into "other".
    Udp::to(B4, 9701).count(3).send(&t.a);
    wait_for("the r0 series", 10.0, || drops(&[("iface", "r0")]) >= 3.0);
    Udp::to(A4, 9702).count(4).send(&t.b);
    let other = [
        ("cause", "netfilter_drop"),
        ("reason", "other"),
        ("iface", "other"),
        ("pod_namespace", "other"),
        ("pod", "other"),
    ];
    wait_for("the folded series", 10.0, || drops(&other) >= 4.0);
    let text = exposition(&addr);
    assert_eq!(
        sample(&text, "dropscope_drops_total", &[("iface", "r0")]),
        Some(nft_rule_counter(&t.r, "a-to-b").0 as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dropscope_drops_total", &other),
        Some(nft_rule_counter(&t.r, "b-to-a").0 as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dropscope_drops_total", &[("iface", "r1")]),
        None,
        "{text}"
    );
    // r1's label set was folded once in each labelled counter (packets and bytes).
    assert_eq!(
        sample(&text, "dropscope_label_sets_folded_total", &[]),
        Some(2.0),
        "{text}"
    );
    assert!(obs.stop().status.success());
}

#[test]
fn readyz_turns_ready_only_once_attached() {
    let addr = format!("127.0.0.1:{}", free_port());
    let ready = temp_path("dropscope-ready");
    let child = Command::new(binary())
        .args(["serve", "--netns", "1", "--metrics", &addr, "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dropscope serve");
    let url = |path: &str| format!("http://{addr}{path}");
    // The endpoint listens before the probes attach: alive, not ready.
    let deadline = Instant::now() + attach_timeout();
    let mut not_ready = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "not ready within {:?}",
            attach_timeout()
        );
        match get(&url("/readyz"), &[]).map(|r| r.0) {
            Some(503) => {
                not_ready += 1;
                assert_eq!(get(&url("/healthz"), &[]).map(|r| r.0), Some(200));
            }
            // The ready file is written once the probes are attached, just before readiness.
            Some(200) => {
                assert!(ready.exists(), "ready before the probes were attached");
                break;
            }
            Some(other) => panic!("/readyz answered {other}"),
            None => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        not_ready > 0,
        "/readyz never said 503 while the probes were attaching"
    );
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ready.exists(), "ready file left behind");
    assert_eq!(
        get(&url("/healthz"), &[]),
        None,
        "the endpoint is closed after exit"
    );
}

/// Runs `dropscope ARGS` to completion: (exit code, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run dropscope");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
    )
}

#[test]
fn the_endpoint_stays_on_loopback_unless_asked() {
    let port = free_port();
    for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let (code, err) = run(&["serve", "--metrics", &addr, "--duration", "1"]);
        assert_eq!(code, Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("not a loopback address") && err.contains("--metrics-allow-remote"),
            "{err}"
        );
    }
    // A port already taken is one clear line too, before anything is attached.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, err) = run(&[
        "serve",
        "--metrics",
        &taken.local_addr().unwrap().to_string(),
        "--duration",
        "1",
    ]);
    assert_eq!((code, err.lines().count()), (Some(1), 1), "{err}");
    assert!(err.contains("cannot listen on --metrics"), "{err}");
    // Asked for: it listens on every address, loopback included.
    let obs = Observer::serve(&[
        "--netns",
        "1",
        "--metrics",
        &format!("0.0.0.0:{port}"),
        "--metrics-allow-remote",
    ]);
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/readyz"), &[]).map(|r| r.0),
        Some(200)
    );
    assert!(obs.stop().status.success());
}
