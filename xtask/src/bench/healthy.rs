//! The healthy path, in a VM whose kernel allows the context probes: forwarded traffic through
//! an accepting ruleset, with and without dropscope.
//!
//! The host boots the VM (`crate::vm::run_command`) with this program as the guest command
//! (`xtask bench-guest`): it builds the topology, runs the observers interleaved, and prints
//! its results as JSON on its standard output, which the VM hands back to the host.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use dropscope_tests::{nft_rule_packets, topology::B4, Nstat, Topology};
use serde::{Deserialize, Serialize};

use super::{
    observer::{Kind, Running},
    report::{show, stats, Stats},
    sender,
    stats::{ProgramCost, StatsOn},
};

/// Comment of the nftables rule in R that accepts, and counts, every forwarded packet.
const RULE: &str = "bench-healthy";
/// The port of the sink in B.
const PORT: u16 = 40000;
/// Datagrams per sendmmsg and recvmmsg call.
const BATCH: usize = 64;
/// Datagrams in flight at most (sent, not yet read by the sink): the sender waits for the sink,
/// so no queue on the way (the backlog, the sink's receive buffer) ever overflows.
const WINDOW: u64 = 512;
/// The sink's receive buffer: far more than WINDOW datagrams take.
const RCVBUF: libc::c_int = 8 << 20;
/// The target of the issue, in the VM.
const TARGET_NS: f64 = 5.0;

/// Which VM and how long.
#[derive(Debug, Clone, Serialize)]
pub struct VmParams {
    pub kernel: String,
    pub reps: usize,
    pub seconds: f64,
}

/// Arguments of the guest side (`xtask bench-guest`).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct GuestArgs {
    #[arg(long)]
    pub reps: usize,
    #[arg(long)]
    pub seconds: f64,
    #[arg(long)]
    pub bin: String,
}

/// What watches the forwarded traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observer {
    /// Nothing attached: the baseline.
    None,
    /// dropscope with its defaults: the hot-path context probes loaded, attached only while
    /// netfilter or forwarding drops occur.
    Dropscope,
    /// dropscope --context-arm always: the hot-path context probes attached all along.
    DropscopeArmAlways,
}

impl Observer {
    pub const ALL: [Observer; 3] = [
        Observer::None,
        Observer::Dropscope,
        Observer::DropscopeArmAlways,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Observer::None => "no observer",
            Observer::Dropscope => "dropscope (default: context probes on demand)",
            Observer::DropscopeArmAlways => "dropscope --context-arm always",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Observer::None => Kind::None,
            Observer::Dropscope | Observer::DropscopeArmAlways => Kind::DropscopeText,
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            Observer::DropscopeArmAlways => vec!["--context-arm".into(), "always".into()],
            _ => Vec::new(),
        }
    }
}

/// One observer watching one run of forwarded traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthyRun {
    pub rep: usize,
    pub observer: Observer,
    /// Datagrams sent from A, every one of them read by the sink in B (the run fails otherwise).
    pub sent: u64,
    /// Packets R forwarded, by its nftables rule counter.
    pub forwarded: u64,
    pub packets_per_sec: f64,
    /// Run time of all dropscope's programs per forwarded packet (the kernel's accounting).
    pub ns_per_packet: Option<f64>,
    /// Runs of all dropscope's programs per forwarded packet.
    pub runs_per_packet: Option<f64>,
    pub programs: Vec<ProgramCost>,
}

/// What the guest measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HealthyResults {
    /// The guest kernel's release.
    pub kernel: String,
    /// How QEMU ran the guest (kvm or tcg), set by the host.
    #[serde(default)]
    pub accel: String,
    pub reps: usize,
    pub seconds: f64,
    pub runs: Vec<HealthyRun>,
}

/// Boots the VM with `xtask bench-guest` and reads back what it measured with `bin`.
pub fn run(root: &Path, bin: &Path, vm: &VmParams) -> Result<HealthyResults> {
    let xtask = std::env::current_exe().context("locating the xtask executable")?;
    let out = crate::vm::run_command(root, &vm.kernel, &[&xtask, bin], |copies| {
        vec![
            copies[0].display().to_string(),
            "bench-guest".into(),
            "--reps".into(),
            vm.reps.to_string(),
            "--seconds".into(),
            vm.seconds.to_string(),
            "--bin".into(),
            copies[1].display().to_string(),
        ]
    })?;
    let mut results: HealthyResults = serde_json::from_str(&out.lines.join("\n"))
        .context("reading the results the guest printed")?;
    results.accel = out.accel.to_string();
    Ok(results)
}

/// The guest side: every observer in turn, `reps` times, order rotated; JSON on stdout.
pub fn guest_main(args: &GuestArgs) -> Result<()> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let bin = Path::new(&args.bin);
    let dur = Duration::from_secs_f64(args.seconds);
    let t = Topology::new();
    // Every forwarded packet goes through nf_hook_slow and nft_do_chain, and is accepted.
    t.r.sh(&format!(
        "nft add table inet bench; nft add chain inet bench f '{{ type filter hook forward priority 0; }}'; \
         nft add rule inet bench f counter accept comment '\"{RULE}\"'"
    ));
    let scratch = super::tempdir()?;
    let _stats = StatsOn::enable()?;
    // A first, unmeasured flow warms caches and neighbours.
    flow(Sockets::open(&t)?, Duration::from_secs(1));
    let mut runs = Vec::new();
    for rep in 0..args.reps {
        // Interleaved, the order rotated each repetition, so drift hits every observer.
        let mut order = Observer::ALL.to_vec();
        order.rotate_left(rep % Observer::ALL.len());
        for observer in order {
            let run = one(&t, observer, rep, bin, dur, &scratch)
                .with_context(|| format!("healthy path with {}", observer.label()))?;
            eprintln!(
                "bench-guest: rep {} {:<46} {:>8.0} packets/s  {:>7} ns/packet  {:>5} runs/packet",
                rep + 1,
                observer.label(),
                run.packets_per_sec,
                run.ns_per_packet.map_or("-".into(), |v| format!("{v:.1}")),
                run.runs_per_packet
                    .map_or("-".into(), |v| format!("{v:.2}")),
            );
            runs.push(run);
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    let results = HealthyResults {
        kernel,
        // Only the host knows.
        accel: String::new(),
        reps: args.reps,
        seconds: args.seconds,
        runs,
    };
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

fn one(
    t: &Topology,
    observer: Observer,
    rep: usize,
    bin: &Path,
    dur: Duration,
    scratch: &Path,
) -> Result<HealthyRun> {
    let obs = Running::start(observer.kind(), bin, scratch, &observer.args())?;
    let forwarded_before = nft_rule_packets(&t.r, RULE);
    let udp_before = Nstat::read(&t.b);
    // Opened before the programs' counters are read: only the traffic is measured.
    let sockets = Sockets::open(t)?;
    let progs_before = obs.programs.snapshot();
    let f = flow(sockets, dur);
    let progs_after = obs.programs.snapshot();
    let forwarded = nft_rule_packets(&t.r, RULE) - forwarded_before;
    let udp_errors = Nstat::delta(&t.b, &udp_before, "UdpInErrors");
    let programs = obs.programs.delta(&progs_before, &progs_after);
    let observed = obs.pid().is_some();
    obs.stop()?;
    ensure!(
        f.received == f.sent && udp_errors == 0,
        "the healthy path lost packets: {} sent, {} read by the sink, UdpInErrors +{udp_errors} in B",
        f.sent,
        f.received
    );
    let per_packet = |v: u64| (observed && forwarded > 0).then(|| v as f64 / forwarded as f64);
    Ok(HealthyRun {
        rep,
        observer,
        sent: f.sent,
        forwarded,
        packets_per_sec: forwarded as f64 / f.secs,
        ns_per_packet: per_packet(programs.iter().map(|p| p.run_time_ns).sum()),
        runs_per_packet: per_packet(programs.iter().map(|p| p.run_cnt).sum()),
        programs,
    })
}

/// One flow's counts.
struct Flow {
    sent: u64,
    received: u64,
    secs: f64,
}

/// The sink in B and the source in A.
struct Sockets {
    sink: UdpSocket,
    source: UdpSocket,
    dst: Ipv4Addr,
}

impl Sockets {
    fn open(t: &Topology) -> Result<Self> {
        let dst: Ipv4Addr = B4.parse()?;
        // Sockets stay in the namespace they were opened in.
        let sink = t.b.run(|| UdpSocket::bind((dst, PORT)))?;
        force_rcvbuf(&sink)?;
        // The sink's wait is bounded, so it sees the stop flag.
        sink.set_read_timeout(Some(Duration::from_millis(50)))?;
        let source = t.a.run(|| UdpSocket::bind("0.0.0.0:0"))?;
        Ok(Sockets { sink, source, dst })
    }
}

/// UDP from A through R to the sink in B for `dur`, at most WINDOW datagrams in flight; then
/// waits for the sink to read what is still on its way.
fn flow(sockets: Sockets, dur: Duration) -> Flow {
    let Sockets { sink, source, dst } = sockets;
    let received = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (sent, secs) = std::thread::scope(|s| {
        s.spawn(|| drain(&sink, &received, &stop));
        let started = Instant::now();
        let sent = pump(&source, dst, &received, dur);
        let secs = started.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::Acquire) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        (sent, secs)
    });
    Flow {
        sent,
        received: received.load(Ordering::Acquire),
        secs,
    }
}

/// Sends 64-byte datagrams to `dst` in batches for `dur`, never more than WINDOW ahead of
/// what the sink has read; returns how many were sent.
fn pump(sock: &UdpSocket, dst: Ipv4Addr, received: &AtomicU64, dur: Duration) -> u64 {
    let payload = [0x5au8; 64];
    let mut addrs = vec![sender::sockaddr(dst, PORT); BATCH];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    let mut msgs = sender::mmsg_headers(&mut addrs, &mut iov);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        let in_flight = sent.saturating_sub(received.load(Ordering::Acquire));
        if in_flight + BATCH as u64 > WINDOW {
            std::thread::yield_now();
            continue;
        }
        // SAFETY: msgs points at BATCH valid headers whose buffers outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// Reads datagrams in batches until `stop`, counting them in `received`.
fn drain(sock: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) {
    let mut bufs = vec![[0u8; 128]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: a zeroed mmsghdr is valid; the fields set point at live buffers.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    while !stop.load(Ordering::Acquire) {
        // SAFETY: msgs points at BATCH valid headers whose buffers outlive the call; the
        // socket's read timeout bounds the wait for the first datagram (MSG_WAITFORONE).
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Release);
        }
    }
}

/// Sets the receive buffer past net.core.rmem_max (SO_RCVBUFFORCE, as root).
fn force_rcvbuf(sock: &UdpSocket) -> Result<()> {
    // SAFETY: setsockopt reads an int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&RCVBUF as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The runs of one observer.
fn runs_of(h: &HealthyResults, o: Observer) -> impl Iterator<Item = &HealthyRun> {
    h.runs.iter().filter(move |r| r.observer == o)
}

fn stat_of(
    h: &HealthyResults,
    o: Observer,
    f: impl Fn(&HealthyRun) -> Option<f64>,
) -> Option<Stats> {
    stats(runs_of(h, o).filter_map(f).collect())
}

/// The cost per forwarded packet in one run of the programs named `name`: (ns, runs). The
/// kernel cuts names to 15 characters, so several programs may share one (an fentry and an
/// fexit program on the same function): they are added together.
fn program_per_packet(r: &HealthyRun, name: &str) -> Option<(f64, f64)> {
    let mine = || r.programs.iter().filter(|p| p.name == name);
    (r.forwarded > 0 && mine().next().is_some()).then(|| {
        let n = r.forwarded as f64;
        let ns: u64 = mine().map(|p| p.run_time_ns).sum();
        let runs: u64 = mine().map(|p| p.run_cnt).sum();
        (ns as f64 / n, runs as f64 / n)
    })
}

/// The healthy-path part of BENCHMARKS.md, and its targets.
pub fn section(md: &mut String, targets: &mut Vec<(String, bool)>, h: &HealthyResults) {
    let _ = writeln!(
        md,
        "## Healthy path: forwarded packets that are not dropped (VM, kernel {})\n",
        h.kernel
    );
    let _ = writeln!(
        md,
        "In a QEMU VM ({accel}) booted with Debian's kernel {kernel}, where the context probes \
         attach with fentry/fexit. UDP (64-byte payloads, sendmmsg/recvmmsg) from namespace A through \
         router R to a sink in B, {secs} s per run; R's nftables forward chain accepts every packet \
         with a counting rule, so each one goes through `nf_hook_slow` and `nft_do_chain`. The sender \
         keeps at most {WINDOW} datagrams ahead of what the sink has read, so nothing is dropped: a run \
         in which the sink read fewer datagrams than were sent, or B counted UDP errors, fails. \
         {reps} interleaved repetitions per observer (order rotated each time); medians with [min–max]. \
         **Packets/s** is R's rule counter over the run; **ns per forwarded packet** is the run time \
         of all dropscope's programs (`BPF_ENABLE_STATS`) divided by that counter, **runs per packet** \
         their run counts likewise. The observers: nothing; dropscope with its defaults (the \
         hot-path context probes loaded at start and attached only while netfilter or forwarding \
         drops occur); dropscope `--context-arm always` (attached from start to exit). \
         {emulation}\n",
        accel = h.accel,
        emulation = if h.accel == "kvm" {
            ""
        } else {
            "Emulation (TCG) inflates every absolute time and lowers every rate: read the ratios."
        },
        kernel = h.kernel,
        secs = h.seconds,
        reps = h.reps,
    );
    let none = stat_of(h, Observer::None, |r| Some(r.packets_per_sec));
    let _ = writeln!(
        md,
        "| observer | packets/s | throughput vs no observer (ratio of medians) | dropscope ns per forwarded packet | dropscope program runs per forwarded packet |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for o in Observer::ALL {
        let pps = stat_of(h, o, |r| Some(r.packets_per_sec));
        if pps.is_none() {
            continue;
        }
        let ratio = match (pps, none) {
            (Some(p), Some(n)) if n.median > 0.0 => format!("{:.3}", p.median / n.median),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {ratio} | {} | {} |",
            o.label(),
            show(pps, 0),
            show(stat_of(h, o, |r| r.ns_per_packet), 2),
            show(stat_of(h, o, |r| r.runs_per_packet), 2),
        );
    }
    let _ = writeln!(md);

    // dropscope's programs that ran at all, by observer: a program's name is the same in
    // every run, its id is not.
    let ran: BTreeSet<&str> = h
        .runs
        .iter()
        .flat_map(|r| r.programs.iter())
        .filter(|p| p.run_cnt > 0)
        .map(|p| p.name.as_str())
        .collect();
    let held: BTreeSet<&str> = h
        .runs
        .iter()
        .flat_map(|r| r.programs.iter())
        .map(|p| p.name.as_str())
        .collect();
    let _ = writeln!(
        md,
        "Per program, ns and runs per forwarded packet (medians); the {} other programs dropscope \
         holds did not run in any run. Names are the kernel's, cut to 15 characters; programs that \
         share a cut name (an fentry and an fexit program on the same function) are added together:\n",
        held.len() - ran.len()
    );
    let dropscope = [Observer::Dropscope, Observer::DropscopeArmAlways];
    let _ = writeln!(
        md,
        "| program | {} | {} |",
        dropscope[0].label(),
        dropscope[1].label()
    );
    let _ = writeln!(md, "|---|---|---|");
    for name in &ran {
        let cell = |o: Observer| {
            let ns = stat_of(h, o, |r| program_per_packet(r, name).map(|c| c.0));
            let runs = stat_of(h, o, |r| program_per_packet(r, name).map(|c| c.1));
            match (ns, runs) {
                (Some(ns), Some(runs)) => format!("{:.2} ns, {:.2} runs", ns.median, runs.median),
                _ => "–".into(),
            }
        };
        let _ = writeln!(
            md,
            "| `{name}` | {} | {} |",
            cell(dropscope[0]),
            cell(dropscope[1])
        );
    }
    if ran.is_empty() {
        let _ = writeln!(md, "| (none ran) | | |");
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "*Within noise* means that dropscope's median packets/s is no lower than the slowest run \
         with no observer: the runs without any observer spread that far on their own.\n"
    );

    let default_ns = stat_of(h, Observer::Dropscope, |r| r.ns_per_packet);
    // Zero by default means something only where the probes do run when attached: a VM whose
    // kernel refused them would show zero either way.
    let probes_run = stat_of(h, Observer::DropscopeArmAlways, |r| r.runs_per_packet)
        .is_some_and(|runs| runs.min > 0.0);
    if let Some(ns) = default_ns {
        targets.push((
            format!(
                "healthy path: dropscope default ≤ {TARGET_NS} ns per forwarded packet (kernel accounting, VM: kernel {}, {}): {} ns{}",
                h.kernel,
                h.accel,
                show(Some(ns), 2),
                if probes_run {
                    ""
                } else {
                    " (not shown: the probes did not run with --context-arm always either)"
                }
            ),
            probes_run && ns.median <= TARGET_NS,
        ));
    }
    if let (Some(n), Some(d)) = (
        none,
        stat_of(h, Observer::Dropscope, |r| Some(r.packets_per_sec)),
    ) {
        targets.push((
            format!(
                "healthy path: throughput within noise of no observer: dropscope default {:.0} packets/s = {:.3} × no observer's {:.0}, whose slowest run is {:.3} × its median",
                d.median,
                d.median / n.median,
                n.median,
                n.min / n.median
            ),
            d.median >= n.min,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(observer: Observer, pps: f64, ns: u64) -> HealthyRun {
        let forwarded = 1000;
        HealthyRun {
            rep: 0,
            observer,
            sent: forwarded,
            forwarded,
            packets_per_sec: pps,
            ns_per_packet: (observer != Observer::None).then(|| ns as f64 / forwarded as f64),
            runs_per_packet: (observer != Observer::None).then_some(if ns > 0 { 2.0 } else { 0.0 }),
            // nf_hook_slow's fentry and fexit programs: one name once the kernel cuts it.
            programs: [7, 8]
                .into_iter()
                .filter(|_| observer != Observer::None)
                .map(|id| ProgramCost {
                    id,
                    name: "nf_hook_slow_fe".into(),
                    run_time_ns: ns / 2,
                    run_cnt: if ns > 0 { forwarded } else { 0 },
                })
                .collect(),
        }
    }

    #[test]
    fn targets_from_medians_and_the_baseline_spread() {
        let h = HealthyResults {
            kernel: "6.12.0".into(),
            accel: "tcg".into(),
            reps: 2,
            seconds: 1.0,
            runs: vec![
                run(Observer::None, 100.0, 0),
                run(Observer::None, 110.0, 0),
                run(Observer::Dropscope, 104.0, 0),
                run(Observer::Dropscope, 102.0, 0),
                run(Observer::DropscopeArmAlways, 80.0, 300_000),
                run(Observer::DropscopeArmAlways, 82.0, 310_000),
            ],
        };
        let (mut md, mut targets) = (String::new(), Vec::new());
        section(&mut md, &mut targets, &h);
        assert_eq!(targets.len(), 2);
        assert!(targets.iter().all(|(_, met)| *met), "{targets:?}");
        assert!(
            md.contains("| `nf_hook_slow_fe` | 0.00 ns, 0.00 runs | 305.00 ns, 2.00 runs |"),
            "{md}"
        );
        // Slower than the slowest baseline run: outside the noise.
        let mut slow = h.clone();
        for r in &mut slow.runs {
            if r.observer == Observer::Dropscope {
                r.packets_per_sec = 99.0;
            }
        }
        let mut targets = Vec::new();
        section(&mut String::new(), &mut targets, &slow);
        assert!(!targets[1].1);
        // Probes that never ran, even attached all along: zero by default proves nothing.
        let mut refused = h.clone();
        refused.runs.retain(|r| r.observer != Observer::DropscopeArmAlways);
        refused
            .runs
            .extend([run(Observer::DropscopeArmAlways, 100.0, 0)]);
        let mut targets = Vec::new();
        section(&mut String::new(), &mut targets, &refused);
        assert!(!targets[0].1, "{targets:?}");
    }
}
