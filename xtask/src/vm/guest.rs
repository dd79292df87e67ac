//! What runs in the guest: the dropscope binary and the integration-test executable built on
//! the host, snapshotted, and the shell script that runs them in the workspace root; or any
//! other command built on the host, whose standard output comes back to the host.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::{core_tests, TempDir};

/// Environment variables passed through to the test executable in the guest.
const FORWARDED_ENV: &[&str] = &["RUST_BACKTRACE", "DROPSCOPE_LOG"];

/// libtest options whose value is a separate argument (so it is not a test name filter).
const OPTIONS_WITH_VALUE: &[&str] = &[
    "--skip",
    "--test-threads",
    "--color",
    "--format",
    "--logfile",
    "-Z",
];

/// The shell script the guest runs in the chroot: environment, working directory, test executable.
pub(super) struct GuestCommand {
    pub(super) script: String,
    /// Private copies of the binaries under test (the guest reads the host's files live, so a
    /// rebuild in the workspace during a run would otherwise change them between kernels).
    _binaries: TempDir,
}

impl GuestCommand {
    /// Builds dropscope and the integration-test executable on the host, snapshots both, and
    /// writes the script that runs the tests in the workspace root, one test at a time: the
    /// tests marked core when `core` is set (see `core_tests`), else those `extra` selects.
    pub(super) fn build(root: &Path, core: bool, extra: &[String]) -> Result<Self> {
        if core {
            if let Some(filter) = filters(extra).next() {
                bail!("--core selects the tests itself; drop the test filter {filter:?} or --core");
            }
        }
        let bin = crate::build(root, false)?;
        let exe = integration_test_executable(root)?;
        let (core_names, no_reasons_names) = if core {
            let set = core_tests::discover(&root.join("tests/scenarios"))?;
            let names = core_tests::select(&set, &exe)?;
            let no_reasons = core_tests::select_no_reasons(&set, &exe)?;
            eprintln!(
                "=== vm-test: --core: {} tests ({} on kernels without drop reasons)",
                names.len(),
                no_reasons.len()
            );
            (names, no_reasons)
        } else {
            (Vec::new(), Vec::new())
        };
        let binaries = TempDir::new("bin")?;
        let bin = snapshot(&bin, &binaries.0)?;
        let exe = snapshot(&exe, &binaries.0)?;

        let mut script = preamble(root)?;
        writeln!(
            script,
            "export DROPSCOPE_BIN={}",
            sh_quote(&bin.to_string_lossy())
        )?;
        // Verifying and attaching eBPF programs is slow under emulation.
        writeln!(script, "export DROPSCOPE_ATTACH_TIMEOUT=180")?;
        // Debian kernels allow fentry and kprobes: the context probes must attach there.
        writeln!(script, "export DROPSCOPE_EXPECT_CONTEXT=1")?;
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
        if core {
            // Which set depends on the booted kernel: one that names its drop reasons in BTF
            // runs the core set; one without (before 5.17) the set whose tests assert the
            // answers such a kernel allows, since the core set's cannot hold there.
            let set = |names: &[String]| {
                names
                    .iter()
                    .map(|n| sh_quote(n))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(
                script,
                "if grep -q SKB_DROP_REASON_ /sys/kernel/btf/vmlinux; then\n  \
                 echo '=== vm-test: this kernel gives drop reasons: the core set ({} tests)'\n  \
                 set -- {}\nelse\n  \
                 echo '=== vm-test: this kernel gives no drop reasons: the no-reasons set ({} tests)'\n  \
                 set -- {}\nfi",
                core_names.len(),
                set(&core_names),
                no_reasons_names.len(),
                set(&no_reasons_names)
            )?;
            writeln!(script, "exec {} --exact \"$@\"", quoted.join(" "))?;
        } else {
            writeln!(script, "exec {}", quoted.join(" "))?;
        }
        Ok(GuestCommand {
            script,
            _binaries: binaries,
        })
    }

    /// Snapshots `binaries` (built on the host) and writes the script that runs `argv`, given
    /// the snapshots' paths, in the workspace root, its standard output in `/run/vm-out`,
    /// which the guest's /init hands back to the host (see `initramfs`).
    pub(super) fn command(
        root: &Path,
        binaries: &[&Path],
        argv: impl FnOnce(&[PathBuf]) -> Vec<String>,
    ) -> Result<Self> {
        let dir = TempDir::new("bin")?;
        let copies = binaries
            .iter()
            .map(|b| snapshot(b, &dir.0))
            .collect::<Result<Vec<_>>>()?;
        let mut script = preamble(root)?;
        let quoted: Vec<String> = argv(&copies).iter().map(|a| sh_quote(a)).collect();
        writeln!(script, "exec {} >/run/vm-out", quoted.join(" "))?;
        Ok(GuestCommand {
            script,
            _binaries: dir,
        })
    }
}

/// The start of every guest script: the forwarded environment, PATH and HOME, and the
/// workspace root as working directory.
fn preamble(root: &Path) -> Result<String> {
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
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
    )?;
    writeln!(script, "cd {} || exit 1", sh_quote(&root.to_string_lossy()))?;
    Ok(script)
}

/// The test name filters among libtest arguments.
fn filters(args: &[String]) -> impl Iterator<Item = &String> {
    args.iter().enumerate().filter_map(move |(i, a)| {
        let value_of_option = i > 0 && OPTIONS_WITH_VALUE.contains(&args[i - 1].as_str());
        (!a.starts_with('-') && !value_of_option).then_some(a)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_told_from_option_values() {
        let args: Vec<String> = [
            "--nocapture",
            "--skip",
            "slow",
            "fwd",
            "--test-threads",
            "2",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(filters(&args).collect::<Vec<_>>(), ["fwd"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("lifecycle::"), "lifecycle::");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
