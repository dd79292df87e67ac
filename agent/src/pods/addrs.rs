//! The addresses configured in a process's network namespace, read from its `/proc/PID/net`
//! files (which show that namespace's view without entering it): local IPv4 addresses from
//! `fib_trie`, IPv6 from `if_inet6`. Loopback and link-local addresses are left out: every
//! namespace has the same ones.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// The routable addresses of the netns process `pid` lives in.
pub fn of_process(pid: u32) -> Vec<IpAddr> {
    let read =
        |file: &str| fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
    let v4 = parse_fib_trie(&read("fib_trie"))
        .into_iter()
        .map(IpAddr::V4);
    let v6 = parse_if_inet6(&read("if_inet6"))
        .into_iter()
        .map(IpAddr::V6);
    v4.chain(v6).collect()
}

/// Local addresses in `fib_trie` text: a leaf (`|-- 10.1.2.3`) followed by `/32 host LOCAL`.
pub fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim_start_matches(|c: char| c.is_whitespace() || c == '|' || c == '+');
        if let Some(addr) = line.strip_prefix("-- ") {
            leaf = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(a) =
                leaf.filter(|a| !a.is_loopback() && !a.is_link_local() && !found.contains(a))
            {
                found.push(a);
            }
        }
    }
    found
}

/// Global-scope addresses in `if_inet6` text (`<32 hex digits> ifindex plen scope flags name`).
pub fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let hex = words.next()?;
            let scope = words.nth(2)?;
            let addr = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
            (scope == "00" && !addr.is_loopback()).then_some(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_trie_local_addresses() {
        let text = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.7
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     |-- 169.254.1.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.244.1.7
           /32 host LOCAL
";
        assert_eq!(
            parse_fib_trie(text),
            vec!["10.244.1.7".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(parse_fib_trie("").is_empty());
    }

    #[test]
    fn if_inet6_global_addresses() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000a8c1abfffe2c3d4e 02 40 20 80     eth0
fd000231000200000000000000000002 02 40 00 80     eth0
";
        assert_eq!(
            parse_if_inet6(text),
            vec!["fd00:231:2::2".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn reads_this_process_namespace() {
        // Whatever this machine has, loopback is never among them.
        assert!(of_process(std::process::id())
            .iter()
            .all(|a| !a.is_loopback()));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const FIB_TRIE: &str = include_str!("../../testdata/fib_trie.txt");
        const IF_INET6: &str = include_str!("../../testdata/if_inet6.txt");

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(
                text in fuzz::text(),
                a in fuzz::mutated(FIB_TRIE),
                b in fuzz::mutated(IF_INET6),
            ) {
                for t in [&text, &a, &b] {
                    parse_fib_trie(t);
                    parse_if_inet6(t);
                }
            }

            #[test]
            fn prop_global_addresses_read_back(
                addrs in prop::collection::vec((any::<u128>(), prop::sample::select(&["00", "20", "10", "fd"][..])), 0..10),
            ) {
                let text: String = addrs
                    .iter()
                    .enumerate()
                    .map(|(i, (a, scope))| format!("{a:032x} {:02x} 40 {scope} 80 eth{i}\n", i + 1))
                    .collect();
                let want: Vec<Ipv6Addr> = addrs
                    .iter()
                    .map(|(a, s)| (Ipv6Addr::from(*a), *s))
                    .filter(|(a, s)| *s == "00" && !a.is_loopback())
                    .map(|(a, _)| a)
                    .collect();
                prop_assert_eq!(parse_if_inet6(&text), want);
            }

            #[test]
            fn prop_local_leaves_read_back(addrs in prop::collection::btree_set(any::<[u8; 4]>(), 0..10)) {
                let mut text = "Local:\n  +-- 0.0.0.0/0 3 0 5\n".to_string();
                for a in &addrs {
                    let a = Ipv4Addr::from(*a);
                    text.push_str(&format!("     |-- {a}\n        /32 host LOCAL\n     |-- {a}\n        /32 link BROADCAST\n"));
                }
                let want: Vec<Ipv4Addr> = addrs
                    .iter()
                    .map(|a| Ipv4Addr::from(*a))
                    .filter(|a| !a.is_loopback() && !a.is_link_local())
                    .collect();
                prop_assert_eq!(parse_fib_trie(&text), want);
            }
        }
    }
}
