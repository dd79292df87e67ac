//! The observers compared in the benchmark, started and stopped the same way, with their cost
//! read from /proc.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What watches the drops during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Nothing attached: the baseline.
    None,
    /// dropscope, human output to /dev/null.
    DropscopeText,
    /// dropscope --format json to a file.
    DropscopeJson,
    /// An empty program on the same tracepoint: the floor any tracepoint tool pays.
    NullObserver,
    /// The expert's one-liner: bpftrace counting kfree_skb reasons.
    Bpftrace,
}

pub const ALL: [Kind; 5] = [
    Kind::None,
    Kind::DropscopeText,
    Kind::DropscopeJson,
    Kind::NullObserver,
    Kind::Bpftrace,
];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::None => "no observer",
            Kind::DropscopeText => "dropscope (text)",
            Kind::DropscopeJson => "dropscope --format json",
            Kind::NullObserver => "null observer (empty tp_btf program)",
            Kind::Bpftrace => "bpftrace kfree_skb reason count",
        }
    }
}

/// A running observer.
pub struct Running {
    child: Option<Child>,
    pub attach_ms: f64,
    json_out: Option<PathBuf>,
    cpu_start: u64,
}

impl Running {
    /// Starts `kind` watching namespace `netns` and waits until it is attached.
    pub fn start(kind: Kind, bin: &Path, netns: &str, scratch: &Path) -> Result<Running> {
        let ready = scratch.join("ready");
        let _ = fs::remove_file(&ready);
        let json_out = (kind == Kind::DropscopeJson).then(|| scratch.join("dropscope.json"));
        let started = Instant::now();
        let child = match kind {
            Kind::None => None,
            Kind::DropscopeText | Kind::DropscopeJson | Kind::NullObserver => {
                let mut cmd = Command::new(bin);
                cmd.arg("--ready-file")
                    .arg(&ready)
                    .args(["--netns", netns, "--color", "never"]);
                match kind {
                    Kind::NullObserver => {
                        cmd.arg("--null-observer");
                    }
                    Kind::DropscopeJson => {
                        cmd.args(["--format", "json"]);
                    }
                    _ => {}
                }
                let out = match &json_out {
                    Some(p) => Stdio::from(fs::File::create(p)?),
                    None => Stdio::null(),
                };
                let mut child = cmd
                    .stdout(out)
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting dropscope")?;
                wait_until(&mut child, || ready.exists())?;
                Some(child)
            }
            Kind::Bpftrace => {
                let mut child = Command::new("bpftrace")
                    .args([
                        "-e",
                        "tracepoint:skb:kfree_skb { @[args->reason] = count(); }",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting bpftrace")?;
                let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
                // bpftrace says "Attaching 1 probe..." once it is attached.
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("Attaching") => {}
                    other => bail!("bpftrace did not attach: {other:?}"),
                }
                std::thread::spawn(move || for _ in lines {});
                Some(child)
            }
        };
        let attach_ms = started.elapsed().as_secs_f64() * 1000.0;
        let cpu_start = child.as_ref().map_or(0, |c| cpu_ticks(c.id()));
        Ok(Running {
            child,
            attach_ms,
            json_out,
            cpu_start,
        })
    }

    /// CPU used since start (% of one core over `seconds`) and peak RSS (MB).
    pub fn usage(&self, seconds: f64) -> (f64, f64) {
        let Some(c) = &self.child else {
            return (0.0, 0.0);
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = (cpu_ticks(c.id()) - self.cpu_start) as f64 / hz / seconds * 100.0;
        (cpu, peak_rss_kb(c.id()) as f64 / 1024.0)
    }

    /// Stops with SIGINT; returns the detach time (signal to exit) and dropscope's JSON summary.
    pub fn stop(mut self) -> Result<(f64, Option<serde_json::Value>)> {
        let Some(mut child) = self.child.take() else {
            return Ok((0.0, None));
        };
        let started = Instant::now();
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait()?;
        let detach_ms = started.elapsed().as_secs_f64() * 1000.0;
        let records = match &self.json_out {
            Some(p) => Some(fs::read_to_string(p)?),
            None => None,
        };
        let summary = records.and_then(|text| {
            text.lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok())
        });
        let sampled = self
            .json_out
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|r| r["sampled"] == true)
                    .filter_map(|r| r["count"].as_u64())
                    .sum::<u64>()
            });
        let summary = summary.map(|mut s: serde_json::Value| {
            s["sampled_total"] = serde_json::json!(sampled.unwrap_or(0));
            s
        });
        Ok((detach_ms, summary))
    }
}

fn wait_until(child: &mut Child, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Some(st) = child.try_wait()? {
            bail!("observer exited before attaching ({st})");
        }
        if Instant::now() > deadline {
            bail!("observer did not attach within 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
}

/// VmHWM of a process, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
