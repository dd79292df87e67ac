//! The host side of a VM run: the Debian packages it needs, the time limit, and how QEMU
//! executes the guest (KVM or TCG).
use std::{fs, path::Path, process::Command};

use anyhow::{bail, Result};

/// Host packages a VM run needs, each with a file it installs (to check without dpkg's help too).
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("binutils", "/usr/bin/objcopy"),
    ("xz-utils", "/usr/bin/xz"),
    ("zstd", "/usr/bin/zstd"),
];

/// Installs the host packages a VM run needs when any is missing (as root; otherwise says how).
pub(super) fn ensure_host_packages() -> Result<()> {
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

/// How QEMU executes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only when a hardware KVM module (kvm_intel, kvm_amd) is loaded: other providers of
    /// /dev/kvm (e.g. kvm_pvm) open fine, but stock kernels hang in them. `VM_ACCEL` overrides.
    pub(super) fn detect() -> Result<Self> {
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

    /// TCG runs single-threaded: with one host thread per vCPU (`thread=multi`) the guest's
    /// live patching of tracepoint and static-key sites hit stale code on the other vCPU (an
    /// `int3` oops, then a panic) whenever probes were attached and detached. One host thread
    /// per VM; `vm-test` runs kernels side by side instead.
    pub(super) fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}
