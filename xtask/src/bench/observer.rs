//! The observers compared in the benchmark, started and stopped the same way, with their cost
//! read from the kernel's program accounting and from /proc.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::stats::{self, Programs};

/// What watches the drops during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Nothing attached: the baseline.
    None,
    /// An empty program on the same tracepoint: the floor any tracepoint tool pays.
    NullObserver,
    /// The expert's one-liner: bpftrace counting kfree_skb reasons.
    Bpftrace,
    /// dropscope with its defaults, human output to /dev/null.
    DropscopeText,
    /// dropscope --format json to a file.
    DropscopeJson,
    /// dropscope with a kernel-side filter that no drop of the storm matches.
    DropscopeFiltered,
}

pub const ALL: [Kind; 6] = [
    Kind::None,
    Kind::NullObserver,
    Kind::Bpftrace,
    Kind::DropscopeText,
    Kind::DropscopeJson,
    Kind::DropscopeFiltered,
];

/// The one-liner dropscope is compared with.
pub const BPFTRACE_ONE_LINER: &str = "tracepoint:skb:kfree_skb { @[args->reason] = count(); }";

/// The filter of [`Kind::DropscopeFiltered`]: TEST-NET-1, never a destination in the storm.
pub const NON_MATCHING_FILTER: [&str; 2] = ["--dst", "192.0.2.1"];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::None => "no observer",
            Kind::NullObserver => "empty tp_btf program",
            Kind::Bpftrace => "bpftrace one-liner",
            Kind::DropscopeText => "dropscope (text)",
            Kind::DropscopeJson => "dropscope --format json",
            Kind::DropscopeFiltered => "dropscope --dst 192.0.2.1 (no match)",
        }
    }

    pub fn is_dropscope(self) -> bool {
        matches!(
            self,
            Kind::DropscopeText | Kind::DropscopeJson | Kind::DropscopeFiltered
        )
    }

    /// Whether its output is JSON the benchmark reads back (summary, counts).
    fn json(self) -> bool {
        matches!(self, Kind::DropscopeJson | Kind::DropscopeFiltered)
    }
}

/// A running observer.
pub struct Running {
    child: Option<Child>,
    /// From spawning the process to its programs being attached (what the operator waits).
    pub attach_ms: f64,
    json_out: Option<PathBuf>,
    /// Its eBPF programs, found once it is attached.
    pub programs: Programs,
}

impl Running {
    /// Starts `kind` and waits until it is attached. `extra` goes to dropscope.
    pub fn start(kind: Kind, bin: &Path, scratch: &Path, extra: &[String]) -> Result<Running> {
        let ready = scratch.join("ready");
        let _ = fs::remove_file(&ready);
        let json_out = kind.json().then(|| scratch.join("dropscope.json"));
        let loaded_before = Programs::loaded_ids();
        let started = Instant::now();
        let child = match kind {
            Kind::None => None,
            Kind::DropscopeText
            | Kind::DropscopeJson
            | Kind::DropscopeFiltered
            | Kind::NullObserver => {
                let mut cmd = Command::new(bin);
                cmd.arg("--ready-file")
                    .arg(&ready)
                    .args(["--color", "never"]);
                match kind {
                    Kind::NullObserver => {
                        cmd.arg("--null-observer");
                    }
                    Kind::DropscopeJson => {
                        cmd.args(["--format", "json"]);
                    }
                    Kind::DropscopeFiltered => {
                        cmd.args(["--format", "json"]).args(NON_MATCHING_FILTER);
                    }
                    _ => {}
                }
                if kind.is_dropscope() {
                    cmd.args(extra);
                }
                let out = match &json_out {
                    Some(p) => Stdio::from(fs::File::create(p)?),
                    None => Stdio::null(),
                };
                let err_path = scratch.join("stderr");
                let mut child = cmd
                    .stdout(out)
                    .stderr(fs::File::create(&err_path)?)
                    .spawn()
                    .context("starting dropscope")?;
                if let Err(e) = wait_until(&mut child, || ready.exists()) {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
                    return Err(e.context(stderr));
                }
                Some(child)
            }
            Kind::Bpftrace => {
                let mut child = Command::new("bpftrace")
                    .args(["-e", BPFTRACE_ONE_LINER])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting bpftrace")?;
                let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
                // bpftrace says "Attaching 1 probe..." once it is attached.
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("Attaching") => {}
                    other => {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!("bpftrace did not attach: {other:?}")
                    }
                }
                std::thread::spawn(move || for _ in lines {});
                // ... which it prints before loading and attaching: wait for its program,
                // then give the attach a moment.
                let found = wait_until(&mut child, || {
                    !Programs::new_since(&loaded_before).0.is_empty()
                });
                if let Err(e) = found {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(300));
                Some(child)
            }
        };
        let attach_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut running = Running {
            child,
            attach_ms,
            json_out,
            programs: Programs::default(),
        };
        running.programs = match (&running.child, kind) {
            (None, _) => Programs::default(),
            // bpftrace keeps its programs through perf event fds, not program fds.
            (Some(_), Kind::Bpftrace) => Programs::new_since(&loaded_before),
            (Some(c), _) => Programs::of_process(c.id()),
        };
        if running.child.is_some() && running.programs.0.is_empty() {
            bail!("{} holds no eBPF program once attached", kind.label());
        }
        Ok(running)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// CPU time of the process so far, ns.
    pub fn cpu_ns(&self) -> u64 {
        self.pid().map_or(0, stats::cpu_ns)
    }

    /// Peak RSS so far, MB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.pid()
            .map_or(0.0, |p| stats::peak_rss_kb(p) as f64 / 1024.0)
    }

    /// Stops with SIGINT; returns the detach time (signal to exit) and, for JSON output, the
    /// records dropscope printed.
    pub fn stop(mut self) -> Result<(f64, Option<Vec<serde_json::Value>>)> {
        let Some(mut child) = self.child.take() else {
            return Ok((0.0, None));
        };
        let started = Instant::now();
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                bail!("observer did not exit within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let detach_ms = started.elapsed().as_secs_f64() * 1000.0;
        let records = match &self.json_out {
            Some(p) => Some(
                fs::read_to_string(p)?
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect(),
            ),
            None => None,
        };
        Ok((detach_ms, records))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(child: &mut Child, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready() {
        if let Some(st) = child.try_wait()? {
            bail!("observer exited before attaching ({st})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("observer did not attach within 300 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
