//! Conntrack state of a namespace: table fill and the kernel's own drop counters
//! (`/proc/net/stat/nf_conntrack`, what `conntrack -S` prints).
use std::fs;

/// Conntrack counters, summed over CPUs, with the table's fill level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtStats {
    pub drop: u64,
    pub insert_failed: u64,
    pub invalid: u64,
    pub count: Option<u64>,
    pub max: Option<u64>,
}

impl CtStats {
    /// Reads the calling thread's namespace (call from inside `netns::run_in`).
    pub fn read() -> Option<Self> {
        let text = fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").ok()?;
        let mut stats = parse(&text)?;
        let num = |p: &str| {
            fs::read_to_string(p)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        };
        stats.count = num("/proc/sys/net/netfilter/nf_conntrack_count");
        stats.max = num("/proc/sys/net/netfilter/nf_conntrack_max");
        Some(stats)
    }

    /// What changed since `before`: counters as deltas, fill level as now.
    pub fn since(&self, before: &CtStats) -> CtStats {
        CtStats {
            drop: self.drop.saturating_sub(before.drop),
            insert_failed: self.insert_failed.saturating_sub(before.insert_failed),
            invalid: self.invalid.saturating_sub(before.invalid),
            ..*self
        }
    }
}

/// Parses the stat file: a header of column names, then one row of hex numbers per CPU.
pub fn parse(text: &str) -> Option<CtStats> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (drop, failed, invalid) = (col("drop")?, col("insert_failed")?, col("invalid")?);
    let mut s = CtStats::default();
    for row in lines {
        let v: Vec<u64> = row
            .split_whitespace()
            .filter_map(|x| u64::from_str_radix(x, 16).ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        s.drop = s.drop.saturating_add(at(drop));
        s.insert_failed = s.insert_failed.saturating_add(at(failed));
        s.invalid = s.invalid.saturating_add(at(invalid));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_columns_over_cpus() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
00000003  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000001 0000000a 00000000 00000000  00000000 00000000 00000000 00000000\n\
00000003  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000002 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = parse(text).unwrap();
        assert_eq!((s.drop, s.insert_failed, s.invalid), (12, 1, 3));
        let later = CtStats { drop: 15, ..s };
        assert_eq!(later.since(&s).drop, 3);
    }

    #[test]
    fn huge_per_cpu_counts_saturate() {
        // Two CPUs at u64::MAX overflowed the sum (a panic in debug builds).
        let text = "entries invalid insert_failed drop\n\
                    0 ffffffffffffffff 0 ffffffffffffffff\n\
                    0 ffffffffffffffff 0 1\n";
        let s = parse(text).unwrap();
        assert_eq!((s.drop, s.invalid), (u64::MAX, u64::MAX));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const SAMPLE: &str = include_str!("../../testdata/nf_conntrack.txt");

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text(), m in fuzz::mutated(SAMPLE)) {
                parse(&text);
                parse(&m);
                // Any header with the three columns and garbage rows.
                parse(&format!("drop insert_failed invalid\n{text}"));
            }

            #[test]
            fn prop_columns_sum_over_cpus(
                rows in prop::collection::vec(prop::collection::vec(any::<u32>(), 17), 0..64),
            ) {
                let header = SAMPLE.lines().next().unwrap();
                let mut text = format!("{header}\n");
                for row in &rows {
                    let hex: Vec<String> = row.iter().map(|v| format!("{v:08x}")).collect();
                    text.push_str(&hex.join(" "));
                    text.push('\n');
                }
                let col = |name: &str| header.split_whitespace().position(|h| h == name).unwrap();
                let sum = |c: usize| rows.iter().map(|r| u64::from(r[c])).sum::<u64>();
                let s = parse(&text).unwrap();
                prop_assert_eq!(
                    (s.drop, s.insert_failed, s.invalid),
                    (sum(col("drop")), sum(col("insert_failed")), sum(col("invalid")))
                );
            }
        }
    }
}
