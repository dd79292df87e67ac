//! Project tasks: `cargo xtask <build|run|test|vm-test|setup|docs>`.
//!
//! Every task first makes sure the machine has what it needs (nightly rust-src, bpf-linker,
//! the Debian tools the tests drive), installing what is missing, idempotently.
mod bench;
mod prereqs;
mod soak;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test dropscope")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (nightly rust-src, bpf-linker, test tools).
    Setup,
    /// Build dropscope (the eBPF object is embedded in the binary).
    Build {
        /// Optimised, self-contained binary to copy onto a node: target/release/dropscope.
        #[arg(long)]
        release: bool,
        /// Link statically against musl (no shared libraries at all, runs on any distribution):
        /// target/<arch>-unknown-linux-musl/{debug,release}/dropscope. Used by deploy/Containerfile.
        #[arg(long = "static")]
        static_musl: bool,
    },
    /// Build (optimised) and run dropscope as root; arguments after `--` go to dropscope.
    Run {
        /// Build and run the debug binary instead (slower to attach: BTF parsing and program
        /// loading take several times longer unoptimised).
        #[arg(long)]
        debug: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Regenerate the cause table in docs/causes.md from the rule table (`dropscope --causes`).
    Docs,
    /// Run the whole test suite: unit tests and integration tests against the real kernel.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure what dropscope costs under a drop storm, against no observer, an empty program
    /// and a bpftrace one-liner; writes BENCHMARKS.md and bench/results.json.
    ///
    /// The drop storms run on this machine; the healthy path (forwarded traffic that is not
    /// dropped) runs in a VM booted with a Debian kernel that allows the context probes.
    Bench {
        /// Interleaved repetitions of every observer (0 skips the drop storms).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Length of each storm, in seconds.
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// Only these observers (repeatable; default: all).
        #[arg(long = "observer", value_name = "OBSERVER")]
        observers: Vec<bench::Kind>,
        /// Skip the healthy-path part in the VM.
        #[arg(long)]
        no_vm: bool,
        /// Kernel of the healthy-path VM (as for vm-test).
        #[arg(long, default_value = "6.12")]
        vm_kernel: String,
        /// Interleaved repetitions in the VM.
        #[arg(long, default_value_t = 5)]
        vm_reps: usize,
        /// Length of each healthy-path run in the VM, in seconds.
        #[arg(long, default_value_t = 3.0)]
        vm_seconds: f64,
        /// Extra arguments for every dropscope run, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// (internal) The guest side of the healthy-path benchmark, run inside the VM.
    #[command(hide = true)]
    BenchGuest(bench::GuestArgs),
    /// A long drop storm (random flows, three causes) watched by the release dropscope: memory,
    /// descriptors and threads sampled all along, counts checked against the kernel's, then a
    /// minute of --top; writes bench/soak.json and a section of BENCHMARKS.md.
    Soak {
        /// Length of the storm watched with --format json, in minutes.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Length of the --top phase that follows, in seconds.
        #[arg(long, default_value_t = 60.0)]
        top_seconds: f64,
    },
    /// Run the integration tests inside QEMU VMs booted with Debian kernels (TCG unless KVM works).
    VmTest {
        /// Kernel to boot: 5.10 (no drop reasons), 6.1, 6.12, 7.2, a Debian kernel package name or a path to a .deb.
        /// Repeatable; default: 6.1, 6.12 and 7.2.
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// Run the core tests only (one per core cause, the context probes, attach and detach;
        /// marked `// vm-test: core` in tests/scenarios) instead of the whole suite, so a kernel
        /// matrix fits a CI run under TCG.
        #[arg(long)]
        core: bool,
        /// Extra arguments for the test executable (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => prereqs::ensure_all(),
        Task::Build {
            release,
            static_musl,
        } => {
            prereqs::ensure_build()?;
            let bin = if static_musl {
                let target = prereqs::ensure_musl_target()?;
                build_for(&root, release, Some(&target))?
            } else {
                build(&root, release)?
            };
            println!("built {}", bin.display());
            Ok(())
        }
        Task::Run { debug, args } => {
            prereqs::ensure_build()?;
            let bin = build(&root, !debug)?;
            run_as_root(&bin, &args)
        }
        Task::Docs => {
            prereqs::ensure_build()?;
            let bin = build(&root, false)?;
            docs(&root, &bin)
        }
        Task::Test { args } => {
            prereqs::ensure_all()?;
            test(&root, &args)
        }
        Task::Bench {
            reps,
            seconds,
            observers,
            no_vm,
            vm_kernel,
            vm_reps,
            vm_seconds,
            args,
        } => {
            prereqs::ensure_all()?;
            prereqs::ensure_bpftrace()?;
            if !nix_is_root() {
                bail!(
                    "the benchmark creates network namespaces and loads eBPF programs: run as root"
                );
            }
            let bin = build(&root, true)?;
            std::fs::create_dir_all(root.join("bench"))?;
            let params = bench::Params {
                reps,
                seconds,
                observers,
                extra: args,
            };
            let vm = (!no_vm).then_some(bench::VmParams {
                kernel: vm_kernel,
                reps: vm_reps,
                seconds: vm_seconds,
            });
            bench::run(
                &root,
                &bin,
                &params,
                vm.as_ref(),
                &root.join("BENCHMARKS.md"),
                &root.join("bench/results.json"),
            )
        }
        Task::BenchGuest(args) => bench::guest_main(&args),
        Task::Soak {
            minutes,
            top_seconds,
        } => {
            prereqs::ensure_all()?;
            if !nix_is_root() {
                bail!("the soak creates network namespaces and loads eBPF programs: run as root");
            }
            let bin = build(&root, true)?;
            std::fs::create_dir_all(root.join("bench"))?;
            let (md, json) = soak::outputs(&root);
            soak::run(
                &bin,
                &soak::Params {
                    minutes,
                    top_seconds,
                },
                &md,
                &json,
            )
        }
        Task::VmTest {
            kernels,
            core,
            args,
        } => {
            prereqs::ensure_all()?;
            vm::vm_test(&root, &kernels, core, &args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the agent (its build script builds the eBPF object) and returns the binary's path.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    build_for(root, release, None)
}

/// Like `build`, for a target triple other than the host's when one is given.
fn build_for(root: &Path, release: bool, target: Option<&str>) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["build", "--package", "dropscope"]);
    if release {
        cmd.arg("--release");
    }
    let mut dir = target_dir(root)?;
    if let Some(target) = target {
        cmd.args(["--target", target]);
        dir.push(target);
    }
    status(&mut cmd)?;
    Ok(dir
        .join(if release { "release" } else { "debug" })
        .join("dropscope"))
}

/// Where cargo puts its build output: `target/` unless `CARGO_TARGET_DIR` or a cargo config
/// (`build.target-dir`) says otherwise. Cargo itself answers, so every way of moving it counts.
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cargo()
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata names no target_directory")?;
    Ok(PathBuf::from(dir))
}

fn run_as_root(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = if nix_is_root() {
        Command::new(bin)
    } else {
        eprintln!("xtask: dropscope needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(bin);
        c
    };
    cmd.args(args);
    // Ctrl-C reaches dropscope too (same process group); let it print its summary.
    let st = cmd
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !st.success() {
        std::process::exit(st.code().unwrap_or(1));
    }
    Ok(())
}

/// Builds and runs every test. The integration tests create network namespaces and load eBPF
/// programs, so they run as root: started by a normal user, cargo builds everything as that
/// user and runs each test executable through `sudo -E` (a cargo runner, as aya's template
/// does), so nothing in the workspace or the caches becomes root's.
fn test(root: &Path, extra: &[String]) -> Result<()> {
    let bin = build(root, false)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace"])
        .env("DROPSCOPE_BIN", &bin)
        .args(extra);
    if !nix_is_root() {
        sudo_runner(&mut cmd)?;
    }
    status(&mut cmd)
}

/// Makes `cargo test` run the test executables as root through sudo.
fn sudo_runner(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: the tests need root (network namespaces, eBPF); running them through sudo");
    // Ask for the password (if any) now, not in the middle of cargo's output.
    let st = Command::new("sudo")
        .arg("-v")
        .status()
        .context("the tests need root and sudo is not installed: run `cargo xtask test` as root")?;
    if !st.success() {
        bail!("sudo refused: the tests need root (network namespaces, eBPF)");
    }
    let host = host_triple()?;
    let var = format!(
        "CARGO_TARGET_{}_RUNNER",
        host.to_uppercase().replace(['-', '.'], "_")
    );
    cmd.env(var, "sudo -E");
    // sudo may give root its own HOME: the tests find the user's cache (the manifest
    // validator that xtask installed there) through XDG_CACHE_HOME instead.
    if std::env::var_os("XDG_CACHE_HOME").is_none() {
        if let Some(home) = std::env::var_os("HOME") {
            cmd.env("XDG_CACHE_HOME", PathBuf::from(home).join(".cache"));
        }
    }
    Ok(())
}

/// The host's target triple, as rustc reports it.
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")
}

/// Replaces the section of docs/causes.md between the CAUSES markers with `dropscope --causes`.
fn docs(root: &Path, bin: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("--causes")
        .output()
        .context("running dropscope --causes")?;
    let table = String::from_utf8(out.stdout)?;
    let path = root.join("docs/causes.md");
    let page =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (begin, end) = ("<!-- CAUSES:BEGIN -->\n", "<!-- CAUSES:END -->");
    let (Some(a), Some(b)) = (page.find(begin), page.find(end)) else {
        bail!("docs/causes.md has no CAUSES markers");
    };
    let updated = format!("{}{begin}{table}{}", &page[..a], &page[b..]);
    std::fs::write(&path, updated)?;
    println!("docs/causes.md cause table regenerated");
    Ok(())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{:?} failed ({st})", cmd.get_program());
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
