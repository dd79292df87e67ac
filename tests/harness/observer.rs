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

/// Path of the binary under test (set by `cargo xtask test`).
pub fn binary() -> PathBuf {
    match std::env::var_os("DROPSCOPE_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/debug/dropscope"
        )),
    }
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
    /// When started with [`Observer::streaming`]: the output lines so far, each with the
    /// moment it was read, and the thread reading them.
    stream: Option<(Lines, JoinHandle<()>)>,
}

/// Output lines with the moment each was read.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

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

    fn spawn(mut cmd: Command, leading: &[&str], args: &[&str]) -> Self {
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
        let deadline = Instant::now() + attach_timeout();
        while !ready.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("dropscope exited before attaching ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "dropscope did not attach within {:?}",
                attach_timeout()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Observer {
            child: Some(child),
            ready,
            stream: None,
        }
    }

    /// Like `start`, reading the output while dropscope runs: [`Observer::wait_for`] sees
    /// each record when it is printed, with the moment it was.
    pub fn streaming(args: &[&str]) -> Self {
        let mut obs = Self::start(args);
        let stdout = obs.child.as_mut().unwrap().stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        obs.stream = Some((lines, reader));
        obs
    }

    /// Waits (up to `secs`) for a printed record that `pred` accepts; returns it and when it
    /// was read. Needs [`Observer::streaming`].
    pub fn wait_for(&self, secs: f64, pred: impl Fn(&Value) -> bool) -> Option<(Value, Instant)> {
        let (lines, _) = self
            .stream
            .as_ref()
            .expect("started with Observer::streaming");
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

    /// The records printed so far. Needs [`Observer::streaming`].
    pub fn printed(&self) -> Vec<Value> {
        let (lines, _) = self
            .stream
            .as_ref()
            .expect("started with Observer::streaming");
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
        let child = self.child.take().unwrap();
        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), sig).expect("signal dropscope");
        let out = child.wait_with_output().expect("wait for dropscope");
        let stdout: std::borrow::Cow<str> = match self.stream.take() {
            Some((lines, reader)) => {
                reader.join().expect("output reader");
                let lines = lines.lock().unwrap();
                let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
                text.join("\n").into()
            }
            None => String::from_utf8_lossy(&out.stdout),
        };
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
