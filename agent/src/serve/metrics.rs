//! The Prometheus metrics, fed as a sink: every drop record adds its `count`, so the counters
//! are as exact as the records (the kernel's own per-key counts, reconciled by the session).
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::bounded::{BoundedFamily, Fold};
use crate::output::{AttachInfo, ChangeRecord, DropRecord, Progress, Sink, Summary};

/// The label value that stands for every label set beyond the cardinality bound.
const OTHER: &str = "other";

/// Whether the probes are attached (`/readyz`) and the observe loop is still turning
/// (`/healthz`): the loop beats once per `--interval` tick, and a loop that has not beaten
/// for [`Health::stale_after`] is stuck (a blocked read, a wedged sink), even though the
/// endpoint, on a thread of its own, still answers.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// When the loop last ticked, in ms since `epoch` plus one; 0 until its first tick (while
    /// the probes attach, which may take long on a busy node, the process counts as alive).
    beat: AtomicU64,
    epoch: Instant,
    stale_after: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(1))
    }
}

/// Ticks a loop may miss before it counts as stuck, and the least time that takes.
const MISSED_TICKS: u32 = 10;
const STALE_FLOOR: Duration = Duration::from_secs(5);

impl Health {
    /// Health of a loop that ticks every `interval`.
    pub fn new(interval: Duration) -> Self {
        Health {
            ready: AtomicBool::new(false),
            beat: AtomicU64::new(0),
            epoch: Instant::now(),
            stale_after: (interval * MISSED_TICKS).max(STALE_FLOOR),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// How long without a tick makes the loop stuck.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// The loop ticked.
    fn beat(&self) {
        self.beat_at(Instant::now());
    }

    fn beat_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.beat.store(ms + 1, Ordering::Relaxed);
    }

    /// `Err(time since the last tick)` when the loop is stuck.
    pub fn alive(&self) -> Result<(), Duration> {
        self.alive_at(Instant::now())
    }

    fn alive_at(&self, now: Instant) -> Result<(), Duration> {
        let beat = self.beat.load(Ordering::Relaxed);
        if beat == 0 {
            return Ok(());
        }
        let last = self.epoch + Duration::from_millis(beat - 1);
        let since = now.saturating_duration_since(last);
        if since > self.stale_after {
            Err(since)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    cause: String,
    reason: String,
    iface: String,
    pod_namespace: String,
    pod: String,
}

impl Fold for DropLabels {
    fn folded(&self) -> Self {
        DropLabels {
            cause: self.cause.clone(),
            reason: OTHER.into(),
            iface: OTHER.into(),
            pod_namespace: OTHER.into(),
            pod: OTHER.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByteLabels {
    cause: String,
    iface: String,
    pod_namespace: String,
    pod: String,
}

impl Fold for ByteLabels {
    fn folded(&self) -> Self {
        ByteLabels {
            cause: self.cause.clone(),
            iface: OTHER.into(),
            pod_namespace: OTHER.into(),
            pod: OTHER.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UnsentLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ChangeLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProbeLabels {
    probe: &'static str,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    kernel: String,
}

/// The metrics sink. Its counters live in the registry the endpoint encodes.
pub struct Metrics {
    drops: BoundedFamily<DropLabels>,
    bytes: BoundedFamily<ByteLabels>,
    unsent: Family<UnsentLabels, Counter>,
    events_lost: Counter,
    suppressed: Counter,
    probes: Family<ProbeLabels, Gauge>,
    changes: Family<ChangeLabels, Counter>,
    stall_max: Gauge<f64, std::sync::atomic::AtomicU64>,
    stalls: Counter,
    /// Kernel totals already added to `events_lost` and `suppressed` (they are cumulative).
    seen_lost: u64,
    seen_suppressed: u64,
    health: Arc<Health>,
}

impl Metrics {
    /// The metrics and the registry that exposes them; at most `max_series` label sets per
    /// labelled counter.
    pub fn new(max_series: usize, kernel: String, health: Arc<Health>) -> (Self, Registry) {
        let mut registry = Registry::with_prefix("dropscope");
        let drops = Family::<DropLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let unsent = Family::<UnsentLabels, Counter>::default();
        let (events_lost, suppressed, folds) =
            (Counter::default(), Counter::default(), Counter::default());
        let probes = Family::<ProbeLabels, Gauge>::default();
        let build = Family::<BuildLabels, Gauge>::default();
        let changes = Family::<ChangeLabels, Counter>::default();
        let stall_max = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let stalls = Counter::default();
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "drops",
            "Packets the kernel dropped, by cause, drop reason, interface and pod",
            drops.clone(),
        );
        registry.register(
            "drop_bytes",
            "Bytes of the packets the kernel dropped, by cause, interface and pod",
            bytes.clone(),
        );
        registry.register(
            "drops_unsent",
            "Drops counted in the kernel whose event was not sent: over the --sample budget (sampled) or no room in the ring buffer (lost)",
            unsent.clone(),
        );
        registry.register(
            "events_lost",
            "Drop events the ring buffer had no room for",
            events_lost.clone(),
        );
        registry.register(
            "drops_suppressed",
            "Benign drops counted but not reported (see --all)",
            suppressed.clone(),
        );
        registry.register(
            "changes",
            "Configuration changes seen in the watched namespaces, by kind (sysctl, netconf, link, route, address, nftables, iptables_legacy)",
            changes.clone(),
        );
        registry.register(
            "loop_stall_seconds_max",
            "The longest turn of the event loop (time it could not read the ring buffer)",
            stall_max.clone(),
        );
        registry.register(
            "loop_stalls",
            "Turns of the event loop longer than 100 ms",
            stalls.clone(),
        );
        registry.register(
            "probe_info",
            "Attach mode of each probe (tp_btf, tracepoint or unavailable)",
            probes.clone(),
        );
        registry.register(
            "build_info",
            "dropscope version and the kernel it runs on",
            build.clone(),
        );
        registry.register(
            "label_sets_folded",
            "Label sets counted under \"other\" because their metric reached --max-series",
            folds.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                kernel,
            })
            .set(1);
        // Both kinds exist from the start, so a query sees 0 rather than nothing.
        for kind in ["sampled", "lost"] {
            let _ = unsent.get_or_create(&UnsentLabels { kind });
        }
        let metrics = Metrics {
            drops: BoundedFamily::new(drops, max_series, folds.clone()),
            bytes: BoundedFamily::new(bytes, max_series, folds),
            unsent,
            events_lost,
            suppressed,
            probes,
            changes,
            stall_max,
            stalls,
            seen_lost: 0,
            seen_suppressed: 0,
            health,
        };
        (metrics, registry)
    }

    /// Brings the cumulative kernel totals up to date.
    fn totals(&mut self, lost: u64, suppressed: u64) {
        self.events_lost
            .inc_by(lost.saturating_sub(std::mem::replace(&mut self.seen_lost, lost)));
        self.suppressed.inc_by(
            suppressed.saturating_sub(std::mem::replace(&mut self.seen_suppressed, suppressed)),
        );
    }
}

/// The pod of a drop, as (namespace, name) labels; empty when the drop is no pod's (Prometheus
/// treats an empty label as absent).
fn pod_labels(record: &DropRecord) -> (String, String) {
    record
        .drop
        .pod
        .as_ref()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .unwrap_or_default()
}

impl Sink for Metrics {
    fn attach(&mut self, info: &AttachInfo) {
        for p in &info.probes {
            self.probes
                .get_or_create(&ProbeLabels {
                    probe: p.probe,
                    mode: p.mode,
                })
                .set(1);
        }
        self.health.set_ready(true);
    }

    fn drop(&mut self, record: &DropRecord) {
        let (pod_namespace, pod) = pod_labels(record);
        let cause = record.verdict.cause.clone();
        let iface = record
            .drop
            .dev
            .map(|d| d.name().to_string())
            .unwrap_or_default();
        let bytes = ByteLabels {
            cause: cause.clone(),
            iface: iface.clone(),
            pod_namespace: pod_namespace.clone(),
            pod: pod.clone(),
        };
        self.bytes.inc_by(bytes, record.bytes);
        let reason = record.drop.reason.to_string();
        self.drops.inc_by(
            DropLabels {
                cause,
                reason,
                iface,
                pod_namespace,
                pod,
            },
            record.count,
        );
        if let Some(kind) = record.unsent {
            self.unsent
                .get_or_create(&UnsentLabels { kind })
                .inc_by(record.count);
        }
    }

    fn change(&mut self, record: &ChangeRecord) {
        self.changes
            .get_or_create(&ChangeLabels {
                kind: record.change.kind.as_str(),
            })
            .inc();
    }

    fn tick(&mut self, progress: &Progress) {
        self.totals(progress.lost, progress.suppressed);
        self.stall_max.set(progress.stalls.max.as_secs_f64());
        self.stalls.inc_by(
            progress
                .stalls
                .long
                .saturating_sub(self.stalls.get()),
        );
        self.health.beat();
    }

    fn summary(&mut self, summary: &Summary) {
        self.totals(summary.lost, summary.suppressed);
        self.health.set_ready(false);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::kernel::attach::Attached;

    fn value(registry: &Registry, series: &str) -> Option<u64> {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn health_is_lost_when_the_loop_stops_ticking() {
        let h = Health::new(Duration::from_millis(200));
        assert_eq!(h.stale_after(), STALE_FLOOR, "at least the floor");
        assert_eq!(
            Health::new(Duration::from_secs(2)).stale_after(),
            Duration::from_secs(20),
            "ten ticks"
        );
        let t0 = h.epoch;
        // Attaching: no tick yet, however long it takes.
        assert_eq!(h.alive_at(t0 + Duration::from_secs(600)), Ok(()));
        h.beat_at(t0 + Duration::from_secs(1));
        assert_eq!(h.alive_at(t0 + Duration::from_secs(5)), Ok(()));
        assert_eq!(
            h.alive_at(t0 + Duration::from_secs(7)),
            Err(Duration::from_secs(6))
        );
        // Ticking again: alive again.
        h.beat_at(t0 + Duration::from_secs(8));
        assert_eq!(h.alive_at(t0 + Duration::from_secs(9)), Ok(()));
    }

    #[test]
    fn drops_of_a_pod_carry_its_namespace_and_name() {
        let (mut m, registry) = Metrics::new(10, "6.18".into(), Arc::new(Health::default()));
        let mut r = DropRecord::example("no_listener", 4, None);
        r.drop.pod = Some(Arc::new(crate::pods::PodRef {
            namespace: "shop".into(),
            name: "db-0".into(),
            uid: "u-1".into(),
            container: Some("postgres".into()),
        }));
        m.drop(&r);
        m.drop(&DropRecord::example("no_listener", 1, None));
        let series = |ns: &str, pod: &str| {
            format!(
                r#"dropscope_drops_total{{cause="no_listener",reason="NETFILTER_DROP",iface="r0",pod_namespace="{ns}",pod="{pod}"}}"#
            )
        };
        assert_eq!(value(&registry, &series("shop", "db-0")), Some(4));
        assert_eq!(
            value(&registry, &series("", "")),
            Some(1),
            "no pod: empty labels"
        );
    }

    #[test]
    fn counters_add_up_every_record_and_follow_the_kernel_totals() {
        let health = Arc::new(Health::default());
        let (mut m, registry) = Metrics::new(10, "6.18".into(), health.clone());
        assert!(!health.is_ready());
        m.attach(&AttachInfo {
            probes: vec![Attached {
                probe: "kfree_skb",
                mode: "tp_btf",
                note: None,
            }],
            attach_ms: 1,
            kernel: "6.18".into(),
            reasons: 1,
            ..Default::default()
        });
        assert!(health.is_ready());
        m.drop(&DropRecord::example("netfilter_drop", 1, None));
        m.drop(&DropRecord::example("netfilter_drop", 10, Some("sampled")));
        let causes = std::collections::HashMap::new();
        m.tick(&Progress {
            causes: &causes,
            seconds: 1.0,
            lost: 3,
            suppressed: 2,
            stalls: Default::default(),
        });
        m.tick(&Progress {
            causes: &causes,
            seconds: 1.0,
            lost: 3,
            suppressed: 5,
            stalls: Default::default(),
        });
        let drops = r#"dropscope_drops_total{cause="netfilter_drop",reason="NETFILTER_DROP",iface="r0",pod_namespace="",pod=""}"#;
        assert_eq!(value(&registry, drops), Some(11));
        let bytes = r#"dropscope_drop_bytes_total{cause="netfilter_drop",iface="r0",pod_namespace="",pod=""}"#;
        assert_eq!(value(&registry, bytes), Some(660));
        assert_eq!(
            value(&registry, r#"dropscope_drops_unsent_total{kind="sampled"}"#),
            Some(10)
        );
        assert_eq!(
            value(&registry, r#"dropscope_drops_unsent_total{kind="lost"}"#),
            Some(0)
        );
        assert_eq!(value(&registry, "dropscope_events_lost_total"), Some(3));
        assert_eq!(
            value(&registry, "dropscope_drops_suppressed_total"),
            Some(5)
        );
        assert_eq!(
            value(
                &registry,
                r#"dropscope_probe_info{probe="kfree_skb",mode="tp_btf"}"#
            ),
            Some(1)
        );
        let build = format!(
            r#"dropscope_build_info{{version="{}",kernel="6.18"}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&registry, &build), Some(1));
        m.summary(&Summary {
            lost: 4,
            suppressed: 5,
            ..Default::default()
        });
        assert_eq!(value(&registry, "dropscope_events_lost_total"), Some(4));
        assert!(!health.is_ready(), "not ready once detached");
    }
}
