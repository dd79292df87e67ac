//! The initramfs: static busybox, the modules the tests need, an `/init` that mounts the host's
//! root read-only over 9p under a tmpfs overlay and runs the guest command in a chroot.
use std::{
    fs,
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};

use super::{guest::GuestCommand, kernels::Kernel, modules::ModuleShipper, walk, TempDir};

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

/// Writes a gzip'ed newc initramfs for `kernel` to `out`: busybox, modules, /init, the command.
pub(super) fn build_initramfs(
    kernel: &Kernel,
    guest: &GuestCommand,
    nonce: &str,
    out: &Path,
) -> Result<()> {
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
/// filesystems, then the command in a chroot; hands back what the command left in /run/vm-out
/// and reports its status, each line with the nonce'd marker.
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
[ -f /host/run/vm-out ] && sed 's/^/VM_OUT_{nonce} /' /host/run/vm-out
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
