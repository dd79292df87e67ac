//! The cardinality bound: a counter family that admits at most `max` label sets and counts
//! drops of any later label set in its folded form (free labels "other", the cause kept).
//!
//! The first label sets win, rather than the busiest: a Prometheus counter cannot move from one
//! series to another without looking like a reset, so a series, once exposed, stays.
use std::{
    collections::HashSet,
    hash::{BuildHasher, Hash},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

/// Folded label sets remembered to count each once in `dropscope_label_sets_folded_total`;
/// past this many the memory starts over, and a folded set may be counted again.
const FOLDED_MEMORY: usize = 65_536;

/// A label set that can be folded into the bounded "other" series.
pub trait Fold {
    /// The label set with every free label replaced by "other".
    fn folded(&self) -> Self;
}

/// A counter family with at most `max` admitted label sets (plus their folded forms).
pub struct BoundedFamily<L> {
    family: Family<L, Counter>,
    admitted: HashSet<L>,
    max: usize,
    folded: HashSet<u64>,
    /// Label sets folded so far, shared by every bounded family.
    folds: Counter,
}

impl<L: Fold + EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static>
    BoundedFamily<L>
{
    /// `family` is the registered metric; `folds` counts the label sets folded away.
    pub fn new(family: Family<L, Counter>, max: usize, folds: Counter) -> Self {
        BoundedFamily {
            family,
            admitted: HashSet::new(),
            max,
            folded: HashSet::new(),
            folds,
        }
    }

    /// Adds `n` under `labels`, or under their folded form once `max` label sets exist.
    pub fn inc_by(&mut self, labels: L, n: u64) {
        if self.admitted.contains(&labels) || self.admitted.len() < self.max {
            self.family.get_or_create(&labels).inc_by(n);
            self.admitted.insert(labels);
            return;
        }
        if self.folded.len() >= FOLDED_MEMORY {
            self.folded.clear();
        }
        if self.folded.insert(self.folded.hasher().hash_one(&labels)) {
            self.folds.inc();
        }
        self.family.get_or_create(&labels.folded()).inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        cause: String,
        iface: String,
    }

    impl Fold for Labels {
        fn folded(&self) -> Self {
            Labels {
                cause: self.cause.clone(),
                iface: "other".into(),
            }
        }
    }

    fn labels(cause: &str, iface: &str) -> Labels {
        Labels {
            cause: cause.into(),
            iface: iface.into(),
        }
    }

    #[test]
    fn label_sets_beyond_the_bound_fold_into_other_keeping_the_cause() {
        let (family, folds) = (Family::<Labels, Counter>::default(), Counter::default());
        let mut registry = Registry::default();
        registry.register("t_drops", "drops", family.clone());
        let mut bounded = BoundedFamily::new(family, 2, folds.clone());
        bounded.inc_by(labels("rp_filter", "eth0"), 5);
        bounded.inc_by(labels("rp_filter", "eth1"), 1);
        // Full: new label sets fold, admitted ones keep counting under their own labels.
        bounded.inc_by(labels("rp_filter", "eth2"), 3);
        bounded.inc_by(labels("no_route", "eth3"), 4);
        bounded.inc_by(labels("rp_filter", "eth2"), 2);
        bounded.inc_by(labels("rp_filter", "eth0"), 1);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let mut series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("t_drops_total"))
            .collect();
        series.sort();
        assert_eq!(
            series,
            [
                r#"t_drops_total{cause="no_route",iface="other"} 4"#,
                r#"t_drops_total{cause="rp_filter",iface="eth0"} 6"#,
                r#"t_drops_total{cause="rp_filter",iface="eth1"} 1"#,
                r#"t_drops_total{cause="rp_filter",iface="other"} 5"#,
            ]
        );
        // eth2 and eth3 were folded, eth2 counted once although it came twice.
        assert_eq!(folds.get(), 2);
    }
}
