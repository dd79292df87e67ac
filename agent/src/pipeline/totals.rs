//! Per-cause totals for the summary and the metrics, bounded per cause.
use std::{collections::HashMap, sync::Arc};

use super::Pipeline;
use crate::{
    causes::Verdict,
    changes::Change,
    events::{Device, DropEvent, Flow},
    pods::PodRef,
};

/// Per-cause totals for the summary.
#[derive(Debug, Clone, Default)]
pub struct CauseTotals {
    pub count: u64,
    pub title: String,
    pub reasons: HashMap<Arc<str>, u64>,
    pub locations: HashMap<Arc<str>, u64>,
    pub ifaces: HashMap<Device, u64>,
    pub flows: HashMap<Flow, u64>,
    pub pods: HashMap<Arc<PodRef>, u64>,
    /// Drops per distinct explanation (keyed by evidence text).
    pub verdicts: HashMap<String, (Arc<Verdict>, u64)>,
    /// Configuration changes named in the evidence of this cause's drops.
    pub changes: Vec<Arc<Change>>,
}

/// Changes named per cause in the summary, at most.
const MAX_CHANGES_PER_CAUSE: usize = 5;

impl CauseTotals {
    /// Drops per pod, as `namespace/name`.
    pub fn pod_counts(&self) -> HashMap<String, u64> {
        let mut by_name = HashMap::new();
        for (pod, n) in &self.pods {
            *by_name
                .entry(format!("{}/{}", pod.namespace, pod.name))
                .or_default() += n;
        }
        by_name
    }

    /// The explanation of the most drops, and the share of the cause's drops it covers.
    pub fn representative(&self) -> Option<(&Verdict, f64)> {
        let (v, n) = self
            .verdicts
            .values()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.evidence.cmp(&a.0.evidence)))?;
        Some((v, *n as f64 / self.count.max(1) as f64))
    }
}

/// Distinct flows (and pods) remembered per cause for the summary.
const MAX_FLOWS_PER_CAUSE: usize = 1024;

/// Distinct explanations (evidence texts) remembered per cause for the summary.
const MAX_VERDICTS_PER_CAUSE: usize = 256;

impl Pipeline {
    pub(super) fn count(&mut self, v: &Arc<Verdict>, d: &DropEvent) {
        self.count_n(v, d, 1);
    }

    /// Adds `n` drops like `d` to the totals.
    pub(super) fn count_n(&mut self, v: &Arc<Verdict>, d: &DropEvent, n: u64) {
        if v.benign && !self.show_benign {
            self.suppressed += n;
            match self.hidden.get_mut(v.cause.as_str()) {
                Some(c) => *c += n,
                None => {
                    self.hidden.insert(v.cause.clone(), n);
                }
            }
            return;
        }
        *self.reasons.entry(d.reason.clone()).or_default() += n;
        // Hot path: no allocation once a cause, flow and device have been seen.
        if !self.causes.contains_key(v.cause.as_str()) {
            let fresh = CauseTotals {
                title: v.title.clone(),
                ..Default::default()
            };
            self.causes.insert(v.cause.clone(), fresh);
        }
        let t = self
            .causes
            .get_mut(v.cause.as_str())
            .expect("inserted above");
        t.count += n;
        if let Some(c) = &v.attribution.change {
            if t.changes.len() < MAX_CHANGES_PER_CAUSE
                && !t.changes.iter().any(|x| Arc::ptr_eq(x, c))
            {
                t.changes.push(c.clone());
            }
        }
        let room = t.verdicts.len() < MAX_VERDICTS_PER_CAUSE;
        match t.verdicts.get_mut(v.evidence.as_str()) {
            Some(e) => e.1 += n,
            None if room => {
                t.verdicts.insert(v.evidence.clone(), (v.clone(), n));
            }
            None => {}
        }
        *t.reasons.entry(d.reason.clone()).or_default() += n;
        *t.locations.entry(d.location.clone()).or_default() += n;
        if let Some(dev) = d.dev {
            *t.ifaces.entry(dev).or_default() += n;
        }
        if let Some(flow) = d.flow {
            if t.flows.len() < MAX_FLOWS_PER_CAUSE || t.flows.contains_key(&flow) {
                *t.flows.entry(flow).or_default() += n;
            }
        }
        if let Some(pod) = &d.pod {
            if t.pods.len() < MAX_FLOWS_PER_CAUSE || t.pods.contains_key(pod) {
                *t.pods.entry(pod.clone()).or_default() += n;
            }
        }
    }
}
