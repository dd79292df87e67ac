//! The kernel's own SNMP counters of a namespace (`nstat`'s sources: /proc/net/snmp,
//! /proc/net/netstat, /proc/net/snmp6), as what moved in the last seconds: independent
//! corroboration of a drop ("IpReasmTimeout +2", "Icmp6OutPktTooBigs +3").
use std::{
    collections::HashMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use crate::netns::in_namespace;

/// Counters that grew since the previous look at the same namespace, named as `nstat` names
/// them ("IpReasmTimeout", "IpExtReasmOverlaps", "Icmp6OutPktTooBigs").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub moved: Vec<(String, u64)>,
}

impl Counters {
    /// The counters that count trouble (errors, failures, timeouts, discards, ICMP errors
    /// sent or received), not traffic.
    pub fn trouble(&self) -> Vec<(String, u64)> {
        self.moved
            .iter()
            .filter(|(n, _)| is_trouble(n))
            .cloned()
            .collect()
    }
}

/// Whether a counter name counts trouble rather than traffic.
pub fn is_trouble(name: &str) -> bool {
    const WORDS: [&str; 16] = [
        "Overflow",
        "Drop",
        "Fail",
        "Err",
        "Timeout",
        "Overlap",
        "Discard",
        "NoRoute",
        "TooBig",
        "Unreach",
        "TimeExcd",
        "ParmProb",
        "Redirect",
        "Csum",
        "Truncated",
        "Unknown",
    ];
    WORDS.iter().any(|w| name.contains(w)) && !name.contains("Type")
}

/// Counter families worth carrying: IP, ICMP and fragments, and TCP's extended counters
/// (listen queue overflows and the like).
const KEPT: [&str; 6] = ["Ip", "IpExt", "Icmp", "Ip6", "Icmp6", "TcpExt"];

/// Last values per namespace (the first look at a namespace is its baseline) and what
/// moved in the last [`HISTORY`]: a drop is corroborated by a counter that moved recently,
/// even when the look that saw it was taken for another drop.
#[derive(Default)]
pub struct Tracker {
    last: HashMap<u32, HashMap<String, u64>>,
    history: HashMap<u32, Vec<(Instant, String, u64)>>,
}

/// How long a counter movement corroborates drops.
const HISTORY: Duration = Duration::from_secs(10);

/// Namespaces remembered at once (a look at a new one beyond this forgets the others).
const MAX_NAMESPACES: usize = 1024;

impl Tracker {
    /// Reads the namespace's counters and returns those that moved in the last
    /// [`HISTORY`], summed. The first look has nothing to compare with: it reports nothing.
    pub fn moved(&mut self, netns: u32, ns: Option<&Path>) -> Counters {
        let Some(now) = in_namespace(ns, read) else {
            return Counters::default();
        };
        if self.last.len() >= MAX_NAMESPACES && !self.last.contains_key(&netns) {
            self.last.clear();
            self.history.clear();
        }
        let before = self.last.insert(netns, now.clone());
        let at = Instant::now();
        let history = self.history.entry(netns).or_default();
        if let Some(before) = before {
            history.extend(now.into_iter().filter_map(|(k, v)| {
                let was = before.get(&k).copied().unwrap_or(0);
                (v > was).then(|| (at, k, v - was))
            }));
        }
        history.retain(|(t, _, _)| t.elapsed() < HISTORY);
        let mut sums: HashMap<&str, u64> = HashMap::new();
        for (_, k, v) in history.iter() {
            *sums.entry(k.as_str()).or_default() += v;
        }
        let mut moved: Vec<(String, u64)> =
            sums.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        moved.sort();
        Counters { moved }
    }

    /// Forgets a namespace that is gone (its inode may come back as another namespace).
    pub fn forget(&mut self, netns: u32) {
        self.last.remove(&netns);
        self.history.remove(&netns);
    }

    /// Takes the first look at a namespace (so the next look reports what moved after it).
    pub fn baseline(&mut self, netns: u32, ns: Option<&Path>) {
        if let Some(now) = in_namespace(ns, read) {
            self.last.insert(netns, now);
        }
    }
}

/// The calling thread's namespace's counters.
fn read() -> HashMap<String, u64> {
    let mut all = HashMap::new();
    for file in [
        "/proc/thread-self/net/snmp",
        "/proc/thread-self/net/netstat",
    ] {
        if let Ok(text) = fs::read_to_string(file) {
            parse_tables(&text, &mut all);
        }
    }
    if let Ok(text) = fs::read_to_string("/proc/thread-self/net/snmp6") {
        parse_lines(&text, &mut all);
    }
    all
}

/// `/proc/net/snmp` and `netstat`: pairs of lines "Prefix: names..." / "Prefix: values...".
/// Names are prefixed like nstat does ("Ip" + "ReasmTimeout"); only [`KEPT`] families.
pub fn parse_tables(text: &str, into: &mut HashMap<String, u64>) {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((prefix, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if !KEPT.contains(&prefix) {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse::<u64>() {
                into.insert(format!("{prefix}{n}"), v);
            }
        }
    }
}

/// `/proc/net/snmp6`: one "Name value" per line.
pub fn parse_lines(text: &str, into: &mut HashMap<String, u64>) {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(n), Some(v)) = (it.next(), it.next()) {
            if KEPT.iter().any(|p| n.starts_with(p)) && !n.starts_with("Icmp6InType") {
                if let Ok(v) = v.parse::<u64>() {
                    into.insert(n.to_string(), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_layouts_with_nstat_names() {
        let mut all = HashMap::new();
        parse_tables(
            "Ip: Forwarding DefaultTTL ReasmTimeout\nIp: 1 64 3\nTcp: RtoAlgorithm\nTcp: 1\n\
             IpExt: InNoRoutes ReasmOverlaps\nIpExt: 0 2\n",
            &mut all,
        );
        parse_lines(
            "Ip6ReasmFails  \t4\nIcmp6OutPktTooBigs\t7\nUdp6InErrors 1\n",
            &mut all,
        );
        assert_eq!(all.get("IpReasmTimeout"), Some(&3));
        assert_eq!(all.get("IpExtReasmOverlaps"), Some(&2));
        assert_eq!(all.get("Ip6ReasmFails"), Some(&4));
        assert_eq!(all.get("Icmp6OutPktTooBigs"), Some(&7));
        assert!(
            !all.contains_key("TcpRtoAlgorithm"),
            "plain TCP is not kept"
        );
        assert!(!all.contains_key("Udp6InErrors"));
        let c = Counters {
            moved: vec![
                ("IpReasmTimeout".into(), 1),
                ("IpInReceives".into(), 9),
                ("Icmp6OutPktTooBigs".into(), 2),
                ("Icmp6OutType2".into(), 2),
            ],
        };
        assert_eq!(
            c.trouble(),
            vec![
                ("IpReasmTimeout".into(), 1),
                ("Icmp6OutPktTooBigs".into(), 2)
            ]
        );
    }

    #[test]
    fn reports_what_moved_since_the_last_look() {
        let mut t = Tracker::default();
        assert_eq!(
            t.moved(1, None),
            Counters::default(),
            "first look: baseline"
        );
        // Our own namespace's counters can only grow; a second look reports the growth.
        let c = t.moved(1, None);
        assert!(c.moved.iter().all(|(_, v)| *v > 0));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const SNMP: &str = include_str!("../../testdata/snmp.txt");
        const NETSTAT: &str = include_str!("../../testdata/netstat.txt");
        const SNMP6: &str = include_str!("../../testdata/snmp6.txt");

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text()) {
                let mut all = HashMap::new();
                parse_tables(&text, &mut all);
                parse_lines(&text, &mut all);
                Counters { moved: all.into_iter().collect() }.trouble();
            }

            #[test]
            fn prop_mutated_real_files_never_panic(
                a in fuzz::mutated(SNMP),
                b in fuzz::mutated(NETSTAT),
                c in fuzz::mutated(SNMP6),
            ) {
                let mut all = HashMap::new();
                parse_tables(&a, &mut all);
                parse_tables(&b, &mut all);
                parse_lines(&c, &mut all);
            }

            #[test]
            fn prop_values_read_back_under_their_nstat_names(
                values in prop::collection::vec(any::<u64>(), 1..200),
            ) {
                // The real files with every number replaced: each kept counter reads back.
                let mut i = 0;
                let mut next = || { i += 1; values[i % values.len()] };
                let mut want = HashMap::new();
                let mut tables = String::new();
                for text in [SNMP, NETSTAT] {
                    let lines: Vec<&str> = text.lines().collect();
                    for pair in lines.chunks(2) {
                        let (prefix, names) = pair[0].split_once(':').unwrap();
                        let vals: Vec<u64> = names.split_whitespace().map(|_| next()).collect();
                        let words: Vec<String> = vals.iter().map(u64::to_string).collect();
                        tables.push_str(&format!("{}\n{prefix}: {}\n", pair[0], words.join(" ")));
                        if KEPT.contains(&prefix) {
                            for (n, v) in names.split_whitespace().zip(vals) {
                                want.insert(format!("{prefix}{n}"), v);
                            }
                        }
                    }
                }
                let mut lines6 = String::new();
                for line in SNMP6.lines() {
                    let name = line.split_whitespace().next().unwrap();
                    let v = next();
                    lines6.push_str(&format!("{name}\t{v}\n"));
                    if KEPT.iter().any(|p| name.starts_with(p)) && !name.starts_with("Icmp6InType") {
                        want.insert(name.to_string(), v);
                    }
                }
                let mut all = HashMap::new();
                parse_tables(&tables, &mut all);
                parse_lines(&lines6, &mut all);
                prop_assert_eq!(all, want);
            }
        }
    }
}
