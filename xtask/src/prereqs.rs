//! Prerequisites, checked cheaply and installed only when missing.
use std::process::Command;

use anyhow::{bail, Context, Result};
use dropscope_tests::kube_validate;

const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages the integration tests drive, keyed by a command each provides.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nstat", "iproute2"),
    ("ping", "iputils-ping"),
    ("nft", "nftables"),
    ("iptables-legacy", "iptables"),
    ("iptables-nft", "iptables"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("sleep", "coreutils"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("unshare", "util-linux"),
    ("python3", "python3"),
    // The pcapng files dropscope writes are checked with the readers operators use.
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("capinfos", "wireshark-common"),
];

/// Packages whose Debian service must not run: the tests start their own instance.
const NO_SERVICE: &[&str] = &["prometheus"];

/// What building the eBPF programs needs.
pub fn ensure_build() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Everything, including the tools the tests use.
pub fn ensure_all() -> Result<()> {
    ensure_build()?;
    ensure_test_tools()?;
    ensure_manifest_validator()
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly toolchain's rust-src (the eBPF crate builds core from source)");
    run(
        "rustup",
        &[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ],
    )
}

/// The musl target of this machine's architecture (for a static binary), installed if missing.
/// Returns its triple.
pub fn ensure_musl_target() -> Result<String> {
    let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == target) {
        eprintln!("xtask: installing the Rust standard library for {target} (static builds)");
        run("rustup", &["target", "add", &target])?;
    }
    Ok(target)
}

fn ensure_bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object with nightly's LLVM; takes about a minute)"
    );
    run(
        "cargo",
        &[
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ],
    )
}

fn ensure_test_tools() -> Result<()> {
    let mut missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, "the tests need")
}

/// kubernetes-validate from PyPI, in a virtualenv of its own: the deployment tests validate
/// deploy/daemonset.yaml with it, offline, against the Kubernetes schemas it bundles.
fn ensure_manifest_validator() -> Result<()> {
    if kube_validate::executable().is_file() {
        return Ok(());
    }
    // Debian splits `python3 -m venv` (ensurepip) into its own package.
    if output("python3", &["-c", "import ensurepip"]).is_none() {
        apt_install(&["python3-venv"], "virtualenvs need")?;
    }
    let venv = kube_validate::venv();
    let version = kube_validate::VERSION;
    eprintln!(
        "xtask: installing kubernetes-validate {version} from PyPI into {}",
        venv.display()
    );
    let venv_arg = venv.to_string_lossy().into_owned();
    run("python3", &["-m", "venv", &venv_arg])?;
    let pip = venv.join("bin").join("pip").to_string_lossy().into_owned();
    let package = format!("kubernetes-validate=={version}");
    run(
        &pip,
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &package,
        ],
    )
}

/// A command run as root (directly when this is root, through sudo otherwise), without
/// questions from debconf.
fn as_root(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        // sudo resets the environment: the variable goes through `env`.
        let mut cmd = Command::new("sudo");
        cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", program]);
        cmd
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Installs Debian packages (as root, through sudo for a normal user), saying why.
fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    eprintln!(
        "xtask: installing Debian packages {why}: {}",
        packages.join(" ")
    );
    let apt = |args: &[&str]| -> Result<()> {
        let st = as_root("apt-get").args(args).status().with_context(|| {
            format!(
                "running apt-get (install them with: sudo apt-get install -y {})",
                packages.join(" ")
            )
        })?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages);
    apt(&args)?;
    for service in NO_SERVICE.iter().filter(|s| packages.contains(s)) {
        // Installing enables the service; the tests run their own, on loopback. Without
        // systemd as init this only removes the links, which is all there is to undo.
        let _ = as_root("systemctl")
            .args(["disable", "--now", service])
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

/// bpftrace, the expert's alternative the benchmark compares against.
pub fn ensure_bpftrace() -> Result<()> {
    if on_path("bpftrace") {
        return Ok(());
    }
    eprintln!("xtask: installing bpftrace (the benchmark's comparison)");
    run(
        "apt-get",
        &[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "bpftrace",
        ],
    )
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(cmd).is_file())
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("{cmd} {} failed ({st})", args.join(" "));
    }
    Ok(())
}
