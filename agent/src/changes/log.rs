//! The changes seen since dropscope attached, per namespace, and the join with drops: the
//! latest change, before a drop and in its namespace, to a setting its cause depends on.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::Change;

/// Changes remembered per namespace, and namespaces at most.
const PER_NETNS: usize = 256;
const MAX_NAMESPACES: usize = 4096;

/// Recent changes by namespace.
#[derive(Debug, Default)]
pub struct ChangeLog {
    by_netns: HashMap<u32, VecDeque<Arc<Change>>>,
    /// Monotonic time dropscope started watching: earlier changes are unknown.
    pub since_ns: u64,
}

impl ChangeLog {
    pub fn new(since_ns: u64) -> Self {
        ChangeLog {
            by_netns: HashMap::new(),
            since_ns,
        }
    }

    pub fn push(&mut self, change: Arc<Change>) {
        if self.by_netns.len() >= MAX_NAMESPACES && !self.by_netns.contains_key(&change.netns) {
            // Forget the namespace whose latest change is oldest.
            if let Some(oldest) = self
                .by_netns
                .iter()
                .min_by_key(|(_, q)| q.back().map_or(0, |c| c.ts_ns))
                .map(|(n, _)| *n)
            {
                self.by_netns.remove(&oldest);
            }
        }
        let q = self.by_netns.entry(change.netns).or_default();
        if q.len() >= PER_NETNS {
            q.pop_front();
        }
        q.push_back(change);
    }

    /// The latest change in `netns` at or before `ts_ns` whose key matches one of `patterns`
    /// (a `*` matches any run of characters).
    pub fn latest(&self, netns: u32, patterns: &[String], ts_ns: u64) -> Option<Arc<Change>> {
        self.by_netns
            .get(&netns)?
            .iter()
            .rev()
            .filter(|c| c.ts_ns <= ts_ns)
            .find(|c| patterns.iter().any(|p| c.matches(p)))
            .cloned()
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text.ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::ChangeKind;

    fn change(netns: u32, ts: u64, key: &str) -> Arc<Change> {
        Arc::new(Change::example(netns, ts, ChangeKind::Sysctl, key))
    }

    #[test]
    fn globs() {
        assert!(glob("nftables.*", "nftables.inet drt"));
        assert!(glob("net.ipv4.conf.*.forwarding", "net.ipv4.conf.r0.forwarding"));
        assert!(!glob("net.ipv4.conf.*.forwarding", "net.ipv4.conf.r0.rp_filter"));
        assert!(glob("link.r1.mtu", "link.r1.mtu"));
        assert!(!glob("link.r1.mtu", "link.r10.mtu"));
    }

    #[test]
    fn the_latest_matching_change_before_the_drop_in_its_namespace() {
        let mut log = ChangeLog::new(0);
        log.push(change(1, 10, "net.ipv4.conf.all.forwarding"));
        log.push(change(1, 20, "net.ipv4.conf.r0.rp_filter"));
        log.push(change(2, 30, "net.ipv4.conf.all.forwarding"));
        log.push(change(1, 50, "net.ipv4.conf.all.forwarding"));
        let fwd = vec!["net.ipv4.conf.all.forwarding".to_string()];
        assert_eq!(log.latest(1, &fwd, 40).unwrap().ts_ns, 10, "before the drop");
        assert_eq!(log.latest(1, &fwd, 60).unwrap().ts_ns, 50);
        assert!(log.latest(3, &fwd, 60).is_none(), "another namespace is never blamed");
        let rp = vec!["net.ipv4.conf.r1.rp_filter".to_string()];
        assert!(log.latest(1, &rp, 60).is_none(), "another device is never blamed");
    }

    #[test]
    fn a_key_with_multibyte_characters_is_not_cut_inside_one() {
        // "x*b": the end of "xé" was sliced inside 'é' before checking it ends with "b".
        assert!(!glob("x*b", "xé"));
        assert!(!glob("*\0", "é"));
        assert!(!glob(
            "net.ipv4.conf.*.rp_filter",
            "net.ipv4.conf.éé.forwardi"
        ));
        assert!(glob("link.*.mtu", "link.é.mtu"));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_pattern_and_key_never_panic(
                pattern in prop::collection::vec(prop_oneof![Just("*".to_string()), fuzz::junk()], 0..5),
                text in fuzz::text(),
            ) {
                glob(&pattern.concat(), &text);
            }

            #[test]
            fn prop_a_key_matches_the_patterns_made_from_it(
                parts in prop::collection::vec(any::<String>(), 1..5),
                stars in any::<prop::sample::Index>(),
            ) {
                let key = parts.concat();
                prop_assert!(glob(&key, &key));
                prop_assert!(glob("*", &key));
                // Any part replaced by '*' still matches.
                let mut pattern = parts.clone();
                pattern[stars.index(parts.len())] = "*".into();
                prop_assert!(glob(&pattern.concat(), &key), "{:?}", pattern);
            }
        }
    }
}
