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
}
