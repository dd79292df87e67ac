//! `cargo xtask vm-test`: the integration tests inside throw-away QEMU VMs booted with Debian
//! kernels, so that attach paths the host kernel refuses (fentry/fexit, kprobes) and older kernel
//! layouts are exercised for real.
//!
//! Per kernel:
//! 1. the Debian package is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
//!    `~/.cache/dropscope-vm`, once;
//! 2. a small initramfs is built: static busybox, the modules the tests need (plus everything they
//!    depend on, soft dependencies included, which busybox `modprobe` does not follow), and an
//!    `/init` that mounts the host's root read-only over virtio-9p under a tmpfs overlay, chroots
//!    into it and runs the test executable built on the host;
//! 3. QEMU boots it; the console streams to stdout and the guest reports the command's exit status
//!    on a line `VM_EXIT_<nonce>=<status>`. No such line (panic, hang, timeout) is a failure.
//!
//! The parts, one module each: `host` (packages, KVM or TCG), `kernels` (which packages, download,
//! unpack), `modules` (module dependencies), `initramfs` (busybox, /init, cpio), `guest` (the
//! binaries and the script the guest runs), `qemu` (boot, console, time limit) and `core_tests`
//! (the tests of `--core`, marked where they are defined).
mod core_tests;
mod guest;
mod host;
mod initramfs;
mod kernels;
mod modules;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, ensure, Context, Result};

use guest::GuestCommand;
use host::Accel;
use kernels::{Cache, KernelSpec};
use qemu::{Outcome, VM_CPUS, VM_MEMORY};

/// Kernels tested when no `--kernel` is given.
const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "7.2"];

/// Per-VM time limit unless `VM_TIMEOUT` (seconds) says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs the integration tests (the core set with `core`) once per kernel in `kernels`
/// (aliases, package names or .deb paths; the default set when empty) and fails if any kernel
/// failed or could not boot.
pub fn vm_test(root: &Path, kernels: &[String], core: bool, extra: &[String]) -> Result<()> {
    let names: Vec<String> = if kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        kernels.to_vec()
    };
    let specs = names
        .iter()
        .map(|n| KernelSpec::parse(n))
        .collect::<Result<Vec<_>>>()?;
    let accel = Accel::detect()?;
    let timeout = timeout_from_env()?;
    host::ensure_host_packages()?;
    let guest = GuestCommand::build(root, core, extra)?;
    let cache = Cache::open()?;

    // Downloads and initramfs builds one after the other (they share the cache), then the VMs
    // side by side: under TCG each VM is one host thread (see `host::Accel`), so two kernels
    // take the time of one on two cores.
    let prepared: Vec<Result<Prepared>> = names
        .iter()
        .zip(&specs)
        .map(|(name, spec)| prepare(&cache, spec, &guest).with_context(|| format!("kernel {name}")))
        .collect();
    let jobs = jobs(names.len())?;
    let tag = |name: &str| if jobs > 1 { name.to_string() } else { String::new() };
    let mut results: Vec<(String, Result<KernelRun>)> = Vec::new();
    let mut pending = names.iter().zip(prepared).peekable();
    while pending.peek().is_some() {
        let batch: Vec<_> = pending.by_ref().take(jobs).collect();
        let done: Vec<(String, Result<KernelRun>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .into_iter()
                .map(|(name, prep)| {
                    let tag = tag(name);
                    let handle = scope.spawn(move || {
                        prep.and_then(|p| {
                            boot_one(p, accel, timeout, &tag)
                                .with_context(|| format!("kernel {tag}"))
                        })
                    });
                    (name.clone(), handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the VM runner panicked")));
                    (name, r)
                })
                .collect()
        });
        for (name, result) in done {
            if let Err(e) = &result {
                eprintln!("=== vm-test: {e:#}");
            }
            results.push((name, result));
        }
    }
    summarize(&results)
}

/// What a command run by [`run_command`] printed, and how the VM ran.
pub(crate) struct CommandOutput {
    /// Its standard output, line by line.
    pub(crate) lines: Vec<String>,
    /// kvm or tcg.
    pub(crate) accel: &'static str,
}

/// Boots `kernel` (as `vm-test --kernel` names it) and runs a command in the workspace root
/// inside it, as vm-test runs the tests: `binaries` (built on the host) are snapshotted and
/// `argv` gets the copies' paths. Fails unless the command exited with status 0.
pub(crate) fn run_command(
    root: &Path,
    kernel: &str,
    binaries: &[&Path],
    argv: impl FnOnce(&[PathBuf]) -> Vec<String>,
) -> Result<CommandOutput> {
    let spec = KernelSpec::parse(kernel)?;
    let accel = Accel::detect()?;
    let timeout = timeout_from_env()?;
    host::ensure_host_packages()?;
    let guest = GuestCommand::command(root, binaries, argv)?;
    let cache = Cache::open()?;
    let prepared = prepare(&cache, &spec, &guest).with_context(|| format!("kernel {kernel}"))?;
    let run = boot_one(prepared, accel, timeout, "").with_context(|| format!("kernel {kernel}"))?;
    verdict(&run.outcome).map_err(|why| anyhow!("kernel {}: {why}", run.release))?;
    Ok(CommandOutput {
        lines: run.outcome.output,
        accel: accel.name(),
    })
}

/// How many VMs run at once: `VM_JOBS`, else one per host CPU, at most one per kernel.
fn jobs(kernels: usize) -> Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = match std::env::var("VM_JOBS") {
        Ok(s) => s
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("VM_JOBS={s:?} is not a positive number"))?,
        Err(_) => cpus,
    };
    Ok(jobs.min(kernels).max(1))
}

/// Seconds from `VM_TIMEOUT`, or the default.
fn timeout_from_env() -> Result<Duration> {
    match std::env::var("VM_TIMEOUT") {
        Ok(s) => Ok(Duration::from_secs(s.trim().parse().with_context(
            || format!("VM_TIMEOUT={s:?} is not a number of seconds"),
        )?)),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

/// Every path under `dir` (not following symlinks), parents before children.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = fs::read_dir(&d)
            .with_context(|| format!("reading {}", d.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.symlink_metadata()?.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    Ok(out)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("dropscope-vm-{}-{tag}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Result of one kernel: its release and how the VM ended.
struct KernelRun {
    release: String,
    outcome: Outcome,
}

/// Fetches, prepares and boots one kernel.
/// A kernel ready to boot: unpacked, with its initramfs.
struct Prepared {
    kernel: kernels::Kernel,
    initrd: PathBuf,
    nonce: String,
    _scratch: TempDir,
}

fn prepare(cache: &Cache, spec: &KernelSpec, guest: &GuestCommand) -> Result<Prepared> {
    let kernel = cache.kernel(spec)?;
    let nonce = qemu::nonce()?;
    let scratch = TempDir::new(&nonce)?;
    let initrd = scratch.0.join("initrd.cpio.gz");
    initramfs::build_initramfs(&kernel, guest, &nonce, &initrd)
        .context("building the initramfs")?;
    Ok(Prepared {
        kernel,
        initrd,
        nonce,
        _scratch: scratch,
    })
}

/// Boots a prepared kernel; its console lines start with `[tag] ` when `tag` is not empty
/// (VMs running side by side).
fn boot_one(p: Prepared, accel: Accel, timeout: Duration, tag: &str) -> Result<KernelRun> {
    let Prepared {
        kernel,
        initrd,
        nonce,
        _scratch,
    } = p;
    println!(
        "=== vm-test: kernel {} ({}) accel={} mem={VM_MEMORY} cpus={VM_CPUS} timeout={}s",
        kernel.release,
        kernel
            .vmlinuz
            .file_name()
            .unwrap_or_default()
            .to_string_lossy(),
        accel.name(),
        timeout.as_secs()
    );
    let outcome = qemu::boot(&kernel, &initrd, accel, timeout, &nonce, tag)?;
    let exit = outcome.exit.map_or_else(
        || {
            if outcome.timed_out {
                "none (timed out)".to_string()
            } else {
                "none (guest crashed or did not boot)".to_string()
            }
        },
        |c| c.to_string(),
    );
    let boot = outcome.boot.map_or_else(
        || "never".to_string(),
        |b| format!("{:.1}s", b.as_secs_f64()),
    );
    println!(
        "=== vm-test: kernel {} accel={} exit={exit} booted={boot} wall={:.1}s",
        kernel.release,
        accel.name(),
        outcome.wall.as_secs_f64()
    );
    Ok(KernelRun {
        release: kernel.release,
        outcome,
    })
}

/// Prints one line per kernel and fails unless every kernel passed.
fn summarize(results: &[(String, Result<KernelRun>)]) -> Result<()> {
    println!();
    let mut failed = 0;
    for (spec, result) in results {
        let (name, verdict) = match result {
            Ok(run) => (run.release.clone(), verdict(&run.outcome)),
            Err(e) => (spec.clone(), Err(format!("could not run: {e:#}"))),
        };
        match verdict {
            Ok(secs) => println!("vm-test {name}: PASS ({secs} s)"),
            Err(why) => {
                failed += 1;
                println!("vm-test {name}: FAIL ({why})");
            }
        }
    }
    ensure!(
        failed == 0,
        "{failed} of {} kernel(s) failed",
        results.len()
    );
    Ok(())
}

/// Wall seconds if the guest command succeeded; otherwise why not.
fn verdict(o: &Outcome) -> std::result::Result<u64, String> {
    let secs = o.wall.as_secs_f64().round() as u64;
    match o.exit {
        Some(0) => Ok(secs),
        Some(code) => Err(format!("exit {code}, {secs} s")),
        None if o.timed_out => Err(format!("timed out, {secs} s")),
        None if o.boot.is_none() => Err(format!("guest did not boot, {secs} s")),
        None => Err(format!("guest reported no exit status (panic?), {secs} s")),
    }
}
