//! Booting: QEMU with the kernel and the initramfs, the serial console streamed to stdout, the
//! guest's exit status read from its nonce'd marker line, and a time limit.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

use super::{host::Accel, kernels::Kernel};

/// Guest memory and vCPUs.
pub(super) const VM_MEMORY: &str = "1G";
pub(super) const VM_CPUS: &str = "2";

/// How one VM ended.
pub(super) struct Outcome {
    /// The guest command's exit status, if the guest reported one.
    pub(super) exit: Option<i32>,
    pub(super) timed_out: bool,
    pub(super) wall: Duration,
    /// From QEMU's start to the guest's VM_BOOTED line.
    pub(super) boot: Option<Duration>,
    /// The lines the guest command left in /run/vm-out.
    pub(super) output: Vec<String>,
}

/// Eight hex digits from /dev/urandom, so the guest's exit marker cannot be forged by its output.
pub(super) fn nonce() -> Result<String> {
    let mut bytes = [0u8; 4];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Boots QEMU, streams the console to stdout and waits for it to power off (or kills it at the timeout).
pub(super) fn boot(
    kernel: &Kernel,
    initrd: &Path,
    accel: Accel,
    timeout: Duration,
    nonce: &str,
    tag: &str,
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
    let markers = Markers {
        exit: format!("VM_EXIT_{nonce}="),
        output: format!("VM_OUT_{nonce} "),
    };
    let prefix = if tag.is_empty() {
        String::new()
    } else {
        format!("[{tag}] ")
    };
    let console = thread::spawn(move || stream_console(reader, &markers, start, &prefix));
    let timed_out = wait_or_kill(&mut child, timeout)?;
    let (exit, boot, output) = console
        .join()
        .map_err(|_| anyhow!("console reader panicked"))??;
    Ok(Outcome {
        exit,
        timed_out,
        wall: start.elapsed(),
        boot,
        output,
    })
}

/// The nonce'd prefixes of the guest's exit status and of its command's output lines.
struct Markers {
    exit: String,
    output: String,
}

/// Copies the console to stdout (without carriage returns), except the command's output lines,
/// and returns the exit status, when the guest said it had booted, and the output lines.
fn stream_console(
    reader: impl Read,
    markers: &Markers,
    start: Instant,
    prefix: &str,
) -> Result<(Option<i32>, Option<Duration>, Vec<String>)> {
    let mut reader = BufReader::new(reader);
    let stdout = std::io::stdout();
    let (mut exit, mut booted, mut output) = (None, None, Vec::new());
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
        if let Some(pos) = line.find(&markers.output) {
            let text = &line[pos + markers.output.len()..];
            output.push(text.strip_suffix('\n').unwrap_or(text).to_string());
            continue;
        }
        if let Some(pos) = line.find(&markers.exit) {
            let digits: String = line[pos + markers.exit.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            exit = digits.parse().ok().or(exit);
        }
        let mut out = stdout.lock();
        out.write_all(prefix.as_bytes())?;
        out.write_all(&buf)?;
        out.flush()?;
    }
    Ok((exit, booted, output))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_gives_exit_status_and_command_output() {
        let markers = Markers {
            exit: "VM_EXIT_ab12=".into(),
            output: "VM_OUT_ab12 ".into(),
        };
        let console = "\x1b[2JVM_BOOTED uptime=1.2\r\nVM_OUT_ab12 {\r\nVM_OUT_ab12   \"a\": 1\nVM_OUT_ab12 }\nVM_OUT_ff00 forged\nVM_EXIT_ab12=3\n";
        let (exit, booted, output) =
            stream_console(console.as_bytes(), &markers, Instant::now(), "").unwrap();
        assert_eq!(exit, Some(3));
        assert!(booted.is_some());
        assert_eq!(output, ["{", "  \"a\": 1", "}"]);
    }
}
