//! `cargo xtask soak`: a long drop storm with random flows across three causes, watched by
//! the release dropscope. Its memory, descriptors and threads are sampled all along; at the end
//! its counts per cause must equal the kernel's own counters, nothing may be lost or left
//! unexact, and `--top` must keep up for a minute too. Figures go to bench/soak.json and
//! BENCHMARKS.md.
use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dropscope_tests::{nft_rule_packets, Nstat, Topology};
use serde::Serialize;
use serde_json::Value;

/// Soak parameters.
pub struct Params {
    pub minutes: f64,
    /// Seconds of the `--top` phase.
    pub top_seconds: f64,
}

/// Where each datagram goes, by its destination.
const B: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);
/// Ports of B dropped by the router's rule (the rest are closed at B).
const RULE_PORTS: (u16, u16) = (10000, 19999);
const CLOSED_PORTS: (u16, u16) = (20000, 59999);
/// Source sockets: flows are (source port, destination) pairs.
const SOCKETS: usize = 256;
const BATCH: usize = 64;
/// dropscope's peak memory must stay under this (README, "Requirements and limits").
const RSS_LIMIT_MB: f64 = 64.0;

#[derive(Debug, Default, Clone, Serialize)]
struct Sample {
    seconds: f64,
    rss_mb: f64,
    fds: usize,
    threads: usize,
    cpu_percent: f64,
    lines: u64,
}

#[derive(Debug, Serialize)]
struct Outcome {
    minutes: f64,
    sent: u64,
    distinct_flows_estimate: u64,
    /// (cause, dropscope's count, the kernel's count).
    causes: Vec<(String, u64, u64)>,
    lost: u64,
    counts_exact: bool,
    agg_full: u64,
    loop_stall_max_ms: f64,
    loop_stalls: u64,
    evidence_skipped: u64,
    peak_rss_mb: f64,
    samples: Vec<Sample>,
    top: TopOutcome,
    passed: bool,
    failures: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct TopOutcome {
    seconds: f64,
    peak_rss_mb: f64,
    frames: u64,
    exit_ok: bool,
}

pub fn run(bin: &Path, params: &Params, out_md: &Path, out_json: &Path) -> Result<()> {
    let t = Topology::new();
    t.r.sh(&format!(
        "nft add table inet soak; nft add chain inet soak f '{{ type filter hook forward priority 0; }}'; \
         nft add rule inet soak f ip daddr {B} udp dport {}-{} counter drop comment '\"soak\"'",
        RULE_PORTS.0, RULE_PORTS.1
    ));
    // Default ICMP rate limits, as on a real node: the storm is not answered packet by packet.
    t.b.sh("sysctl -qw net.ipv4.icmp_ratelimit=1000 net.ipv4.icmp_msgs_per_sec=1000");
    t.r.sh("sysctl -qw net.ipv4.icmp_ratelimit=1000 net.ipv4.icmp_msgs_per_sec=1000");
    let kernel = |t: &Topology| -> [u64; 3] {
        [
            nft_rule_packets(&t.r, "soak"),
            Nstat::read(&t.b).get("UdpNoPorts"),
            Nstat::read(&t.r).get("IpExtInNoRoutes"),
        ]
    };
    let causes = ["netfilter_drop", "no_listener", "no_route"];
    let scratch = std::env::temp_dir().join(format!("dropscope-soak-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;

    // Phase 1: the JSON stream.
    let before = kernel(&t);
    let out = scratch.join("stream.json");
    let mut obs = Observer::start(bin, &t, &["--format", "json"], &out, &scratch)?;
    let dur = Duration::from_secs_f64(params.minutes * 60.0);
    let (sent, samples) = storm_while_sampling(&t, dur, &mut obs, &out)?;
    let summary = obs.stop_json(&out)?;
    let after = kernel(&t);

    // Phase 2: --top, drawing to a file.
    let top_out = scratch.join("top.txt");
    let mut top = Observer::start(bin, &t, &["--top", "--color", "never"], &top_out, &scratch)?;
    let top_dur = Duration::from_secs_f64(params.top_seconds);
    let (_, top_samples) = storm_while_sampling(&t, top_dur, &mut top, &top_out)?;
    let top_ok = top.stop()?.success();
    let frames = fs::read_to_string(&top_out)
        .map(|s| s.matches("dropscope").count() as u64)
        .unwrap_or(0);

    let mut failures = Vec::new();
    let mut per_cause = Vec::new();
    for (i, cause) in causes.iter().enumerate() {
        let reported = summary["causes"][cause].as_u64().unwrap_or(0);
        let k = after[i] - before[i];
        if reported != k {
            failures.push(format!("{cause}: dropscope counted {reported}, the kernel {k}"));
        }
        per_cause.push((cause.to_string(), reported, k));
    }
    let peak = samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
    let top_peak = top_samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
    if peak.max(top_peak) > RSS_LIMIT_MB {
        failures.push(format!(
            "peak RSS {:.1} MB (stream) / {top_peak:.1} MB (--top) over {RSS_LIMIT_MB} MB",
            peak
        ));
    }
    let num = |k: &str| summary[k].as_u64().unwrap_or(0);
    if num("lost") > 0 {
        failures.push(format!("{} events lost", num("lost")));
    }
    if summary["counts_exact"] != true {
        failures.push("counts not exact".into());
    }
    if let (Some(first), Some(last)) = (samples.get(1), samples.last()) {
        // Descriptors and threads are steady after the first minute of namespaces and workers.
        if last.fds > first.fds + 8 || last.threads > first.threads + 2 {
            failures.push(format!(
                "resources grew: fds {} -> {}, threads {} -> {}",
                first.fds, last.fds, first.threads, last.threads
            ));
        }
    }
    if !top_ok {
        failures.push("--top did not exit cleanly".into());
    }
    let outcome = Outcome {
        minutes: params.minutes,
        sent,
        distinct_flows_estimate: distinct_estimate(sent),
        causes: per_cause,
        lost: num("lost"),
        counts_exact: summary["counts_exact"] == true,
        agg_full: num("agg_full"),
        loop_stall_max_ms: summary["loop_stall_max_ms"].as_f64().unwrap_or(0.0),
        loop_stalls: num("loop_stalls"),
        evidence_skipped: num("evidence_skipped"),
        peak_rss_mb: peak,
        samples,
        top: TopOutcome {
            seconds: params.top_seconds,
            peak_rss_mb: top_peak,
            frames,
            exit_ok: top_ok,
        },
        passed: failures.is_empty(),
        failures,
    };
    fs::write(out_json, serde_json::to_string_pretty(&outcome)? + "\n")?;
    write_markdown(out_md, &outcome)?;
    let _ = fs::remove_dir_all(&scratch);
    if !outcome.passed {
        bail!("soak failed: {}", outcome.failures.join("; "));
    }
    eprintln!("soak: passed ({} datagrams)", outcome.sent);
    Ok(())
}

/// Distinct (source port, destination) pairs expected among `n` random draws.
fn distinct_estimate(n: u64) -> u64 {
    let space = SOCKETS as f64
        * ((RULE_PORTS.1 - RULE_PORTS.0) as f64 + (CLOSED_PORTS.1 - CLOSED_PORTS.0) as f64 + 65536.0);
    (space * (1.0 - (-(n as f64) / space).exp())) as u64
}

/// Storms for `dur`, sampling the observer every 10 s; returns datagrams sent and samples.
fn storm_while_sampling(
    t: &Topology,
    dur: Duration,
    obs: &mut Observer,
    out: &Path,
) -> Result<(u64, Vec<Sample>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (flag, count) = (stop.clone(), sent.clone());
    let samples = std::thread::scope(|s| -> Result<Vec<Sample>> {
        let a = &t.a;
        s.spawn(move || a.run(|| storm(&flag, &count)));
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut cpu_before = (obs.cpu_ticks(), Instant::now());
        while start.elapsed() < dur {
            std::thread::sleep(Duration::from_secs(10).min(dur.saturating_sub(start.elapsed())));
            if let Some(status) = obs.exited() {
                stop.store(true, Ordering::Relaxed);
                bail!("dropscope exited during the soak ({status})");
            }
            let ticks = obs.cpu_ticks();
            let cpu = (ticks - cpu_before.0) as f64 / ticks_per_sec()
                / cpu_before.1.elapsed().as_secs_f64()
                * 100.0;
            cpu_before = (ticks, Instant::now());
            let sample = Sample {
                seconds: start.elapsed().as_secs_f64(),
                rss_mb: obs.status_kb("VmRSS") as f64 / 1024.0,
                fds: fs::read_dir(format!("/proc/{}/fd", obs.pid()))
                    .map(|d| d.count())
                    .unwrap_or(0),
                threads: fs::read_dir(format!("/proc/{}/task", obs.pid()))
                    .map(|d| d.count())
                    .unwrap_or(0),
                cpu_percent: cpu,
                lines: fs::File::open(out)
                    .map(|f| BufReader::new(f).lines().count() as u64)
                    .unwrap_or(0),
            };
            eprintln!(
                "soak: {:>5.0} s  {:>11} datagrams  rss {:>5.1} MB  fds {:>3}  threads {:>2}  cpu {:>5.1}%  {} lines",
                sample.seconds,
                sent.load(Ordering::Relaxed),
                sample.rss_mb,
                sample.fds,
                sample.threads,
                sample.cpu_percent,
                sample.lines
            );
            samples.push(sample);
        }
        stop.store(true, Ordering::Relaxed);
        Ok(samples)
    })?;
    Ok((sent.load(Ordering::Relaxed), samples))
}

/// Random datagrams from A until `stop`: each to a rule-dropped port of B, a closed port of B,
/// or an address R has no route to, from one of [`SOCKETS`] source ports.
fn storm(stop: &AtomicBool, sent: &AtomicU64) {
    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind sender"))
        .collect();
    let payload = [0x5au8; 32];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    let mut addrs = vec![
        libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        BATCH
    ];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    let mut next = move || {
        // xorshift64*: fast, and enough to spread flows.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for a in addrs.iter_mut() {
            let r = next();
            let (dst, port) = match r % 3 {
                0 => (B, RULE_PORTS.0 + (r >> 8) as u16 % (RULE_PORTS.1 - RULE_PORTS.0 + 1)),
                1 => (
                    B,
                    CLOSED_PORTS.0 + (r >> 8) as u16 % (CLOSED_PORTS.1 - CLOSED_PORTS.0 + 1),
                ),
                _ => (
                    Ipv4Addr::new(10, 241, (r >> 8) as u8, (r >> 16) as u8),
                    (r >> 24) as u16 | 1,
                ),
            };
            a.sin_port = port.to_be();
            a.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        }
        let mut msgs = crate::bench::sender::mmsg_headers(&mut addrs, &mut iov);
        let sock = &socks[i % SOCKETS];
        i += 1;
        // SAFETY: msgs points at BATCH valid headers whose buffers outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The release dropscope watching R and B, its output to a file.
struct Observer {
    child: Child,
}

impl Observer {
    fn start(bin: &Path, t: &Topology, args: &[&str], out: &Path, scratch: &Path) -> Result<Self> {
        let ready = scratch.join("ready");
        let _ = fs::remove_file(&ready);
        let child = Command::new(bin)
            .args(["--netns", &t.r.name, "--netns", &t.b.name, "--ready-file"])
            .arg(&ready)
            .args(args)
            .stdout(fs::File::create(out)?)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut obs = Observer { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Some(s) = obs.exited() {
                bail!("dropscope exited before attaching ({s})");
            }
            if Instant::now() > deadline {
                bail!("dropscope did not attach within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(obs)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn status_kb(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn cpu_ticks(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
                Some(after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    }

    fn stop(mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child.
        if unsafe { libc::kill(self.pid() as i32, libc::SIGINT) } != 0 {
            bail!("signalling dropscope: {}", std::io::Error::last_os_error());
        }
        Ok(self.child.wait()?)
    }

    /// Stops it and returns its summary record.
    fn stop_json(self, out: &Path) -> Result<Value> {
        let status = self.stop()?;
        if !status.success() {
            bail!("dropscope exited with {status}");
        }
        let last = fs::read_to_string(out)?
            .lines()
            .last()
            .map(str::to_string)
            .context("no output")?;
        let v: Value = serde_json::from_str(&last).context("summary line")?;
        if v["type"] != "summary" {
            bail!("the last line is not the summary: {last}");
        }
        Ok(v)
    }
}

const BEGIN: &str = "<!-- soak:begin -->";
const END: &str = "<!-- soak:end -->";

/// The soak section of a BENCHMARKS.md text, markers included (the benchmark keeps it when it
/// rewrites the file).
pub fn section(markdown: &str) -> Option<&str> {
    let a = markdown.find(BEGIN)?;
    let b = markdown[a..].find(END)? + a;
    Some(&markdown[a..b + END.len()])
}

/// Writes the soak section of BENCHMARKS.md (between its markers; appended the first time).
fn write_markdown(path: &Path, o: &Outcome) -> Result<()> {
    let mut s = String::new();
    s.push_str(&format!("{BEGIN}\n## Soak (`cargo xtask soak`)\n\n"));
    s.push_str(&format!(
        "{:.0} minutes of random UDP flows (~{} distinct source port and destination pairs, {} datagrams) from A through router R to B, dropped three ways at once: R's nftables rule, closed ports at B, no route at R. The release dropscope watched R and B with `--format json`, then {:.0} s with `--top`. Result: **{}**.\n\n",
        o.minutes,
        o.distinct_flows_estimate,
        o.sent,
        o.top.seconds,
        if o.passed { "passed".to_string() } else { format!("failed: {}", o.failures.join("; ")) }
    ));
    s.push_str("| cause | dropscope | kernel counter |\n|---|---:|---:|\n");
    for (c, r, k) in &o.causes {
        s.push_str(&format!("| {c} | {r} | {k} |\n"));
    }
    s.push_str(&format!(
        "\nEvents lost: {}; counts exact: {}; aggregation table full: {}; drops classified without evidence: {}; longest event-loop turn: {:.1} ms ({} over 100 ms).\n\n",
        o.lost, o.counts_exact, o.agg_full, o.evidence_skipped, o.loop_stall_max_ms, o.loop_stalls
    ));
    let first = o.samples.first().cloned().unwrap_or_default();
    let last = o.samples.last().cloned().unwrap_or_default();
    s.push_str(&format!(
        "dropscope's RSS: peak {:.1} MB (stream), {:.1} MB (`--top`); descriptors {} -> {}, threads {} -> {} from the first sample to the last; CPU {:.0}% at the end. Samples every 10 s: `bench/soak.json`.\n{END}\n",
        o.peak_rss_mb, o.top.peak_rss_mb, first.fds, last.fds, first.threads, last.threads, last.cpu_percent
    ));
    let old = fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if b > a => format!(
            "{}{}{}",
            &old[..a],
            s,
            old[b + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{}", old.trim_end(), s),
    };
    fs::write(path, new)?;
    Ok(())
}

/// Where the soak writes.
pub fn outputs(root: &Path) -> (PathBuf, PathBuf) {
    (root.join("BENCHMARKS.md"), root.join("bench/soak.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soak_section_is_found_between_its_markers() {
        let md = format!("# Benchmarks\n\nstorms\n\n{BEGIN}\n## Soak\n\nfigures\n{END}\ntail\n");
        assert_eq!(section(&md), Some(&format!("{BEGIN}\n## Soak\n\nfigures\n{END}")[..]));
        assert_eq!(section("# Benchmarks\n"), None);
        assert_eq!(section(&format!("{END}\n{BEGIN}\n")), None);
    }
}
