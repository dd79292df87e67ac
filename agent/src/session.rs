//! One observation session: attach -> stream through the pipeline -> summary -> detach.
//! Every exit path (Ctrl-C, SIGTERM, --duration, an error) drops the probes, which detaches
//! them; the kernel also releases them if the process dies, since nothing is pinned.
use std::{
    cell::RefCell,
    io::IsTerminal,
    path::Path,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_ebpf::{AggKey, AggVal, CpuState};
use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal, SignalKind},
};

use crate::{
    capture::{file::PcapFile, PacketTap},
    causes::Engine,
    changes::{self, feed::Feed, watcher::Watcher},
    classify::{Classifier, Runner},
    cli::{Color, Format, ObserveArgs, RunArgs},
    events::{Decoder, Record},
    evidence::{counters, investigator, rules},
    netns,
    kernel::{
        agg::AggTable,
        attach,
        context_probes::{ContextProbes, Needs},
        kallsyms::Kallsyms,
        preflight,
    },
    output::{json::JsonSink, text::TextSink, top::TopView, AttachInfo, Clock, Progress, Sink},
    output::monotonic_ns,
    pipeline::{Pipeline, StackReader, Traced, Watched},
    pods::{self, PodName},
};

/// The default mode: the live stream (text, JSON or `--top`) until the duration ends or a
/// signal arrives.
pub async fn run(args: RunArgs) -> Result<()> {
    if args.null_observer {
        preflight::check_privileges()?;
        return null_observer(&args.observe).await;
    }
    let tap = match &args.pcap {
        Some(target) => {
            let about = session_about(&args.observe);
            Some(
                Box::new(PcapFile::create(target, args.observe.snaplen, &about)?)
                    as Box<dyn PacketTap>,
            )
        }
        None => None,
    };
    // `--pcap -` owns standard output: the stream goes to standard error.
    let mut sink = if args.pcap.as_deref() == Some("-") {
        stream_sink(&args, std::io::stderr(), std::io::stderr().is_terminal())
    } else {
        stream_sink(&args, std::io::stdout(), std::io::stdout().is_terminal())
    };
    observe(&args.observe, sink.as_mut(), tap).await
}

/// What a capture's section comment says about the session: filters and sampling.
fn session_about(args: &ObserveArgs) -> String {
    let mut parts = Vec::new();
    if !args.expression.is_empty() {
        parts.push(format!("Filter expression: {}.", args.expression.join(" ")));
    }
    if args.sample > 0 {
        parts.push(format!(
            "The kernel sends at most {} drops per kind and second per CPU; the rest are counted, not written.",
            args.sample
        ));
    }
    parts.join(" ")
}

/// Where the live stream goes: text, JSON lines or the `--top` view.
fn stream_sink<W: std::io::Write + 'static>(args: &RunArgs, out: W, tty: bool) -> Box<dyn Sink> {
    let clock = Clock::new();
    match args.format {
        _ if args.top => Box::new(TopView::new(out, tty)),
        Format::Json => Box::new(JsonSink::new(out, clock)),
        Format::Text => {
            let color = match args.color {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => tty,
            };
            Box::new(TextSink::new(out, clock, color))
        }
    }
}

/// Attaches, feeds every drop into `sink` until the duration ends or SIGINT/SIGTERM arrives,
/// then detaches and hands `sink` the summary. Every mode that watches drops runs this loop.
/// With a `tap`, every reported drop's packet also goes there (the kernel then copies packet
/// bytes for the drops it delivers); a failing tap (a full disk under `--pcap`) ends the
/// session: the probes are detached, the summary given, and the error returned.
pub async fn observe(
    args: &ObserveArgs,
    sink: &mut dyn Sink,
    tap: Option<Box<dyn PacketTap>>,
) -> Result<()> {
    let sink = &mut crate::output::LostByCause::new(sink);
    let started = Instant::now();
    preflight::check_privileges()?;
    // Handlers first: a signal that arrives while attaching, or right after the ready file
    // appears, must still end in a summary and a clean detach.
    let mut stop = Stop::install()?;
    let mut session = Session::start(args, started, tap)?;
    let _ready = args
        .ready_file
        .as_deref()
        .map(ReadyFile::create)
        .transpose()?;
    sink.attach(&session.info);
    stop.run_for(args.duration);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.interval));
    let verdicts = session.pipeline.verdicts_ready();
    let mut failed = None;
    let mut fault = crate::fault::Fault::from_env();
    loop {
        // Only wait here; the work runs below, where its duration is measured.
        let wake = tokio::select! {
            guard = session.ring.readable_mut() => {
                // Cleared before draining: a record that arrives meanwhile wakes us again.
                guard.context("ring buffer poll")?.clear_ready();
                Wake::Ring
            }
            _ = session.changes.queued() => Wake::Changes,
            _ = verdicts.notified() => Wake::Verdicts,
            _ = tick.tick() => Wake::Tick,
            _ = stop.wait() => break,
        };
        let busy = Instant::now();
        match wake {
            Wake::Ring => {
                let needs = drain(
                    session.ring.get_mut(),
                    &mut session.decoder,
                    &mut session.pipeline,
                    sink,
                );
                session.arm(needs);
            }
            Wake::Changes => session.pipeline.take_changes(sink),
            Wake::Verdicts => session.pipeline.take_verdicts(sink),
            Wake::Tick => {
                session.tick(sink, args.interval);
                fault.strike();
            }
        }
        session.stalls.observe(busy.elapsed());
        if let Err(e) = session.flush_tap() {
            failed = Some(e);
            break;
        }
    }
    let finished = session.finish(sink);
    match failed {
        Some(e) => Err(e),
        None => finished,
    }
}

/// How long the event loop was kept from reading the ring: the longest turn, and how many
/// turns took longer than [`Stalls::LONG`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Stalls {
    pub max: Duration,
    pub long: u64,
}

impl Stalls {
    /// A turn longer than this is a stall worth reporting.
    pub const LONG: Duration = Duration::from_millis(100);

    fn observe(&mut self, turn: Duration) {
        self.max = self.max.max(turn);
        if turn > Self::LONG {
            self.long += 1;
        }
    }
}

/// What woke the event loop.
enum Wake {
    Ring,
    Changes,
    Verdicts,
    Tick,
}

/// What ends a session: SIGINT, SIGTERM or the end of `--duration`.
struct Stop {
    sigint: Signal,
    sigterm: Signal,
    deadline: Option<tokio::time::Instant>,
}

impl Stop {
    fn install() -> Result<Self> {
        let sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        Ok(Stop {
            sigint,
            sigterm,
            deadline: None,
        })
    }

    /// Starts the `--duration` clock (none: until a signal).
    fn run_for(&mut self, duration: Option<f64>) {
        self.deadline = duration.map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    }

    /// Resolves when the session should end (cancel-safe: used in a select loop).
    async fn wait(&mut self) {
        let deadline = self.deadline;
        let until = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
            _ = until => {}
        }
    }
}

/// Attached probes and the pipeline their drops go through.
struct Session {
    ring: AsyncFd<RingBuf<MapData>>,
    decoder: Decoder,
    pipeline: Pipeline,
    counters: PerCpuArray<MapData, CpuState>,
    /// The context probes attached while drops need them.
    context: ContextProbes,
    agg: AggTable,
    /// The kernel's per-key counts as last read, and the drops it had seen then: a table
    /// that cannot have changed is not read again.
    agg_cache: Vec<(AggKey, AggVal)>,
    agg_seen: Option<u64>,
    /// Owns the programs: dropping it detaches them.
    ebpf: aya::Ebpf,
    /// Configuration changes, from the change watcher's thread.
    changes: Arc<Feed>,
    stalls: Stalls,
    watcher: Watcher,
    info: AttachInfo,
    streaming: Instant,
}

impl Session {
    /// Resolves the kernel's layout, attaches the probes and builds the pipeline.
    fn start(
        args: &ObserveArgs,
        started: Instant,
        tap: Option<Box<dyn PacketTap>>,
    ) -> Result<Self> {
        let filter = args.filter()?;
        // Symbols and firewall rule counters load while the programs are verified and attached.
        let symbols = std::thread::spawn(Kallsyms::load);
        let watched = filter.netns.clone();
        let rule_baseline = std::thread::spawn(move || baselines(&watched));
        let (pods_root, wanted_pods) = (args.pods_root.clone(), filter.pods.clone());
        let pod_scan = std::thread::spawn(move || {
            let mut resolver = pods::Resolver::new(&pods_root, wanted_pods);
            resolver.scan();
            resolver
        });
        preflight::raise_memlock();
        let mut probes = attach::attach(&attach::Settings {
            btf: &args.btf,
            mode: args.attach,
            context: args.context,
            arming: args.context_arm,
            linger: Duration::from_secs_f64(args.context_linger),
            sample_per_sec: args.sample,
            filters: filter.to_kernel(),
            snaplen: tap.as_ref().map(|t| t.snaplen()),
        })?;
        let attach_ms = started.elapsed().as_millis();
        attach::release_freed_memory();
        tracing::info!(
            "attached in {attach_ms} ms (load+verify+attach {} ms)",
            probes.attach_ms
        );
        // The netlink monitors open per namespace as namespaces appear (see changes::watcher).
        probes.report.push(attach::Attached {
            probe: "rtnetlink",
            mode: "netlink",
            note: Some("links, routes, addresses, device forwarding and rp_filter, in each watched namespace; the kernel does not say which process".into()),
        });
        probes.report.push(attach::Attached {
            probe: "nftables",
            mode: "netlink",
            note: Some("each committed ruleset generation with the committing process, in each watched namespace".into()),
        });
        let info = AttachInfo {
            probes: probes.report.clone(),
            attach_ms,
            kernel: kernel_release(),
            reasons: probes.reasons.len(),
            limits: if probes.reasons.is_absent() {
                vec![crate::kernel::btf::NO_REASONS.to_string()]
            } else {
                Vec::new()
            },
            packets: tap.as_ref().map(|t| (t.target(), t.snaplen())),
            expression: filter
                .expr
                .as_ref()
                .map(|_| (args.expression.join(" "), filter.kernel_exact())),
        };

        let symbols = symbols
            .join()
            .map_err(|_| anyhow::anyhow!("kallsyms loader panicked"))?
            .unwrap_or_else(|e| {
                tracing::warn!("{e:#}");
                Kallsyms::empty()
            });
        probes
            .knobs
            .set_no_dev_range(symbols.range("inet_frag_rbtree_purge"));
        let symbols = Rc::new(RefCell::new(symbols));
        let attach::Probes {
            events,
            changes,
            counters,
            context,
            stacks,
            agg,
            ebpf,
            reasons,
            netfilter_names,
            ..
        } = probes;
        let decoder = Decoder::new(reasons, symbols.clone()).with_netfilter_names(netfilter_names);
        let (feed, publisher) = changes::feed::feed().context("creating the change feed")?;
        let feed = Arc::new(feed);
        let watcher = Watcher::start(Some(changes), filter.netns.clone(), monotonic_ns, publisher);
        let stack_reader: StackReader = Box::new(move |id| match stacks.get(&id, 0) {
            Ok(trace) => symbols
                .borrow_mut()
                .frames(trace.frames().iter().map(|f| f.ip)),
            Err(_) => Vec::new(),
        });
        let pods = pod_scan
            .join()
            .map_err(|_| anyhow::anyhow!("pod scanner panicked"))?;
        warn_missing_pods(&filter.pods, &pods, &args.pods_root);
        let traced = traced_answers(&info.probes);
        let watched = watched_changes(&info.probes);
        // The evidence worker starts from the rule and counter baselines, which may still be
        // being read: drops are counted meanwhile, and classified once it is ready.
        let worker_feed = feed.clone();
        let runner = Runner::spawn(move || {
            let (rules, snmp) = rule_baseline.join().unwrap_or_else(|_| {
                tracing::warn!("rule counter reader panicked: rules will not be named");
                (rules::Tracker::new(), counters::Tracker::default())
            });
            tracing::info!(
                "firewall rule counters read ({} ms since start)",
                started.elapsed().as_millis()
            );
            let live = investigator::Live::new(rules, snmp).baselines_at(clock_ns());
            Classifier::new(Engine::builtin(), Box::new(live), traced).with_changes(worker_feed)
        })
        .context("starting the evidence worker")?;
        let blind = Classifier::new(Engine::builtin(), Box::new(investigator::Names::new()), traced);
        let mut pipeline = Pipeline::new(filter, args.all, runner, blind, stack_reader, pods);
        pipeline.watching(watched, feed.clone());
        if let Some(tap) = tap {
            pipeline.set_tap(tap);
        }
        // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd lives.
        let ring = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
        Ok(Session {
            ring,
            decoder,
            pipeline,
            counters,
            context,
            agg,
            agg_cache: Vec::new(),
            agg_seen: None,
            ebpf,
            changes: feed,
            stalls: Stalls::default(),
            watcher,
            info,
            streaming: Instant::now(),
        })
    }

    /// The kernel's counters (`agent_ebpf::CpuState`), summed over CPUs.
    fn counters(&self) -> CpuState {
        let mut sum = CpuState::default();
        if let Ok(per_cpu) = self.counters.get(&0, 0) {
            for c in per_cpu.iter() {
                sum.lost += c.lost;
                sum.seen += c.seen;
                sum.filtered += c.filtered;
                sum.agg_full += c.agg_full;
            }
        }
        sum
    }

    /// Brings `agg_cache` up to the kernel's exact per-key counts, summed over CPUs (read
    /// again only when the kernel has seen drops since the last read).
    fn refresh_agg(&mut self) {
        let seen = self.counters().seen;
        if self.agg_seen != Some(seen) {
            self.agg_cache = self.agg.read();
            self.agg_seen = Some(seen);
        }
    }

    /// Drains the ring, reports what the kernel counted but did not send, and the repeats.
    fn catch_up(&mut self, sink: &mut dyn Sink, final_pass: bool) {
        // The kernel's counts first, then the events: every key counted as sampled in the
        // snapshot sent its first events before that, so they are decoded below and give the
        // key a cause (draining first would leave keys born in between without one).
        let now = clock_ns();
        self.refresh_agg();
        let needs = drain(
            self.ring.get_mut(),
            &mut self.decoder,
            &mut self.pipeline,
            sink,
        );
        let (kernel, decoder) = (&self.agg_cache, &mut self.decoder);
        self.pipeline
            .reconcile(kernel, |k| decoder.synthetic(k, now), sink, false);
        if final_pass {
            // Every drop gets its verdict before the last count.
            self.pipeline.settle(sink);
            self.pipeline
                .reconcile(kernel, |k| decoder.synthetic(k, now), sink, true);
        }
        self.pipeline.flush(sink);
        if !final_pass {
            self.arm(needs);
        }
    }

    /// Makes the packets written so far readable; an error (a full disk) ends the session.
    fn flush_tap(&mut self) -> Result<()> {
        match self.pipeline.tap_mut() {
            Some(tap) => tap.flush(),
            None => Ok(()),
        }
    }

    /// Attaches the context probes the drops just seen need (see `ContextProbes`).
    fn arm(&mut self, needs: Needs) {
        if self.context.has_on_demand() {
            self.context.need(&mut self.ebpf, needs);
        }
    }

    /// Detaches the context probes no drop has needed for a while.
    fn disarm_idle(&mut self) {
        if self.context.has_on_demand() {
            self.context.expire(&mut self.ebpf);
        }
    }

    /// Once per `--interval`.
    fn tick(&mut self, sink: &mut dyn Sink, seconds: f64) {
        self.catch_up(sink, false);
        self.disarm_idle();
        let lost = self.counters().lost;
        let suppressed = self.pipeline.suppressed;
        sink.tick(&Progress {
            causes: &self.pipeline.causes,
            seconds,
            lost,
            suppressed,
            stalls: self.stalls,
        });
    }

    /// Reports what the kernel delivered before the stop, detaches, and hands over the summary.
    fn finish(mut self, sink: &mut dyn Sink) -> Result<()> {
        // Changes made just before the stop are still reported.
        self.changes.nudge();
        self.watcher.stop();
        self.pipeline.take_changes(sink);
        // Stop the kernel side, so that what it counted and what it sent agree exactly.
        unload_programs(&mut self.ebpf);
        self.catch_up(sink, true);
        let c = self.counters();
        let (seen, lost, filtered_in_kernel, agg_full) = (c.seen, c.lost, c.filtered, c.agg_full);
        let Session {
            ring,
            mut pipeline,
            ebpf,
            watcher,
            streaming,
            stalls,
            ..
        } = self;
        drop(watcher);
        drop(ring);
        drop(ebpf);
        tracing::info!("detached");
        let mut summary = pipeline.summary(seen, lost, streaming.elapsed().as_secs_f64());
        summary.filtered += filtered_in_kernel;
        summary.filtered_in_kernel = filtered_in_kernel;
        summary.stalls = stalls;
        if agg_full > 0 {
            summary.agg_full = agg_full;
            summary.counts_exact = false;
        }
        // The capture is completed (its counts written) before the summary names it.
        let mut result = Ok(());
        if let Some(tap) = pipeline.tap_mut() {
            match tap.finish(&summary) {
                Ok(totals) => summary.packets = totals,
                Err(e) => result = Err(e),
            }
        }
        sink.summary(&summary);
        result
    }
}

/// Which configuration changes are watched, from the attach report.
fn watched_changes(probes: &[attach::Attached]) -> Watched {
    let attached = |name: &str| {
        probes
            .iter()
            .any(|p| p.probe == name && p.mode != "unavailable")
    };
    Watched {
        sysctl: attached("sysctl_write"),
        xt_replace: attached("xt_replace"),
        netlink: true,
    }
}

/// Detaches and unloads the tracing programs (drop hooks, answers, context probes), so that
/// nothing more is counted; the maps stay readable.
fn unload_programs(ebpf: &mut aya::Ebpf) {
    use aya::programs::Program;
    for (_, program) in ebpf.programs_mut() {
        let _ = match program {
            Program::BtfTracePoint(p) => p.unload(),
            Program::TracePoint(p) => p.unload(),
            Program::FEntry(p) => p.unload(),
            Program::FExit(p) => p.unload(),
            Program::KProbe(p) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// Which answers the attached probes let dropscope pair with drops.
fn traced_answers(probes: &[attach::Attached]) -> Traced {
    let attached = |name: &str| {
        probes
            .iter()
            .find(|p| p.probe == name)
            .filter(|p| p.mode != "unavailable")
    };
    Traced {
        icmp: attached("icmp_send").is_some(),
        icmp6: attached("icmp6_send").is_some(),
        // Before the tracepoint's `reason` argument, resets answering closed ports are not
        // traced (the attach note says so).
        rst: attached("tcp_send_reset").is_some_and(|p| p.note.is_none()),
    }
}

/// The running kernel's release ("6.18.44-...").
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Feeds every record waiting in the ring buffer through the pipeline; returns which context
/// probes the drops among them need.
fn drain(
    rb: &mut RingBuf<MapData>,
    decoder: &mut Decoder,
    pipeline: &mut Pipeline,
    sink: &mut dyn Sink,
) -> Needs {
    let mut needs = Needs::default();
    while let Some(item) = rb.next() {
        if let Some(record) = decoder.decode(&item) {
            if let Record::Drop(d) = &record {
                needs.add(Needs::of(&d.reason, &d.location, d.iif.is_some()));
            }
            pipeline.push(record, sink);
        }
    }
    needs
}

/// The kernel's monotonic clock (what bpf_ktime_get_ns reads), in ns.
fn clock_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Reads the starting counters of every DROP/REJECT rule and the kernel's SNMP counters, in
/// the watched namespaces (all namespaces when no `--netns` filter is given), so later drops
/// can be matched to a rule and to what the kernel counted with them.
fn baselines(watched: &[u32]) -> (rules::Tracker, counters::Tracker) {
    let mut registry = netns::Registry::new();
    let own = registry.own();
    let targets: Vec<(u32, Option<std::path::PathBuf>)> = registry
        .all()
        .into_iter()
        .filter(|r| watched.is_empty() || watched.contains(&r.inode))
        .map(|r| (r.inode, (r.inode != own).then_some(r.path)))
        .collect();
    let mut counters = counters::Tracker::default();
    for (netns, path) in &targets {
        counters.baseline(*netns, path.as_deref());
    }
    (rules::Tracker::with_baselines(&targets), counters)
}

/// Says which `--pod` pods are not running on the node (yet): pods come and go, so this is
/// no error, and their drops show once they run.
fn warn_missing_pods(wanted: &[PodName], pods: &pods::Resolver, root: &Path) {
    let logs = root.join("var/log/pods");
    for w in wanted.iter().filter(|w| !pods.pods().any(|p| p.is(w))) {
        if logs.is_dir() {
            tracing::warn!(
                "--pod {w}: no such pod running on this node yet; its drops will show once it runs"
            );
        } else {
            tracing::warn!(
                "--pod {w}: {} does not exist, so no pod can be named (see --pods-root)",
                logs.display()
            );
        }
    }
}

/// `--ready-file`: exists exactly while the probes are attached.
struct ReadyFile(std::path::PathBuf);

impl ReadyFile {
    fn create(path: &Path) -> Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot create --ready-file {}", path.display()))?;
        Ok(ReadyFile(path.to_path_buf()))
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `--null-observer`: the empty program on the same hook, attached until a signal (the
/// benchmark's floor).
async fn null_observer(args: &ObserveArgs) -> Result<()> {
    let mut stop = Stop::install()?;
    let ebpf = attach::attach_null(&args.btf)?;
    let _ready = args
        .ready_file
        .as_deref()
        .map(ReadyFile::create)
        .transpose()?;
    stop.wait().await;
    drop(ebpf);
    Ok(())
}
