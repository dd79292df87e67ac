//! One observation session: attach -> stream through the pipeline -> summary -> detach.
//! Every exit path (Ctrl-C, SIGTERM, --duration, an error) drops the probes, which detaches
//! them; the kernel also releases them if the process dies, since nothing is pinned.
use std::{
    cell::RefCell,
    io::IsTerminal,
    path::Path,
    rc::Rc,
    time::{Duration, Instant},
};

use agent_ebpf::{counter, AggKey, AggVal, Config, ABSENT};
use anyhow::{Context, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    causes::Engine,
    cli::{Color, Format, RunArgs},
    events::Decoder,
    evidence::{netns, rules},
    kernel::{attach, btf::KernelBtf, kallsyms::Kallsyms, preflight},
    output::{
        json::JsonSink, text::TextSink, top::TopView, AttachInfo, Clock, DropRecord, Sink, Summary,
    },
    pipeline::{Pipeline, StackReader},
};

/// Runs until the duration ends or a signal arrives.
pub async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    preflight::check_privileges()?;
    if args.null_observer {
        return null_observer(&args).await;
    }
    let filter = args.filter()?;
    let kernel = KernelBtf::open(&args.btf)?;
    let reasons = kernel.drop_reasons(
        args.btf
            .parent()
            .unwrap_or(std::path::Path::new("/sys/kernel/btf")),
    )?;
    // Symbols and firewall rule counters load while the programs are verified and attached.
    let symbols = std::thread::spawn(Kallsyms::load);
    let watched = filter.netns.clone();
    let rule_baseline = std::thread::spawn(move || baseline_rules(&watched));

    let stack_reason = |name| reasons.value(name).unwrap_or(ABSENT);
    let config = Config {
        offsets: kernel.offsets(),
        stack_reasons: [
            stack_reason("NETFILTER_DROP"),
            stack_reason("NOT_SPECIFIED"),
        ],
        has_reason: 1,
        rst_has_skb: 0,
        sample_per_sec: args.sample,
        _pad: 0,
        filters: filter.to_kernel(),
    };
    preflight::raise_memlock();
    let probes = attach::attach(&kernel, &args.btf, args.attach, config)?;
    let attach_ms = started.elapsed().as_millis();
    drop(kernel);
    // Parsing BTF allocates a lot briefly; hand that memory back to the system. glibc keeps
    // freed heap memory unless asked; musl's allocator (the static build) returns it by itself.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0)
    };

    let symbols = symbols
        .join()
        .map_err(|_| anyhow::anyhow!("kallsyms loader panicked"))?
        .unwrap_or_else(|e| {
            tracing::warn!("{e:#}");
            Kallsyms::empty()
        });
    let clock = Clock::new();
    let mut top_view = args
        .top
        .then(|| TopView::new(std::io::stdout(), std::io::stdout().is_terminal()));
    let mut sink: Box<dyn Sink> = match args.format {
        _ if args.top => Box::new(NullSink),
        Format::Json => Box::new(JsonSink::new(std::io::stdout(), clock)),
        Format::Text => {
            let color = match args.color {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => std::io::stdout().is_terminal(),
            };
            Box::new(TextSink::new(std::io::stdout(), clock, color))
        }
    };
    let info = AttachInfo {
        probes: probes.report.clone(),
        attach_ms,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        reasons: reasons.len(),
    };
    tracing::info!(
        "attached in {attach_ms} ms (load+verify+attach {} ms)",
        probes.attach_ms
    );
    sink.attach(&info);
    if let Some(view) = top_view.as_mut() {
        view.attach(&info);
    }

    let symbols = Rc::new(RefCell::new(symbols));
    let mut decoder = Decoder::new(reasons, symbols.clone());
    let rules = rule_baseline
        .join()
        .map_err(|_| anyhow::anyhow!("rule counter reader panicked"))?;
    tracing::info!(
        "firewall rule counters read ({} ms since start)",
        started.elapsed().as_millis()
    );
    let attach::Probes {
        events,
        counters,
        stacks,
        agg,
        ebpf,
        ..
    } = probes;
    let read_agg = || -> Vec<(AggKey, AggVal)> {
        agg.iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(AggVal::default(), |mut a, v| {
                    a.packets += v.packets;
                    a.bytes += v.bytes;
                    a.suppressed += v.suppressed;
                    a.lost += v.lost;
                    a
                });
                (k, sum)
            })
            .collect()
    };
    let stack_reader: StackReader = Box::new(move |id| match stacks.get(&id, 0) {
        Ok(trace) => symbols
            .borrow_mut()
            .frames(trace.frames().iter().map(|f| f.ip)),
        Err(_) => Vec::new(),
    });
    let mut pipeline = Pipeline::new(Engine::builtin(), filter, args.all, rules, stack_reader);
    // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
    let sum = |index| {
        counters
            .get(&index, 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0)
    };

    // Handlers first: a signal that arrives right after the ready file appears must still
    // end in a summary and a clean detach.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let _ready = args
        .ready_file
        .as_deref()
        .map(ReadyFile::create)
        .transpose()?;
    let deadline = args.duration.map(Duration::from_secs_f64);
    let until = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.interval));
    let streaming = Instant::now();

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                drain(guard.get_inner_mut(), &mut decoder, &mut pipeline, sink.as_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => {
                // Events already in the ring come first: they give their keys a cause before
                // the kernel's counts for those keys are reconciled.
                let now = clock_ns();
                drain(ring.get_mut(), &mut decoder, &mut pipeline, sink.as_mut());
                pipeline.reconcile(&read_agg(), |k| decoder.synthetic(k, now), sink.as_mut(), false);
                pipeline.flush(sink.as_mut());
                if let Some(view) = top_view.as_mut() {
                    view.frame(&pipeline.causes, args.interval, sum(counter::LOST));
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut until => break,
        }
    }

    // Drain what the kernel delivered before the stop, then read the kernel's own counters.
    drain(ring.get_mut(), &mut decoder, &mut pipeline, sink.as_mut());
    let now = clock_ns();
    pipeline.reconcile(
        &read_agg(),
        |k| decoder.synthetic(k, now),
        sink.as_mut(),
        true,
    );
    pipeline.flush(sink.as_mut());
    let (seen, lost, filtered_in_kernel) = (
        sum(counter::SEEN),
        sum(counter::LOST),
        sum(counter::FILTERED),
    );
    drop(ring);
    drop(ebpf);
    tracing::info!("detached");
    let mut summary = pipeline.summary(seen, lost, streaming.elapsed().as_secs_f64());
    summary.filtered += filtered_in_kernel;
    summary.filtered_in_kernel = filtered_in_kernel;
    if sum(counter::AGG_FULL) > 0 {
        tracing::warn!("the kernel's aggregation table was full: some counts are not exact");
        summary.counts_exact = false;
    }
    match top_view.as_mut() {
        Some(view) => view.summary(&summary),
        None => sink.summary(&summary),
    }
    Ok(())
}

/// Feeds every record waiting in the ring buffer through the pipeline.
fn drain(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    decoder: &mut Decoder,
    pipeline: &mut Pipeline,
    sink: &mut dyn Sink,
) {
    while let Some(item) = rb.next() {
        if let Some(record) = decoder.decode(&item) {
            pipeline.push(record, sink);
        }
    }
}

/// The kernel's monotonic clock (what bpf_ktime_get_ns reads), in ns.
fn clock_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Reads the starting counters of every DROP/REJECT rule, in the watched namespaces (all
/// namespaces when no `--netns` filter is given), so later drops can be matched to a rule.
fn baseline_rules(watched: &[u32]) -> rules::Tracker {
    let mut registry = netns::Registry::new();
    let own = registry.own();
    let targets: Vec<(u32, Option<std::path::PathBuf>)> = registry
        .all()
        .into_iter()
        .filter(|r| watched.is_empty() || watched.contains(&r.inode))
        .map(|r| (r.inode, (r.inode != own).then_some(r.path)))
        .collect();
    rules::Tracker::with_baselines(&targets)
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

/// Discards records (the live view draws from the pipeline's totals instead).
struct NullSink;

impl Sink for NullSink {
    fn attach(&mut self, _: &AttachInfo) {}
    fn drop(&mut self, _: &DropRecord) {}
    fn summary(&mut self, _: &Summary) {}
}

/// `--null-observer`: the empty program on the same hook, attached until a signal (the
/// benchmark's floor).
async fn null_observer(args: &RunArgs) -> Result<()> {
    let ebpf = attach::attach_null(&args.btf)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let _ready = args
        .ready_file
        .as_deref()
        .map(ReadyFile::create)
        .transpose()?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    drop(ebpf);
    Ok(())
}
