//! Handing over the packets: `--pcap`, tcpdump filter expressions and `serve`'s flight
//! recorder. Real readers are the oracle: every file is opened by `tshark` and `tcpdump`
//! (without warnings), its frames are compared with what dropscope reported and with the
//! kernel's rule counters, and each filter expression must select exactly the packets that
//! `tcpdump -r all.pcapng EXPR` selects from an unfiltered capture of the same traffic.
use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dropscope_tests::{
    http::free_port,
    nft_rule_packets,
    observer::{binary, temp_path},
    topology::{A4, A6, B4, B6},
    traffic::{tcp_connect, Udp},
    wait_for, Netns, Nstat, Observer, Report, Topology,
};
use serde_json::Value;

/// Runs a reader; returns stdout, after checking it succeeded and warned about nothing
/// (tshark's note about running as root aside).
fn reader(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("Running as user \"root\"")
                && !l.starts_with("reading from file")
        })
        .collect();
    assert!(
        out.status.success() && warnings.is_empty(),
        "{cmd} {args:?} ({}): {stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tshark -r FILE -T fields -e F...`: one row per frame.
fn tshark_fields(file: &Path, fields: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec![
        "-r".to_string(),
        file.display().to_string(),
        "-o".into(),
        "ip.defragment:FALSE".into(),
        "-o".into(),
        "ipv6.defragment:FALSE".into(),
        "-T".into(),
        "fields".into(),
        "-E".into(),
        "separator=\t".into(),
    ];
    for f in fields {
        args.push("-e".into());
        args.push(f.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    reader("tshark", &args)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// The packets `tcpdump -r FILE EXPR` selects, each as the hex of its bytes (a multiset).
fn tcpdump_packets(file: &Path, expr: &str) -> Vec<String> {
    let path = file.display().to_string();
    let mut args = vec!["-nn", "-xx", "-r", &path];
    if !expr.is_empty() {
        args.push(expr);
    }
    let text = reader("tcpdump", &args);
    let mut packets: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(hex) = line.trim_start().strip_prefix("0x") {
            let bytes = hex.split_once(':').map_or("", |(_, b)| b);
            if let Some(p) = packets.last_mut() {
                p.push_str(&bytes.replace(' ', ""));
            }
        } else {
            packets.push(String::new());
        }
    }
    packets.sort();
    packets
}

/// (source, destination) of every packet `tcpdump -r FILE EXPR` prints.
fn tcpdump_addresses(file: &Path, expr: &str) -> Vec<(String, String)> {
    let path = file.display().to_string();
    let text = reader("tcpdump", &["-nn", "-q", "-r", &path, expr]);
    let strip_port = |s: &str, v6: bool| -> String {
        // "10.231.1.2.40001" / "fd00:231:1::2.40003" / "10.231.1.2"
        let dots = s.matches('.').count();
        if (v6 && dots == 1) || (!v6 && dots == 4) {
            s.rsplit_once('.').unwrap().0.to_string()
        } else {
            s.to_string()
        }
    };
    let mut v: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            let v6 = match w.next()? {
                "IP" => false,
                "IP6" => true,
                _ => return None,
            };
            let src = w.next()?;
            let _arrow = w.next()?;
            let dst = w.next()?.trim_end_matches(':');
            Some((strip_port(src, v6), strip_port(dst, v6)))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn capture_comment(file: &Path) -> String {
    let text = reader("capinfos", &[&file.display().to_string()]);
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("Capture comment:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A pcap path in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        TempFile(temp_path(name).with_extension("pcapng"))
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The router drops IPv4 and IPv6, TCP, UDP and ICMP in its forward hook (on ingress r0)
/// and UDP to 9203 in postrouting (on egress r1), each rule with a counter.
fn router_rules(r: &Netns) {
    r.sh(
        "nft add table inet pk; \
         nft add chain inet pk fw '{ type filter hook forward priority 0; }'; \
         nft add chain inet pk post '{ type filter hook postrouting priority 0; }'; \
         nft add rule inet pk fw meta nfproto ipv4 udp dport 9201 counter drop comment '\"pk-udp4\"'; \
         nft add rule inet pk fw meta nfproto ipv6 udp dport 9205 counter drop comment '\"pk-udp6\"'; \
         nft add rule inet pk fw meta nfproto ipv4 tcp dport 9204 counter drop comment '\"pk-tcp4\"'; \
         nft add rule inet pk fw meta nfproto ipv6 tcp dport 9202 counter drop comment '\"pk-tcp6\"'; \
         nft add rule inet pk fw ip daddr 10.231.2.2 icmp type echo-request counter drop comment '\"pk-icmp4\"'; \
         nft add rule inet pk fw ip6 daddr fd00:231:2::2 icmpv6 type echo-request counter drop comment '\"pk-icmp6\"'; \
         nft add rule inet pk post udp dport 9203 counter drop comment '\"pk-egress\"'",
    );
}

#[test]
// The capture and the kernel filter lists must pass older verifiers.
// vm-test: core
fn pcap_holds_the_reported_drops_with_their_causes() {
    let t = Topology::new();
    router_rules(&t.r);
    let file = TempFile::new("dropscope-pk");
    let started = std::time::SystemTime::now();
    let obs = Observer::start(&["--netns", &t.r.name, "--pcap", file.arg()]);
    Udp::to(B4, 9201).count(3).send(&t.a);
    Udp::to(B6, 9205).count(2).send(&t.a);
    Udp::to(B4, 9203).count(2).send(&t.a);
    let _ = tcp_connect(&t.a, B4, 9204);
    let _ = tcp_connect(&t.a, B6, 9202);
    // (The ICMP rules name their destination: dropscope's rule attribution does not tell
    // `icmp` from `icmpv6` in an inet table by itself.)
    t.a.sh("ping -c2 -i 0.2 -W 1 10.231.2.2 >/dev/null || true; ping -6 -c2 -i 0.2 -W 1 fd00:231:2::2 >/dev/null || true");
    let report = obs.stop();
    report.assert_consistent();
    let ended = std::time::SystemTime::now();

    // Both readers open it as it is.
    let all = tcpdump_packets(&file.0, "");
    let rows = tshark_fields(
        &file.0,
        &[
            "frame.interface_name",
            "frame.packet_flags_direction",
            "ip.src",
            "ip.dst",
            "ipv6.src",
            "ipv6.dst",
            "udp.dstport",
            "tcp.dstport",
            "icmp.type",
            "icmpv6.type",
            "frame.time_epoch",
            "frame.comment",
        ],
    );
    assert_eq!(all.len(), rows.len());

    // Every reported drop is in the file, and every frame is a reported drop.
    let reported = report.count("netfilter_drop");
    assert_eq!(rows.len() as u64, reported, "{rows:#?}");
    let summary = report.summary();
    assert_eq!(summary["pcap"]["written"], reported);
    assert_eq!(
        summary["pcap"]["causes"]["netfilter_drop"]["total"],
        reported
    );
    assert_eq!(report.attach()["pcap"]["target"], file.arg());

    let r = &t.r.name;
    let (in_if, out_if) = (format!("r0@{r}"), format!("r1@{r}"));
    type Case = (&'static str, fn(&[String]) -> bool, &'static str);
    let cases: [Case; 7] = [
        (
            "pk-udp4",
            |f| f[2] == A4 && f[3] == B4 && f[6] == "9201",
            "forward",
        ),
        (
            "pk-udp6",
            |f| f[4] == A6 && f[5] == B6 && f[6] == "9205",
            "forward",
        ),
        ("pk-tcp4", |f| f[2] == A4 && f[7] == "9204", "forward"),
        ("pk-tcp6", |f| f[4] == A6 && f[7] == "9202", "forward"),
        ("pk-icmp4", |f| f[2] == A4 && f[8] == "8", "forward"),
        ("pk-icmp6", |f| f[4] == A6 && f[9] == "128", "forward"),
        ("pk-egress", |f| f[2] == A4 && f[6] == "9203", "postrouting"),
    ];
    let mut seen = 0;
    for (tag, is, hook) in cases {
        let frames: Vec<&Vec<String>> = rows.iter().filter(|f| is(f)).collect();
        let counted = nft_rule_packets(&t.r, tag);
        assert!(counted > 0, "{tag}: nothing dropped");
        assert_eq!(
            frames.len() as u64,
            counted,
            "{tag}: frames vs the rule's counter"
        );
        for f in &frames {
            let comment = &f[11];
            for part in [
                "cause=netfilter_drop",
                "reason=NETFILTER_DROP",
                "location=nft_do_chain",
                &format!("hook={hook}"),
                &format!("comment \"{tag}\""),
                &format!("netns={r} ({})", t.r.inode()),
            ] {
                assert!(comment.contains(part), "{tag}: {part} not in {comment}");
            }
            if hook == "forward" {
                assert_eq!(
                    (f[0].as_str(), f[1].as_str()),
                    (in_if.as_str(), "0x00000001"),
                    "{tag}: ingress, inbound: {f:?}"
                );
            } else {
                assert_eq!(
                    (f[0].as_str(), f[1].as_str()),
                    (out_if.as_str(), "0x00000002"),
                    "{tag}: egress, outbound: {f:?}"
                );
            }
            let ts: f64 = f[10].parse().unwrap();
            let secs = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            };
            assert!(
                ts >= secs(started) && ts <= secs(ended),
                "{tag}: the drop time is the packet's time: {ts}"
            );
        }
        seen += frames.len();
    }
    assert_eq!(seen, rows.len(), "no other frames: {rows:#?}");
    let comment = capture_comment(&file.0);
    assert!(
        comment.contains(&format!("netfilter_drop {reported} of {reported}")),
        "{comment}"
    );
}

/// A VXLAN tunnel from A to B over the router; its outer packets do not fit a0.
fn vxlan(t: &Topology) {
    t.a.sh(&format!(
        "ip link add vx0 type vxlan id 42 remote {B4} local {A4} dstport 4789 df set; \
         ip addr add 192.168.231.1/24 dev vx0; ip link set vx0 up"
    ));
    t.b.sh(&format!(
        "ip link add vx0 type vxlan id 42 remote {A4} local {B4} dstport 4789 df set; \
         ip addr add 192.168.231.2/24 dev vx0; ip link set vx0 up"
    ));
}

#[test]
fn a_tunnel_drop_carries_its_outer_and_inner_headers() {
    let t = Topology::new();
    vxlan(&t);
    let before = Nstat::read(&t.a);
    let file = TempFile::new("dropscope-pk-vxlan");
    let obs = Observer::start(&[
        "--netns",
        &t.a.name,
        "--pcap",
        file.arg(),
        "--snaplen",
        "256",
    ]);
    Udp::to("192.168.231.2", 9400)
        .payload(1450)
        .count(2)
        .send(&t.a);
    let report = obs.stop();
    report.assert_consistent();
    let failed = Nstat::delta(&t.a, &before, "IpFragFails");
    let reported = report.count("tunnel_mtu");
    assert!(failed > 0 && reported == failed, "{failed} vs {reported}");
    let rows = tshark_fields(
        &file.0,
        &[
            "vxlan.vni",
            "ip.dst",
            "udp.dstport",
            "frame.len",
            "frame.cap_len",
            "frame.comment",
            "frame.interface_name",
        ],
    );
    let tunnel: Vec<_> = rows
        .iter()
        .filter(|f| f[5].contains("cause=tunnel_mtu"))
        .collect();
    assert_eq!(tunnel.len() as u64, reported, "{rows:#?}");
    let len = report.of("tunnel_mtu")[0]["len"].as_u64().unwrap();
    for f in tunnel {
        assert_eq!(f[0], "42", "{f:?}");
        // Outer then inner addresses and ports.
        assert_eq!(f[1], format!("{B4},192.168.231.2"), "{f:?}");
        assert_eq!(f[2], "4789,9400", "{f:?}");
        // The kernel had no link-layer header for the outer packet: 14 made-up bytes, and
        // the original length is the packet's.
        assert_eq!(f[3].parse::<u64>().unwrap(), len + 14, "{f:?}");
        let cap: u64 = f[4].parse().unwrap();
        assert!(
            (92..=270).contains(&cap),
            "both headers, within snaplen 256 + 14: {f:?}"
        );
        assert!(f[6].ends_with("(no link-layer header)"), "{f:?}");
    }
}

/// Traffic for the expression tests: IPv4 and IPv6, TCP, UDP, ICMP, fragments, drops in the
/// router (forward and postrouting) and at B (closed ports), from fixed source ports.
fn mixed_traffic(t: &Topology) {
    let udp = |src: &'static str, dst: &'static str, n: usize, size: usize| {
        t.a.run(move || {
            let s = UdpSocket::bind(src.parse::<SocketAddr>().unwrap()).expect("bind");
            for _ in 0..n {
                let _ = s.send_to(&vec![0x5a; size], dst.parse::<SocketAddr>().unwrap());
            }
        })
    };
    udp("10.231.1.2:40001", "10.231.2.2:5301", 2, 32);
    udp("10.231.1.2:40002", "10.231.2.2:53", 1, 32);
    udp("[fd00:231:1::2]:40003", "[fd00:231:2::2]:5301", 2, 32);
    udp("[fd00:231:1::2]:40004", "[fd00:231:2::2]:53", 1, 32);
    udp("10.231.1.3:40005", "10.231.2.2:5302", 1, 32);
    udp("10.231.1.2:40006", "10.231.2.2:9300", 1, 32);
    udp("10.231.1.2:40007", "10.231.2.2:9310", 1, 32);
    udp("10.231.1.2:40008", "10.231.2.2:9400", 1, 32);
    udp("10.231.1.2:40009", "10.231.2.2:9500", 1, 3000);
    udp("[fd00:231:1::2]:40010", "[fd00:231:2::2]:9501", 1, 3000);
    let _ = tcp_connect(&t.a, B4, 8081);
    let _ = tcp_connect(&t.a, B6, 8082);
    t.a.sh("ping -c1 -W 1 10.231.2.2 >/dev/null || true; ping -6 -c1 -W 1 fd00:231:2::2 >/dev/null || true");
}

fn mixed_setup(t: &Topology) {
    t.a.sh("ip addr add 10.231.1.3/24 dev a0");
    t.r.sh("nft add table inet pk; \
         nft add chain inet pk fw '{ type filter hook forward priority 0; }'; \
         nft add chain inet pk post '{ type filter hook postrouting priority 0; }'; \
         nft add rule inet pk fw udp dport 9300-9310 counter drop; \
         nft add rule inet pk fw 'ip frag-off & 0x1fff != 0 counter drop'; \
         nft add rule inet pk fw udp dport 9500 counter drop; \
         nft add rule inet pk fw ip6 nexthdr 44 counter drop; \
         nft add rule inet pk fw icmp type echo-request counter drop; \
         nft add rule inet pk fw icmpv6 type echo-request counter drop; \
         nft add rule inet pk post udp dport 9400 counter drop");
}

/// Expressions checked against tcpdump, all watching the same traffic.
const EXPRESSIONS: [&str; 22] = [
    "udp",
    "icmp",
    "icmp6",
    "ip6",
    "host 10.231.1.3",
    "src host 10.231.1.2",
    "dst host fd00:231:2::2",
    "net 10.231.2.0/24",
    "dst net 10.231.2.0/24 and udp port 53",
    "port 53",
    "src port 40001",
    "portrange 9300-9310",
    "udp and not port 53",
    "ip6 and udp",
    "tcp or icmp",
    "host 10.231.1.2 and (port 5301 or 8081)",
    "port 9500",
    "port 9501",
    "src or dst net fd00:231:1::/64",
    "udp dst portrange 5300-5399",
    "ip proto 17 and dst port 9400",
    "not (src host 10.231.1.3 or ip6)",
];

fn expression_batch(exprs: &[&str]) -> usize {
    let t = Topology::new();
    mixed_setup(&t);
    let all = TempFile::new("dropscope-pk-all");
    let files: Vec<TempFile> = exprs
        .iter()
        .map(|_| TempFile::new("dropscope-pk-expr"))
        .collect();
    let (r, b) = (t.r.name.clone(), t.b.name.clone());
    let mut runs: Vec<Vec<String>> = vec![vec![]];
    runs.extend(exprs.iter().map(|e| vec![e.to_string()]));
    // One at a time, each given time: attaching is CPU-bound, and the machine is shared
    // with the other tests.
    let patience = dropscope_tests::observer::attach_timeout().max(Duration::from_secs(90));
    let observers: Vec<Observer> = runs
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let file = if i == 0 {
                all.arg()
            } else {
                files[i - 1].arg()
            };
            let mut args = vec!["--netns", &r, "--netns", &b, "--pcap", file];
            args.extend(extra.iter().map(String::as_str));
            Observer::start_within(&args, patience)
        })
        .collect();
    mixed_traffic(&t);
    let reports: Vec<Report> = observers.into_iter().map(Observer::stop).collect();
    for r in &reports {
        r.assert_consistent();
        assert_eq!(r.summary()["counts_exact"], true, "{}", r.stderr);
    }
    assert!(
        tcpdump_packets(&all.0, "").len() >= 20,
        "the traffic dropped"
    );
    let mut selecting = 0;
    for (i, expr) in exprs.iter().enumerate() {
        let report = &reports[i + 1];
        let expected = tcpdump_packets(&all.0, expr);
        let got = tcpdump_packets(&files[i].0, "");
        assert_eq!(
            got, expected,
            "'{expr}': dropscope's packets differ from tcpdump's selection"
        );
        let counted: u64 = report
            .drops()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        assert_eq!(counted as usize, expected.len(), "'{expr}': reported drops");
        let mut addrs: Vec<(String, String)> = report
            .drops()
            .iter()
            .filter(|r| !r["src"].is_null())
            .map(|r| {
                (
                    r["src"].as_str().unwrap().to_string(),
                    r["dst"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs, tcpdump_addresses(&all.0, expr), "'{expr}': flows");
        let in_kernel = report.attach()["filter"]["in_kernel"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(in_kernel == "exact" || in_kernel == "partial", "{expr}");
        if !expected.is_empty() {
            selecting += 1;
        }
    }
    selecting
}

#[test]
fn filter_expressions_select_what_tcpdump_selects() {
    // One run of the traffic, watched unfiltered (the reference) and with each expression.
    let selecting = expression_batch(&EXPRESSIONS);
    assert!(
        selecting >= 20,
        "only {selecting} expressions selected anything"
    );
}

#[test]
// The capture and the kernel filter lists must pass older verifiers.
// vm-test: core
fn an_expression_combines_with_the_flags_and_compiles_into_the_kernel() {
    let t = Topology::new();
    mixed_setup(&t);
    // Every list an expression fills: source, destination and either address, the three
    // port range lists, the family; --proto fills the protocol list.
    let obs = Observer::start(&[
        "--netns",
        &t.b.name,
        "--proto",
        "udp",
        "dst net 10.231.2.0/24 and host 10.231.1.2 and src portrange 40000-40100 \
         and dst port 5301 and port 5301 and src host 10.231.1.2 and ip",
    ]);
    mixed_traffic(&t);
    let report = obs.stop();
    report.assert_consistent();
    assert_eq!(report.attach()["filter"]["in_kernel"], "exact");
    assert_eq!(report.count("no_listener"), 2);
    assert!(report
        .drops()
        .iter()
        .all(|r| r["dport"] == 5301 && r["sport"] == 40001 && r["family"] == "ipv4"));
    // Everything else was left out in the kernel, before any event.
    let s = report.summary();
    assert_eq!(s["filtered"], s["filtered_in_kernel"], "{s}");
}

#[test]
fn unsupported_expressions_are_refused_in_one_line() {
    for (expr, part) in [
        ("ether host 02:00:00:00:00:01", "'ether'"),
        ("tcp[13] & 2 != 0", "'[13] & 2 != 0'"),
        ("host gateway", "'host gateway'"),
        ("port 53 and", "ends too early"),
    ] {
        let out = Command::new(binary())
            .args(["--duration", "1", expr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{expr}: {err}");
        assert_eq!(err.lines().count(), 1, "{expr}: {err}");
        assert!(
            err.contains(part) && err.starts_with("dropscope: filter expression:"),
            "{expr}: {err}"
        );
    }
}

/// dropscope with `--pcap -` piped into `tshark -r -`.
#[test]
fn pcap_to_standard_output_feeds_tshark() {
    let t = Topology::new();
    router_rules(&t.r);
    let ready = temp_path("dropscope-pk-ready");
    let mut ds = Command::new(binary())
        .args([
            "--netns",
            &t.r.name,
            "--pcap",
            "-",
            "--format",
            "json",
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tshark = Command::new("tshark")
        .args([
            "-r",
            "-",
            "-T",
            "fields",
            "-e",
            "udp.dstport",
            "-e",
            "frame.comment",
        ])
        .stdin(ds.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("dropscope to attach", 90.0, || ready.exists());
    Udp::to(B4, 9201).count(4).send(&t.a);
    wait_for("the drops", 5.0, || nft_rule_packets(&t.r, "pk-udp4") == 4);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ds.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let ds_out = ds.wait_with_output().unwrap();
    let out = tshark.wait_with_output().unwrap();
    assert!(ds_out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().all(|l| l.starts_with("Running as user")),
        "tshark: {stderr}"
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("9201\tcause=netfilter_drop")),
        "{text}"
    );
    // The JSON stream went to standard error, the summary last.
    let log = String::from_utf8_lossy(&ds_out.stderr);
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["pcap"]["written"], 4, "{log}");
}

#[test]
fn the_file_is_complete_after_sigterm_and_after_duration() {
    let t = Topology::new();
    router_rules(&t.r);
    let file = TempFile::new("dropscope-pk-term");
    let obs = Observer::start(&["--netns", &t.r.name, "--pcap", file.arg()]);
    Udp::to(B4, 9201).count(2).send(&t.a);
    let report = obs.stop_with(nix::sys::signal::Signal::SIGTERM);
    report.assert_consistent();
    assert_eq!(tcpdump_packets(&file.0, "").len(), 2);
    assert!(capture_comment(&file.0).contains("netfilter_drop 2 of 2"));

    let file = TempFile::new("dropscope-pk-duration");
    let ready = temp_path("dropscope-pk-ready");
    let child = Command::new(binary())
        .args([
            "--netns",
            &t.r.name,
            "--pcap",
            file.arg(),
            "--duration",
            "3",
            "--format",
            "json",
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("dropscope to attach", 90.0, || ready.exists());
    Udp::to(B4, 9201).count(3).send(&t.a);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcpdump_packets(&file.0, "").len(), 3);
    assert!(capture_comment(&file.0).contains("netfilter_drop 3 of 3"));
}

/// A full disk ends the run with an error; the file keeps its complete packets and says it
/// stopped early.
#[test]
fn a_full_disk_is_an_error_not_a_silent_truncation() {
    let t = Topology::new();
    let dir = temp_path("dropscope-pk-full");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.display().to_string();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", &dir_s])
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(dir_s.clone());
    let file = dir.join("full.pcapng");
    let ready = temp_path("dropscope-pk-ready");
    let child = Command::new(binary())
        .args([
            "--netns",
            &t.b.name,
            "--sample",
            "0",
            "--snaplen",
            "512",
            "--format",
            "json",
            "--pcap",
        ])
        .arg(&file)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("dropscope to attach", 90.0, || ready.exists());
    let start = Instant::now();
    let mut child = child;
    let status = loop {
        Udp::to(B4, 5999).payload(1000).count(50).send(&t.a);
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "dropscope did not stop on a full disk"
        );
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("dropscope:")).count(),
        1,
        "{err}"
    );
    // What was written is readable, and says it is incomplete.
    let n = tcpdump_packets(&file, "").len();
    assert!(n > 10, "{n} packets kept");
    let comment = capture_comment(&file);
    assert!(
        comment.contains("Writing stopped early") && comment.contains("No space left"),
        "{comment}"
    );
}

fn get_bytes(url: &str) -> (u16, Vec<u8>) {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build();
    let mut response = ureq::Agent::new_with_config(config)
        .get(url)
        .call()
        .expect("GET");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("body");
    (status, body)
}

#[test]
fn the_flight_recorder_returns_the_last_packets_within_its_bound() {
    let t = Topology::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&[
        "--netns",
        &t.b.name,
        "--metrics",
        &addr,
        "--sample",
        "0",
        "--recorder-packets",
        "50",
    ]);
    // A storm of 300 drops, each to its own port: the last 50 ports must come back. One
    // CPU sends them all, so that they are dropped in order.
    t.a.run(|| {
        let mut one = nix::sched::CpuSet::new();
        one.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
        let s = UdpSocket::bind("10.231.1.2:0").unwrap();
        for i in 0..300u16 {
            let _ = s.send_to(b"storm", SocketAddr::new(B4.parse().unwrap(), 20000 + i));
        }
    });
    let path = temp_path("dropscope-pk-recorder").with_extension("pcapng");
    // Polled: each poll runs tshark, slow on a host busy with other tests.
    wait_for("the recorder to hold the last drop", 30.0, || {
        let (status, body) = get_bytes(&format!("http://{addr}/packets.pcapng"));
        assert_eq!(status, 200);
        std::fs::write(&path, &body).unwrap();
        tshark_fields(&path, &["udp.dstport"])
            .last()
            .is_some_and(|f| f[0] == "20299")
    });
    let ports: Vec<u16> = tshark_fields(&path, &["udp.dstport", "frame.comment"])
        .iter()
        .map(|f| {
            assert!(f[1].contains("cause=no_listener"), "{f:?}");
            f[0].parse().unwrap()
        })
        .collect();
    assert_eq!(ports, (20250..20300).collect::<Vec<u16>>());
    assert_eq!(tcpdump_packets(&path, "").len(), 50);
    assert!(
        capture_comment(&path).contains("300 recorded since it started, 250 older ones evicted")
    );
    let report = obs.stop();
    assert!(report.status.success(), "{}", report.stderr);
    assert_eq!(report.summary()["causes"]["no_listener"], 300);
    assert_eq!(
        report.summary()["pcap"]["causes"]["no_listener"]["written"],
        300
    );
    let _ = std::fs::remove_file(&path);

    // Bounded in bytes too, and off on request.
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&[
        "--netns",
        &t.b.name,
        "--metrics",
        &addr,
        "--sample",
        "0",
        "--recorder-bytes",
        "8K",
    ]);
    Udp::to(B4, 5999).count(100).send(&t.a);
    wait_for("the drops", 10.0, || {
        let (_, body) = get_bytes(&format!("http://{addr}/packets.pcapng"));
        std::fs::write(&path, &body).unwrap();
        capture_comment(&path).contains("100 recorded")
    });
    let kept = tcpdump_packets(&path, "").len();
    assert!(kept > 0 && kept < 100, "{kept} packets within 8 KiB");
    assert!(std::fs::metadata(&path).unwrap().len() < 16 * 1024);
    obs.stop();
    let _ = std::fs::remove_file(&path);
    let addr = format!("127.0.0.1:{}", free_port());
    let obs = Observer::serve(&[
        "--netns",
        &t.b.name,
        "--metrics",
        &addr,
        "--recorder-packets",
        "0",
    ]);
    assert_eq!(get_bytes(&format!("http://{addr}/packets.pcapng")).0, 404);
    obs.stop();
}
