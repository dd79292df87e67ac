//! `dropscope serve`'s log: JSON lines sized for a DaemonSet, whose every line is kept and
//! shipped. Each kind of drop is explained (evidence, fix) once per log interval, and the
//! counts come as one digest line per interval in which something dropped; a quiet node logs
//! nothing. The exact, per-label counts are the metrics' job.
use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    json::{attach_json, change_json, drop_json, emit, summary_json},
    AttachInfo, ChangeRecord, Clock, DropRecord, Progress, Sink, Summary,
};

/// Kinds of drop explained per log interval; further new kinds are only counted.
const MAX_EXPLAINED: usize = 50;

/// What makes drops the same kind for the log: one explanation stands for all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    cause: String,
    reason: Arc<str>,
    location: Arc<str>,
    netns: u32,
    ifindex: Option<u32>,
}

/// What happened during one log interval.
#[derive(Debug, Default)]
struct Period {
    drops: u64,
    causes: BTreeMap<String, u64>,
    sampled: u64,
    lost: u64,
    /// Kinds seen; the first `MAX_EXPLAINED` of them were explained.
    kinds: HashSet<Kind>,
}

/// The serve-mode log sink.
pub struct DigestLog<W: Write> {
    out: W,
    clock: Clock,
    every: Duration,
    started: Instant,
    period: Period,
    /// Benign drops suppressed before this period (the total is cumulative).
    suppressed_before: u64,
    suppressed: u64,
    /// Where the metrics are served, for the attach line.
    metrics_url: String,
}

impl<W: Write> DigestLog<W> {
    /// A log writing to `out`, with a digest at most every `every`.
    pub fn new(out: W, clock: Clock, every: Duration, metrics_url: String) -> Self {
        DigestLog {
            out,
            clock,
            every,
            started: Instant::now(),
            period: Period::default(),
            suppressed_before: 0,
            suppressed: 0,
            metrics_url,
        }
    }

    /// Writes the digest of the period that ends now, if anything dropped in it.
    fn digest(&mut self) {
        let p = std::mem::take(&mut self.period);
        let seconds = std::mem::replace(&mut self.started, Instant::now())
            .elapsed()
            .as_secs_f64();
        let suppressed =
            self.suppressed - std::mem::replace(&mut self.suppressed_before, self.suppressed);
        if p.drops == 0 {
            return;
        }
        let v = json!({
            "type": "digest",
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "drops": p.drops,
            "causes": p.causes,
            "unsent": {"sampled": p.sampled, "lost": p.lost},
            "suppressed": suppressed,
            "kinds": p.kinds.len(),
            "kinds_explained": p.kinds.len().min(MAX_EXPLAINED),
        });
        emit(&mut self.out, &v);
    }
}

impl<W: Write> Sink for DigestLog<W> {
    fn attach(&mut self, info: &AttachInfo) {
        let mut v = attach_json(info);
        v["metrics"] = Value::String(self.metrics_url.clone());
        emit(&mut self.out, &v);
        self.started = Instant::now();
    }

    fn drop(&mut self, record: &DropRecord) {
        let p = &mut self.period;
        p.drops += record.count;
        *p.causes.entry(record.verdict.cause.clone()).or_default() += record.count;
        match record.unsent {
            Some("sampled") => p.sampled += record.count,
            Some(_) => p.lost += record.count,
            None => {}
        }
        let d = &record.drop;
        let kind = Kind {
            cause: record.verdict.cause.clone(),
            reason: d.reason.clone(),
            location: d.location.clone(),
            netns: d.netns,
            ifindex: d.dev.map(|dev| dev.ifindex),
        };
        if !p.kinds.insert(kind) || p.kinds.len() > MAX_EXPLAINED {
            return;
        }
        let v = drop_json(record, &self.clock);
        emit(&mut self.out, &v);
    }

    /// Every change is logged: they are rare, and what an incident review needs.
    fn change(&mut self, record: &ChangeRecord) {
        let v = change_json(record, &self.clock);
        emit(&mut self.out, &v);
    }

    fn tick(&mut self, progress: &Progress) {
        self.suppressed = progress.suppressed;
        if self.started.elapsed() >= self.every {
            self.digest();
        }
    }

    fn summary(&mut self, summary: &Summary) {
        self.suppressed = summary.suppressed;
        self.digest();
        emit(&mut self.out, &summary_json(summary));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn each_kind_is_explained_once_per_interval_and_digests_add_up() {
        let mut out = Vec::new();
        let mut log = DigestLog::new(
            &mut out,
            Clock::new(),
            Duration::ZERO,
            "http://127.0.0.1:9655/metrics".into(),
        );
        let info = AttachInfo {
            probes: Vec::new(),
            attach_ms: 1,
            kernel: "6.18".into(),
            reasons: 1,
            ..Default::default()
        };
        let causes = std::collections::HashMap::new();
        let progress = Progress {
            causes: &causes,
            seconds: 1.0,
            lost: 0,
            suppressed: 7,
            stalls: Default::default(),
        };
        log.attach(&info);
        log.drop(&DropRecord::example("netfilter_drop", 1, None));
        log.drop(&DropRecord::example("netfilter_drop", 4, None));
        log.drop(&DropRecord::example("netfilter_drop", 10, Some("sampled")));
        log.tick(&progress);
        log.tick(&progress); // nothing dropped since: no line
        log.drop(&DropRecord::example("netfilter_drop", 2, None));
        log.summary(&Summary {
            suppressed: 9,
            ..Default::default()
        });
        drop(log);
        let v = lines(&out);
        let types: Vec<&str> = v.iter().map(|l| l["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            ["attach", "drop", "digest", "drop", "digest", "summary"],
            "{v:#?}"
        );
        assert_eq!(v[0]["metrics"], "http://127.0.0.1:9655/metrics");
        assert_eq!(
            (v[1]["cause"].as_str(), v[1]["evidence"].as_str()),
            (Some("netfilter_drop"), Some("evidence"))
        );
        assert_eq!(v[2]["drops"], 15);
        assert_eq!(v[2]["causes"]["netfilter_drop"], 15);
        assert_eq!(
            (
                v[2]["unsent"]["sampled"].as_u64(),
                v[2]["suppressed"].as_u64(),
                v[2]["kinds"].as_u64()
            ),
            (Some(10), Some(7), Some(1))
        );
        assert_eq!(
            (v[4]["drops"].as_u64(), v[4]["suppressed"].as_u64()),
            (Some(2), Some(2))
        );
    }
}
