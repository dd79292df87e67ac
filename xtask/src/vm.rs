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
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

/// Kernels tested when no `--kernel` is given.
const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "7.2"];

/// Test name filters of `vm-test --core`: the recipes of the core causes, the context probes
/// (with their forced fallbacks), a clean detach, and no false alarms on a healthy network.
pub const CORE_TESTS: &[&str] = &[
    "fwd4_off_is",
    "fwd6_off_is",
    "rpf_strict",
    "nft_drop_is",
    "ipt_nft_drop",
    "ipt_legacy_drop",
    "reject_udp",
    "reject_tcp",
    "mtu4_is",
    "mtu6_is",
    "noroute4",
    "ttl4",
    "neigh_failed",
    "nolisten_tcp",
    "nolisten_udp",
    "context::",
    "qdisc_overflow",
    "nothing_stays_attached_after_sigterm",
    "nothing_stays_attached_after_sigint",
    "a_healthy_network_reports_no_drops",
    "benign_ping_noise",
    "corpus::",
    "changes::",
    // The packet capture and the expression's kernel filter lists pass older verifiers.
    "packets::pcap_holds",
    "packets::an_expression_combines",
];

/// Host packages a VM run needs, each with a file it installs (to check without dpkg's help too).
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("binutils", "/usr/bin/objcopy"),
    ("xz-utils", "/usr/bin/xz"),
    ("zstd", "/usr/bin/zstd"),
];

/// Modules the guest needs to reach the host's root: virtio transport, 9p and overlayfs.
const BASE_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// Modules the test scenarios use. Missing ones (renamed, built in, not in this kernel) are
/// skipped when the initramfs is built, and a failing `modprobe` in the guest is ignored.
const NET_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "br_netfilter",
    "nf_tables",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "iptable_filter",
    "ip6table_filter",
    "nft_compat",
    "nft_chain_nat",
    "sch_ingress",
    "cls_bpf",
    "dummy",
    "tun",
    "vxlan",
    "xfrm_user",
    "xfrm_interface",
    "sch_tbf",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "ipt_REJECT",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "xt_conntrack",
    "xt_tcpudp",
    "xt_comment",
    "iptable_raw",
    "iptable_mangle",
    "nft_ct",
    "nft_counter",
    "ip_gre",
    "ipip",
    "nf_nat",
    "nft_masq",
    "iptable_nat",
    "xt_MASQUERADE",
    "nft_meta_bridge",
    "nft_reject_bridge",
];

/// Environment variables passed through to the test executable in the guest.
const FORWARDED_ENV: &[&str] = &["RUST_BACKTRACE", "DROPSCOPE_LOG"];

/// Guest memory and vCPUs.
const VM_MEMORY: &str = "1G";
const VM_CPUS: &str = "2";

/// Per-VM time limit unless `VM_TIMEOUT` (seconds) says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Keyring that signs every Debian suite, used for the extra suites' isolated apt config.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Runs the integration tests once per kernel in `kernels` (aliases, package names or .deb
/// paths; the default set when empty) and fails if any kernel failed or could not boot.
pub fn vm_test(root: &Path, kernels: &[String], extra: &[String]) -> Result<()> {
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
    ensure_host_packages()?;
    let guest = GuestCommand::build(root, extra)?;
    let cache = Cache::open()?;

    let mut results = Vec::new();
    for (name, spec) in names.iter().zip(&specs) {
        let result =
            run_one(&cache, spec, &guest, accel, timeout).with_context(|| format!("kernel {name}"));
        if let Err(e) = &result {
            eprintln!("=== vm-test: {e:#}");
        }
        results.push((name.clone(), result));
    }
    summarize(&results)
}

// ---------------------------------------------------------------------------------------------
// Host preparation

/// Installs the host packages a VM run needs when any is missing (as root; otherwise says how).
fn ensure_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(pkg, file)| !dpkg_installed(pkg) || !Path::new(file).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::nix_is_root() {
        bail!(
            "vm-test needs: {0}; install them with: sudo apt-get install -y --no-install-recommends {0}",
            missing.join(" ")
        );
    }
    eprintln!(
        "xtask: installing Debian packages vm-test needs: {}",
        missing.join(" ")
    );
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    crate::status(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    crate::status(&mut install)
}

/// Whether dpkg reports `pkg` as installed.
fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with(" installed")
        })
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

/// How QEMU executes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only when a hardware KVM module (kvm_intel, kvm_amd) is loaded: other providers of
    /// /dev/kvm (e.g. kvm_pvm) open fine, but stock kernels hang in them. `VM_ACCEL` overrides.
    fn detect() -> Result<Self> {
        match std::env::var("VM_ACCEL").as_deref() {
            Ok("kvm") => return Ok(Accel::Kvm),
            Ok("tcg") => return Ok(Accel::Tcg),
            Ok("auto") | Err(_) => {}
            Ok(other) => bail!("VM_ACCEL={other:?}: expected auto, kvm or tcg"),
        }
        let hw_kvm = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|m| Path::new(m).is_dir());
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Ok(if hw_kvm && usable {
            Accel::Kvm
        } else {
            Accel::Tcg
        })
    }

    fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What runs in the guest

/// The shell script the guest runs in the chroot: environment, working directory, test executable.
struct GuestCommand {
    script: String,
    /// Private copies of the binaries under test (the guest reads the host's files live, so a
    /// rebuild in the workspace during a run would otherwise change them between kernels).
    _binaries: TempDir,
}

impl GuestCommand {
    /// Builds dropscope and the integration-test executable on the host, snapshots both, and
    /// writes the script that runs the tests in the workspace root, one test at a time.
    fn build(root: &Path, extra: &[String]) -> Result<Self> {
        let bin = crate::build(root, false)?;
        let exe = integration_test_executable(root)?;
        let binaries = TempDir::new("bin")?;
        let bin = snapshot(&bin, &binaries.0)?;
        let exe = snapshot(&exe, &binaries.0)?;
        let root = root
            .canonicalize()
            .with_context(|| format!("locating {}", root.display()))?;

        let mut script = String::new();
        for name in FORWARDED_ENV {
            if let Some(value) = std::env::var_os(name) {
                writeln!(
                    script,
                    "export {name}={}",
                    sh_quote(&value.to_string_lossy())
                )?;
            }
        }
        writeln!(
            script,
            "export DROPSCOPE_BIN={}",
            sh_quote(&bin.to_string_lossy())
        )?;
        // Verifying and attaching eBPF programs is slow under emulation.
        writeln!(script, "export DROPSCOPE_ATTACH_TIMEOUT=180")?;
        // Debian kernels allow fentry and kprobes: the context probes must attach there.
        writeln!(script, "export DROPSCOPE_EXPECT_CONTEXT=1")?;
        writeln!(
            script,
            "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
        )?;
        writeln!(script, "cd {} || exit 1", sh_quote(&root.to_string_lossy()))?;
        let mut argv = vec![exe.to_string_lossy().into_owned()];
        // One test at a time, and no colours (the console is a tty, the output a log). libtest
        // rejects an option given twice, so a default is only added when the caller has not.
        for (option, default) in [
            ("--test-threads", "--test-threads=1"),
            ("--color", "--color=never"),
        ] {
            if !extra
                .iter()
                .any(|a| a == option || a.starts_with(&format!("{option}=")))
            {
                argv.push(default.into());
            }
        }
        argv.extend(extra.iter().cloned());
        let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        writeln!(script, "exec {}", quoted.join(" "))?;
        Ok(GuestCommand {
            script,
            _binaries: binaries,
        })
    }
}

/// Copies the executable `file` into `dir` and returns the copy's absolute path.
fn snapshot(file: &Path, dir: &Path) -> Result<PathBuf> {
    let copy = dir.join(
        file.file_name()
            .context("executable path has a file name")?,
    );
    fs::copy(file, &copy)
        .with_context(|| format!("copying {} to {}", file.display(), copy.display()))?;
    Ok(copy)
}

/// Builds the `dropscope-tests` integration tests and returns the executable of test target `causes`.
fn integration_test_executable(root: &Path) -> Result<PathBuf> {
    let out = crate::cargo()
        .current_dir(root)
        .args([
            "test",
            "--package",
            "dropscope-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "cargo test --no-run failed ({})",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "causes")
        .filter(|msg| {
            msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .next_back()
        .context("cargo test --no-run reported no executable for test target `causes`")
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// Kernels: which packages, download, extraction

/// A kernel to boot.
#[derive(Debug)]
enum KernelSpec {
    /// Debian packages (all unpacked into one tree), from the host's suites or an extra `suite`.
    Packages {
        packages: Vec<String>,
        suite: Option<String>,
    },
    /// A local .deb.
    Deb(PathBuf),
}

impl KernelSpec {
    /// Resolves an alias (6.1, 6.12, 7.2), a package name, or a path to a .deb.
    fn parse(spec: &str) -> Result<Self> {
        let packages = |names: &[&str], suite: Option<&str>| KernelSpec::Packages {
            packages: names.iter().map(|s| s.to_string()).collect(),
            suite: suite.map(str::to_string),
        };
        Ok(match spec {
            "6.1" => packages(&["linux-image-6.1.0-56-amd64-unsigned"], None),
            "6.12" => packages(&["linux-image-6.12.117+deb12-amd64-unsigned"], None),
            "7.2" => KernelSpec::split_packages("7.2.13+deb14-amd64", Some("sid")),
            _ if spec.ends_with(".deb") => {
                let path = fs::canonicalize(spec).with_context(|| format!("no such .deb: {spec}"))?;
                KernelSpec::Deb(path)
            }
            _ if spec.starts_with("linux-binary-") => {
                KernelSpec::split_packages(spec.trim_start_matches("linux-binary-"), None)
            }
            _ if spec.starts_with("linux-") => packages(&[spec], None),
            _ => bail!("unknown kernel {spec:?}: use 6.1, 6.12, 7.2, a Debian package name or a path to a .deb"),
        })
    }

    /// Since about 6.19 Debian splits a kernel into binary, modules and base (config) packages.
    fn split_packages(version: &str, suite: Option<&str>) -> Self {
        KernelSpec::Packages {
            packages: ["binary", "modules", "base"]
                .iter()
                .map(|p| format!("linux-{p}-{version}"))
                .collect(),
            suite: suite.map(str::to_string),
        }
    }

    /// Name of the cache directory the kernel is unpacked into.
    fn cache_name(&self) -> String {
        match self {
            KernelSpec::Packages { packages, .. } => packages[0].clone(),
            KernelSpec::Deb(path) => path
                .file_stem()
                .map_or_else(|| "kernel".into(), |s| s.to_string_lossy().into_owned()),
        }
    }
}

/// An unpacked kernel: its image and its module tree.
#[derive(Debug)]
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    moddir: PathBuf,
}

/// The download and extraction cache, `~/.cache/dropscope-vm`.
struct Cache {
    dir: PathBuf,
}

impl Cache {
    fn open() -> Result<Self> {
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
        };
        let dir = base.join("dropscope-vm");
        for sub in ["debs", "kernels"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        Ok(Cache { dir })
    }

    fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// Unpacks the kernel (downloading its packages first if needed) unless already done.
    fn kernel(&self, spec: &KernelSpec) -> Result<Kernel> {
        let root = self.dir.join("kernels").join(spec.cache_name());
        let done = root.join(".done");
        if !done.exists() {
            let debs = match spec {
                KernelSpec::Deb(path) => vec![path.clone()],
                KernelSpec::Packages { packages, suite } => {
                    self.download(packages, suite.as_deref())?
                }
            };
            extract(&debs, &root)?;
            fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
        }
        locate_kernel(&root)
    }

    /// The cached .deb of each package, downloading the ones missing.
    fn download(&self, packages: &[String], suite: Option<&str>) -> Result<Vec<PathBuf>> {
        let missing: Vec<&String> = packages
            .iter()
            .filter(|p| self.cached_deb(p).is_none())
            .collect();
        if !missing.is_empty() {
            let apt = AptConfig::new(self, suite)?;
            eprintln!(
                "=== vm-test: downloading {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if apt.download(&self.debs(), &missing, true).is_err() {
                eprintln!("=== vm-test: not found in the package lists; running apt-get update");
                apt.update()?;
                apt.download(&self.debs(), &missing, false)?;
            }
        }
        packages
            .iter()
            .map(|p| {
                self.cached_deb(p)
                    .with_context(|| format!("apt-get download left no .deb for {p}"))
            })
            .collect()
    }

    /// The newest downloaded .deb of `package`, if any.
    fn cached_deb(&self, package: &str) -> Option<PathBuf> {
        let prefix = format!("{package}_");
        fs::read_dir(self.debs())
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(&prefix) && name.ends_with(".deb")
            })
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    }
}

/// apt, either as configured on the host or with an isolated config for one extra suite (its own
/// sources, lists and cache under the cache directory, so the host's apt state is left alone).
struct AptConfig {
    options: Vec<String>,
    state: Option<PathBuf>,
}

impl AptConfig {
    fn new(cache: &Cache, suite: Option<&str>) -> Result<Self> {
        let Some(suite) = suite else {
            return Ok(AptConfig {
                options: Vec::new(),
                state: None,
            });
        };
        let state = cache.dir.join(format!("apt-{suite}"));
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(state.join(sub))
                .with_context(|| format!("creating {}", state.join(sub).display()))?;
        }
        let sources = match std::env::var("VM_APT_SOURCES") {
            Ok(s) if !s.trim().is_empty() => s,
            _ => format!(
                "deb [signed-by={DEBIAN_KEYRING}] {} {suite} main\n",
                host_debian_mirror()?
            ),
        };
        let list = state.join("sources.list");
        fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
        let options = [
            format!("Dir::Etc::sourcelist={}", list.display()),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", state.join("lists").display()),
            format!("Dir::Cache={}", state.join("cache").display()),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        let apt = AptConfig {
            options,
            state: Some(state.clone()),
        };
        if !state.join(".updated").exists() {
            apt.update()?;
        }
        Ok(apt)
    }

    fn apt_get(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        if crate::nix_is_root() {
            // The cache lives in root's home, which apt's unprivileged download user cannot write.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.args(&self.options);
        cmd
    }

    fn update(&self) -> Result<()> {
        crate::status(self.apt_get().args(["update", "-qq"]))?;
        if let Some(state) = &self.state {
            fs::write(state.join(".updated"), "")?;
        }
        Ok(())
    }

    /// `apt-get download` into `dir`; `quiet` hides apt's complaints (a retry follows).
    fn download(&self, dir: &Path, packages: &[&String], quiet: bool) -> Result<()> {
        let mut cmd = self.apt_get();
        cmd.current_dir(dir).arg("download").args(packages);
        if quiet {
            cmd.stderr(Stdio::null());
        }
        crate::status(&mut cmd)
    }
}

/// URI of the host's main Debian archive, from its apt sources (one-line or deb822 format).
fn host_debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|e| e == "list" || e == "sources")
            {
                texts.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| is_archive(u)) {
                return Ok(uri.to_string());
            }
        }
    }
    bail!("found no Debian archive in the host's apt sources; set VM_APT_SOURCES to a sources.list line")
}

/// Unpacks `debs` into a fresh `root`.
fn extract(debs: &[PathBuf], root: &Path) -> Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    for deb in debs {
        eprintln!("=== vm-test: unpacking {}", deb.display());
        crate::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    Ok(())
}

/// Finds the module tree (`{,usr/}lib/modules/<release>`) and the kernel image in an unpacked kernel.
fn locate_kernel(root: &Path) -> Result<Kernel> {
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/<release> in {}", root.display()))?;
    let release = moddir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let vmlinuz = walk(root)?
        .into_iter()
        .find(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .with_context(|| format!("no vmlinuz in {}", root.display()))?;
    Ok(Kernel {
        release,
        vmlinuz,
        moddir,
    })
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

// ---------------------------------------------------------------------------------------------
// Initramfs

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

/// Writes a gzip'ed newc initramfs for `kernel` to `out`: busybox, modules, /init, the command.
fn build_initramfs(kernel: &Kernel, guest: &GuestCommand, nonce: &str, out: &Path) -> Result<()> {
    let stage = TempDir::new(&format!("{nonce}-stage"))?;
    let st = &stage.0;
    for d in [
        "bin", "proc", "sys", "dev", "run", "tmp", "etc", "lower", "rw", "host",
    ] {
        fs::create_dir_all(st.join(d))?;
    }
    install_busybox(st)?;

    let modules: Vec<String> = BASE_MODULES
        .iter()
        .map(|s| s.to_string())
        .chain(NET_MODULES.iter().map(|s| s.to_string()))
        .chain(
            std::env::var("VM_MODULES")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string),
        )
        .collect();
    let mut shipper = ModuleShipper::new(kernel, st)?;
    for m in &modules {
        shipper.add(m)?;
    }
    shipper.finish()?;

    write_executable(&st.join("init"), &init_script(&modules, nonce))?;
    fs::write(st.join("cmd.sh"), &guest.script)?;
    pack_cpio(st, out)
}

/// Copies the host's static busybox and links every applet to it, in /bin and, through a
/// /sbin symlink, where the kernel looks for `modprobe` when it loads a module on demand.
fn install_busybox(st: &Path) -> Result<()> {
    fs::copy("/bin/busybox", st.join("bin/busybox"))
        .context("copying /bin/busybox (package busybox-static)")?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", st.join("bin").join(applet))?;
    }
    std::os::unix::fs::symlink("bin", st.join("sbin"))?;
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's /init: modules, the host root (9p, read-only) under a tmpfs overlay, pseudo
/// filesystems, then the command in a chroot; reports its status with the nonce'd marker.
fn init_script(modules: &[String], nonce: &str) -> String {
    let modules = modules.join(" ");
    format!(
        r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/preload-modules 2>/dev/null) {modules}; do modprobe $m 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower
mount -t tmpfs tmpfs /rw && mkdir -p /rw/upper /rw/work
if ! mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /host; then
  echo "vm-test: overlayfs failed; host root is read-only except /tmp"
  mount --bind /lower /host
  mount -t tmpfs tmpfs /host/tmp
fi
mount --rbind /proc /host/proc
mount --rbind /sys /host/sys
mount --rbind /dev /host/dev
mount -t tmpfs tmpfs /host/run
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mount -t bpf bpf /host/sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
ip link set lo up
cp /cmd.sh /host/run/vm-test-cmd.sh
echo "VM_BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
chroot /host /bin/sh /run/vm-test-cmd.sh
rc=$?
echo "VM_DONE uptime=$(cut -d' ' -f1 /proc/uptime) used_kb=$(free | awk '/Mem:/{{print $3}}')"
echo "VM_EXIT_{nonce}=$rc"
poweroff -f
"#
    )
}

/// Packs `st` into a gzip'ed newc cpio archive at `out`.
fn pack_cpio(st: &Path, out: &Path) -> Result<()> {
    let mut list = Vec::new();
    for p in walk(st)? {
        list.extend_from_slice(b"./");
        list.extend_from_slice(p.strip_prefix(st)?.as_os_str().as_encoded_bytes());
        list.push(0);
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Command::new("cpio")
        .current_dir(st)
        .args(["--null", "-o", "-H", "newc", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cpio")?;
    let cpio_out = cpio.stdout.take().context("cpio stdout")?;
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(cpio_out)
        .stdout(file)
        .spawn()
        .context("starting gzip")?;
    cpio.stdin.take().context("cpio stdin")?.write_all(&list)?;
    let (c, g) = (cpio.wait()?, gzip.wait()?);
    ensure!(
        c.success() && g.success(),
        "packing the initramfs failed (cpio {c}, gzip {g})"
    );
    Ok(())
}

/// Copies modules (decompressed) with their dependencies into the initramfs staging tree, and
/// records pre-soft-dependencies for /init to load first.
struct ModuleShipper<'a> {
    kernel: &'a Kernel,
    target: PathBuf,
    stage: &'a Path,
    /// Module name (dashes as underscores) -> file, for every module of the kernel.
    index: HashMap<String, PathBuf>,
    /// Aliases declared by crypto and arch modules (lazily built) -> module names.
    aliases: Option<HashMap<String, Vec<String>>>,
    seen: HashSet<String>,
    preload: Vec<String>,
}

impl<'a> ModuleShipper<'a> {
    fn new(kernel: &'a Kernel, stage: &'a Path) -> Result<Self> {
        let target = stage.join("lib/modules").join(&kernel.release);
        fs::create_dir_all(&target)?;
        let mut index = HashMap::new();
        for path in walk(&kernel.moddir.join("kernel"))? {
            if let Some(name) = module_name(&path) {
                index.entry(name).or_insert(path);
            }
        }
        Ok(ModuleShipper {
            kernel,
            target,
            stage,
            index,
            aliases: None,
            seen: HashSet::new(),
            preload: Vec::new(),
        })
    }

    /// Ships `name` and, recursively, what it depends on. Unknown names (built in, or not in
    /// this kernel) are skipped.
    fn add(&mut self, name: &str) -> Result<()> {
        let name = name.replace('-', "_");
        if !self.seen.insert(name.clone()) {
            return Ok(());
        }
        let Some(src) = self.index.get(&name).cloned() else {
            return Ok(());
        };
        let rel = strip_compression(src.strip_prefix(&self.kernel.moddir)?);
        let dest = self.target.join(rel);
        fs::create_dir_all(dest.parent().context("module path has a parent")?)?;
        fs::write(&dest, decompress(&src)?)
            .with_context(|| format!("writing {}", dest.display()))?;

        let info = modinfo(&dest, self.stage)?;
        for dep in info.depends {
            self.add(&dep)?;
        }
        for alias in info.softdeps_pre {
            for provider in self.providers_of(&alias)? {
                self.add(&provider)?;
                if !self.preload.contains(&provider) {
                    self.preload.push(provider);
                }
            }
        }
        Ok(())
    }

    /// Crypto and arch modules declaring `alias` (e.g. crc32c_generic, crc32c_intel for crc32c).
    fn providers_of(&mut self, alias: &str) -> Result<Vec<String>> {
        if self.aliases.is_none() {
            let mut map: HashMap<String, Vec<String>> = HashMap::new();
            for sub in ["kernel/crypto", "kernel/arch"] {
                let dir = self.kernel.moddir.join(sub);
                if !dir.is_dir() {
                    continue;
                }
                for path in walk(&dir)? {
                    let Some(name) = module_name(&path) else {
                        continue;
                    };
                    for a in declared_aliases(&decompress(&path)?) {
                        map.entry(a).or_default().push(name.clone());
                    }
                }
            }
            self.aliases = Some(map);
        }
        Ok(self
            .aliases
            .as_ref()
            .and_then(|m| m.get(alias))
            .cloned()
            .unwrap_or_default())
    }

    /// Copies the kernel's built-in module lists, records the preload list and runs depmod.
    fn finish(self) -> Result<()> {
        for entry in fs::read_dir(&self.kernel.moddir)?.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("modules.builtin") || name == "modules.order" {
                fs::copy(entry.path(), self.target.join(&name))?;
            }
        }
        if !self.preload.is_empty() {
            fs::write(
                self.stage.join("etc/preload-modules"),
                self.preload.join("\n") + "\n",
            )?;
        }
        crate::status(
            Command::new("/bin/busybox")
                .arg("depmod")
                .arg("-b")
                .arg(self.stage)
                .arg(&self.kernel.release),
        )
    }
}

/// Module name of a `*.ko[.xz|.zst|.gz]` file, dashes as underscores.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = ["", ".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(&format!(".ko{ext}")))?;
    Some(stem.replace('-', "_"))
}

/// `rel` without a compression suffix (the guest gets plain .ko files).
fn strip_compression(rel: &Path) -> PathBuf {
    let s = rel.to_string_lossy();
    let plain = [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| s.strip_suffix(ext))
        .unwrap_or(&s);
    PathBuf::from(plain)
}

/// The module file's contents, decompressed with xz, zstd or gzip as its name says.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool: &[&str] = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => &["xz", "-dc"],
        Some("zst") => &["zstd", "-qdc"],
        Some("gz") => &["gzip", "-dc"],
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .output()
        .with_context(|| format!("running {}", tool[0]))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({})",
        tool.join(" "),
        path.display(),
        out.status
    );
    Ok(out.stdout)
}

/// What a module's .modinfo says it needs.
struct ModInfo {
    depends: Vec<String>,
    softdeps_pre: Vec<String>,
}

/// Reads the .modinfo section of the (uncompressed) module `ko` with objcopy.
fn modinfo(ko: &Path, scratch: &Path) -> Result<ModInfo> {
    let tmp = scratch.join(".modinfo");
    let st = Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.modinfo"])
        .arg(ko)
        .arg(&tmp)
        .status()
        .context("running objcopy")?;
    ensure!(
        st.success(),
        "objcopy --only-section=.modinfo {} failed ({st})",
        ko.display()
    );
    let raw = fs::read(&tmp)?;
    fs::remove_file(&tmp)?;
    let mut info = ModInfo {
        depends: Vec::new(),
        softdeps_pre: Vec::new(),
    };
    for field in raw.split(|&b| b == 0).map(String::from_utf8_lossy) {
        if let Some(deps) = field.strip_prefix("depends=") {
            info.depends.extend(
                deps.split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        } else if let Some(soft) = field.strip_prefix("softdep=") {
            info.softdeps_pre.extend(pre_softdeps(soft));
        }
    }
    Ok(info)
}

/// The names after `pre:` in a softdep value such as `pre: crc32c post: foo`.
fn pre_softdeps(value: &str) -> Vec<String> {
    let mut in_pre = false;
    let mut out = Vec::new();
    for word in value.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            w if in_pre => out.push(w.to_string()),
            _ => {}
        }
    }
    out
}

/// `alias=` entries of a module image (NUL-separated modinfo strings).
fn declared_aliases(image: &[u8]) -> Vec<String> {
    image
        .split(|&b| b == 0)
        .filter_map(|s| s.strip_prefix(b"alias="))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Booting

/// How one VM ended.
struct Outcome {
    /// The guest command's exit status, if the guest reported one.
    exit: Option<i32>,
    timed_out: bool,
    wall: Duration,
    /// From QEMU's start to the guest's VM_BOOTED line.
    boot: Option<Duration>,
}

/// Result of one kernel: its release and how the VM ended.
struct KernelRun {
    release: String,
    outcome: Outcome,
}

/// Fetches, prepares and boots one kernel.
fn run_one(
    cache: &Cache,
    spec: &KernelSpec,
    guest: &GuestCommand,
    accel: Accel,
    timeout: Duration,
) -> Result<KernelRun> {
    let kernel = cache.kernel(spec)?;
    let nonce = nonce()?;
    let scratch = TempDir::new(&nonce)?;
    let initrd = scratch.0.join("initrd.cpio.gz");
    build_initramfs(&kernel, guest, &nonce, &initrd).context("building the initramfs")?;

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
    let outcome = boot(&kernel, &initrd, accel, timeout, &nonce)?;
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

/// Eight hex digits from /dev/urandom, so the guest's exit marker cannot be forged by its output.
fn nonce() -> Result<String> {
    let mut bytes = [0u8; 4];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Boots QEMU, streams the console to stdout and waits for it to power off (or kills it at the timeout).
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    accel: Accel,
    timeout: Duration,
    nonce: &str,
) -> Result<Outcome> {
    let (reader, writer) = std::io::pipe().context("creating the console pipe")?;
    let start = Instant::now();
    let mut child = {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(accel.qemu_args())
            .args([
                "-m",
                VM_MEMORY,
                "-smp",
                VM_CPUS,
                "-M",
                "pc",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-nographic", "-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 oops=panic"])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ])
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        // `cmd` owns the pipe's write ends: dropping it here lets the reader see EOF when QEMU exits.
        cmd.spawn().context("starting qemu-system-x86_64")?
    };
    let marker = format!("VM_EXIT_{nonce}=");
    let console = thread::spawn(move || stream_console(reader, &marker, start));
    let timed_out = wait_or_kill(&mut child, timeout)?;
    let (exit, boot) = console
        .join()
        .map_err(|_| anyhow!("console reader panicked"))??;
    Ok(Outcome {
        exit,
        timed_out,
        wall: start.elapsed(),
        boot,
    })
}

/// Copies the console to stdout (without carriage returns) and returns the exit status found
/// after `marker`, and when the guest said it had booted.
fn stream_console(
    reader: impl Read,
    marker: &str,
    start: Instant,
) -> Result<(Option<i32>, Option<Duration>)> {
    let mut reader = BufReader::new(reader);
    let stdout = std::io::stdout();
    let (mut exit, mut booted) = (None, None);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        buf.retain(|&b| b != b'\r');
        let line = String::from_utf8_lossy(&buf);
        // The firmware leaves terminal escapes on the line before the guest's first words.
        if booted.is_none() && line.contains("VM_BOOTED ") {
            booted = Some(start.elapsed());
        }
        if let Some(pos) = line.find(marker) {
            let digits: String = line[pos + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            exit = digits.parse().ok().or(exit);
        }
        let mut out = stdout.lock();
        out.write_all(&buf)?;
        out.flush()?;
    }
    Ok((exit, booted))
}

/// Waits for `child` to exit; kills it once `timeout` has passed. Returns whether it was killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            eprintln!(
                "=== vm-test: timed out after {}s; killing QEMU",
                timeout.as_secs()
            );
            child.kill().context("killing qemu")?;
            child.wait()?;
            return Ok(true);
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Summary

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("lifecycle::"), "lifecycle::");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn softdeps() {
        assert_eq!(pre_softdeps("pre: crc32c"), ["crc32c"]);
        assert_eq!(pre_softdeps("pre: a b post: c"), ["a", "b"]);
        assert!(pre_softdeps("post: c").is_empty());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name(Path::new("x/nf-tables.ko.xz")).as_deref(),
            Some("nf_tables")
        );
        assert_eq!(module_name(Path::new("x/veth.ko")).as_deref(), Some("veth"));
        assert_eq!(module_name(Path::new("x/modules.dep")), None);
        assert_eq!(
            strip_compression(Path::new("kernel/a.ko.zst")),
            PathBuf::from("kernel/a.ko")
        );
    }

    #[test]
    fn aliases() {
        assert_eq!(
            declared_aliases(b"license=GPL\0alias=crc32c\0alias=crypto-crc32c\0"),
            ["crc32c", "crypto-crc32c"]
        );
    }

    #[test]
    fn kernel_specs() {
        assert!(matches!(
            KernelSpec::parse("6.1").unwrap(),
            KernelSpec::Packages { suite: None, .. }
        ));
        match KernelSpec::parse("7.2").unwrap() {
            KernelSpec::Packages { packages, suite } => {
                assert_eq!(packages.len(), 3);
                assert_eq!(suite.as_deref(), Some("sid"));
            }
            other => panic!("{other:?}"),
        }
        assert!(KernelSpec::parse("5.10").is_err());
    }
}
