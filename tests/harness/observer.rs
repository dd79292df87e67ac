//! The real `dropscope` binary, started with a ready file and stopped with a signal.
use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

use crate::netns::Netns;

/// Path of the binary under test (set by `cargo xtask test`; otherwise the debug build in
/// `CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DROPSCOPE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("debug").join("dropscope")
}

/// How long dropscope may take to attach: 20 s, or `DROPSCOPE_ATTACH_TIMEOUT` seconds (emulated
/// VMs verify programs far more slowly).
pub fn attach_timeout() -> Duration {
    let secs = std::env::var("DROPSCOPE_ATTACH_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// A path in the temporary directory no other test uses.
pub fn temp_path(prefix: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()))
}

/// A running dropscope.
pub struct Observer {
    child: Option<Child>,
    ready: PathBuf,
    /// Read while it runs (a long run must never block on a full pipe): the output lines so
    /// far, each with the moment it was read, and the thread reading them.
    stdout: Option<(Lines, JoinHandle<()>)>,
    stderr: Option<(Lines, JoinHandle<()>)>,
}

/// Output lines with the moment each was read.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Reads a child's output line by line on a thread of its own, noting when each came.
fn collect_lines(pipe: impl Read + Send + 'static) -> (Lines, JoinHandle<()>) {
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    (lines, reader)
}

/// Everything read by a line reader, once its pipe has closed.
fn all_lines((lines, reader): (Lines, JoinHandle<()>)) -> String {
    reader.join().expect("output reader");
    let lines = lines.lock().unwrap();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    text.join("\n")
}

/// What dropscope printed, parsed.
#[derive(Debug)]
pub struct Report {
    pub records: Vec<Value>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Observer {
    /// Starts `dropscope --format json --ready-file ... ARGS` and waits until it is attached.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(
            Command::new(binary()),
            &["--format", "json", "--color", "never"],
            args,
        )
    }

    /// Like `start`, with dropscope run through `wrapper` (a command that ends by exec-ing its
    /// arguments, like `setpriv ...`), so that `stop`'s signal reaches dropscope itself.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let (program, rest) = wrapper.split_first().expect("a wrapper command");
        let mut cmd = Command::new(program);
        cmd.args(rest).arg(binary());
        Self::spawn(cmd, &["--format", "json", "--color", "never"], args)
    }

    /// The same, with dropscope running inside `ns` (nsenter: only the network namespace
    /// changes), so that `ns` is the node's namespace as dropscope sees it.
    pub fn start_in(ns: &Netns, args: &[&str]) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path())).arg(binary());
        Self::spawn(cmd, &["--format", "json", "--color", "never"], args)
    }

    /// Starts `dropscope serve --ready-file ... ARGS` (JSON log lines) and waits until it is
    /// attached.
    pub fn serve(args: &[&str]) -> Self {
        Self::spawn(Command::new(binary()), &["serve"], args)
    }

    /// Like `start`, waiting up to `timeout` for the attach (for tests that start many
    /// observers on a busy machine).
    pub fn start_within(args: &[&str], timeout: Duration) -> Self {
        Self::spawn_within(
            Command::new(binary()),
            &["--format", "json", "--color", "never"],
            args,
            timeout,
        )
    }

    /// `dropscope serve` run through `wrapper` (see `start_wrapped`).
    pub fn serve_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let (program, rest) = wrapper.split_first().expect("a wrapper command");
        let mut cmd = Command::new(program);
        cmd.args(rest).arg(binary());
        Self::spawn(cmd, &["serve"], args)
    }

    fn spawn(cmd: Command, leading: &[&str], args: &[&str]) -> Self {
        // Watching every namespace, dropscope reads the rule counters of each before it is
        // ready: on a host busy with other tests' namespaces that takes longer.
        let timeout = if args.contains(&"--netns") {
            attach_timeout()
        } else {
            attach_timeout() * 3
        };
        Self::spawn_within(cmd, leading, args, timeout)
    }

    fn spawn_within(mut cmd: Command, leading: &[&str], args: &[&str], timeout: Duration) -> Self {
        let ready = temp_path("dropscope-ready");
        let mut child = cmd
            .args(leading)
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary().display()));
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(child.stderr.take().unwrap());
        let deadline = Instant::now() + timeout;
        while !ready.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let err = all_lines(stderr);
                panic!("dropscope exited before attaching ({status}): {err}");
            }
            if Instant::now() >= deadline {
                // Not left running (and attached) after the test gives up on it.
                let _ = child.kill();
                let _ = child.wait();
                panic!("dropscope did not attach within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Observer {
            child: Some(child),
            ready,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Waits (up to `secs`) for a printed record that `pred` accepts; returns it and when it
    /// was read.
    pub fn wait_for(&self, secs: f64, pred: impl Fn(&Value) -> bool) -> Option<(Value, Instant)> {
        let (lines, _) = self.stdout.as_ref().expect("running");
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut seen = 0;
        loop {
            let batch: Vec<(Instant, String)> = lines.lock().unwrap()[seen..].to_vec();
            seen += batch.len();
            for (at, line) in batch {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if pred(&v) {
                        return Some((v, at));
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to `secs`) for a log line (stderr) containing `needle`; whether it came.
    pub fn wait_for_log(&self, secs: f64, needle: &str) -> bool {
        let (lines, _) = self.stderr.as_ref().expect("running");
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if lines.lock().unwrap().iter().any(|(_, l)| l.contains(needle)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The records printed so far.
    pub fn printed(&self) -> Vec<Value> {
        let (lines, _) = self.stdout.as_ref().expect("running");
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|(_, l)| serde_json::from_str(l).ok())
            .collect()
    }

    /// A line of `/proc/PID/status` of the running dropscope, in kB (`VmHWM`, `VmRSS`).
    pub fn status_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
    }

    /// The process id (for signal tests).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Stops with SIGINT (like Ctrl-C) and collects the output.
    pub fn stop(self) -> Report {
        self.stop_with(Signal::SIGINT)
    }

    pub fn stop_with(mut self, sig: Signal) -> Report {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), sig).expect("signal dropscope");
        let status = child.wait().expect("wait for dropscope");
        let out = std::process::Output {
            status,
            stdout: all_lines(self.stdout.take().unwrap()).into_bytes(),
            stderr: all_lines(self.stderr.take().unwrap()).into_bytes(),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let records = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let report = Report {
            records,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
        };
        assert!(!self.ready.exists(), "ready file left behind");
        report
    }
}

impl Observer {
    /// SIGKILL: dropscope gets no chance to clean up (the ready file it leaves is removed
    /// here). Returns how it ended.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        child.kill().expect("kill dropscope");
        let status = child.wait().expect("wait for dropscope");
        let _ = std::fs::remove_file(&self.ready);
        status
    }

    /// Waits at most `secs` for dropscope to exit by itself (it is killed after that, and
    /// the test fails): (how it ended, stdout, stderr).
    pub fn wait_exit(mut self, secs: f64) -> (ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for dropscope") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dropscope did not exit within {secs} s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = all_lines(self.stderr.take().unwrap());
        (status, all_lines(self.stdout.take().unwrap()), stderr)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Report {
    /// Drop records.
    pub fn drops(&self) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["type"] == "drop")
            .collect()
    }

    /// Drop records of one cause.
    pub fn of(&self, cause: &str) -> Vec<&Value> {
        self.drops()
            .into_iter()
            .filter(|r| r["cause"] == cause)
            .collect()
    }

    /// Packets a cause stands for (sum of `count`).
    pub fn count(&self, cause: &str) -> u64 {
        self.of(cause)
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    }

    /// The summary record (exactly one, last).
    pub fn summary(&self) -> &Value {
        let last = self.records.last().expect("some output");
        assert_eq!(
            last["type"], "summary",
            "last record is the summary: {last}"
        );
        last
    }

    /// The attach record (first).
    pub fn attach(&self) -> &Value {
        let first = &self.records[0];
        assert_eq!(first["type"], "attach");
        first
    }

    /// Causes reported, with counts (from the summary).
    pub fn causes(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.summary()["causes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect();
        v.sort();
        v
    }

    /// Asserts the run was clean and the records add up to the summary.
    pub fn assert_consistent(&self) {
        assert!(
            self.status.success(),
            "dropscope failed ({}): {}",
            self.status,
            self.stderr
        );
        let summary = self.summary();
        for (cause, total) in self.causes() {
            assert_eq!(
                self.count(&cause),
                total,
                "records of {cause} do not add up to the summary"
            );
        }
        assert_eq!(summary["lost"], 0, "events lost");
    }
}
