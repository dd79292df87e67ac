//! Routing state of a namespace: the route that matches a destination, whether the namespace
//! looks like an end host (one interface) or a router, and unresolved neighbours.
use std::{fs, net::IpAddr, path::Path, process::Command};

use ipnet::IpNet;

use super::netns::run_in;

/// The most specific route for `dst` in the namespace at `ns` (`None`: dropscope's own), as
/// `ip route` prints it (e.g. "unreachable 10.231.66.0/24"), and the count of non-loopback
/// interfaces there.
pub fn lookup(ns: Option<&Path>, dst: Option<IpAddr>) -> (Option<String>, Option<usize>) {
    let read = move || {
        let route = dst.and_then(|d| {
            let family = if d.is_ipv4() { "-4" } else { "-6" };
            let out = Command::new("ip")
                .args([family, "-o", "route", "show", "match", &d.to_string()])
                .output()
                .ok()?;
            best_match(&String::from_utf8_lossy(&out.stdout), d)
        });
        let ifaces = fs::read_to_string("/proc/thread-self/net/dev")
            .ok()
            .map(|t| count_interfaces(&t));
        (route, ifaces)
    };
    match ns {
        Some(path) => run_in(path, read).unwrap_or((None, None)),
        None => read(),
    }
}

/// Neighbour entries on `dev` that are not resolved (INCOMPLETE, FAILED), as "ADDR STATE",
/// the one for `dst` first when it is among them.
pub fn unresolved_neighbours(ns: Option<&Path>, dev: String, dst: Option<IpAddr>) -> Vec<String> {
    let read = move || {
        let out = Command::new("ip")
            .args(["-j", "neigh", "show", "dev", &dev])
            .output()
            .ok();
        let json: serde_json::Value = out
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        parse_unresolved(&json, dst)
    };
    match ns {
        Some(path) => run_in(path, read).unwrap_or_default(),
        None => read(),
    }
}

/// Picks unresolved entries out of `ip -j neigh show` output.
pub fn parse_unresolved(json: &serde_json::Value, dst: Option<IpAddr>) -> Vec<String> {
    let mut found: Vec<(bool, String)> = json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let addr = n["dst"].as_str()?;
            let states: Vec<&str> = n["state"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_str())
                .collect();
            let bad = states
                .iter()
                .find(|s| matches!(**s, "FAILED" | "INCOMPLETE"))?;
            let is_dst = dst.is_some_and(|d| addr.parse::<IpAddr>().ok() == Some(d));
            Some((!is_dst, format!("{addr} {bad}")))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, s)| s).collect()
}

/// The line of `ip -o route show match` output with the longest prefix containing `dst`.
pub fn best_match(text: &str, dst: IpAddr) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            // "[type] prefix ...": the prefix is the first word that parses as one.
            let prefix = words.iter().take(2).find_map(|w| match *w {
                "default" => Some(if dst.is_ipv4() {
                    "0.0.0.0/0".parse().unwrap()
                } else {
                    "::/0".parse().unwrap()
                }),
                w => w
                    .parse::<IpNet>()
                    .ok()
                    .or_else(|| w.parse::<IpAddr>().ok().map(IpNet::from)),
            })?;
            prefix
                .contains(&dst)
                .then(|| (prefix.prefix_len(), line.trim().to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, line)| line)
}

/// Interfaces other than `lo` in `/proc/net/dev` text.
pub fn count_interfaces(text: &str) -> usize {
    text.lines()
        .skip(2)
        .filter(|l| l.split(':').next().is_some_and(|n| n.trim() != "lo"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_route_wins() {
        let text = "default via 10.0.0.1 dev eth0 \nunreachable 10.231.66.0/24 \n10.231.0.0/16 dev r0 scope link \n";
        let dst = "10.231.66.7".parse().unwrap();
        assert_eq!(
            best_match(text, dst).as_deref(),
            Some("unreachable 10.231.66.0/24")
        );
        assert_eq!(
            best_match(text, "8.8.8.8".parse().unwrap()).as_deref(),
            Some("default via 10.0.0.1 dev eth0")
        );
        assert_eq!(best_match("", dst), None);
    }

    #[test]
    fn unresolved_neighbours_put_the_destination_first() {
        let json = serde_json::json!([
            {"dst": "10.0.0.2", "lladdr": "aa:bb:cc:dd:ee:ff", "state": ["STALE"]},
            {"dst": "10.0.0.3", "state": ["INCOMPLETE"]},
            {"dst": "10.0.0.9", "state": ["FAILED"]}
        ]);
        let dst = "10.0.0.9".parse().ok();
        assert_eq!(
            parse_unresolved(&json, dst),
            vec!["10.0.0.9 FAILED", "10.0.0.3 INCOMPLETE"]
        );
    }

    #[test]
    fn counts_interfaces_without_loopback() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 0 0\n  eth0: 1 2\nveth1: 3 4\n";
        assert_eq!(count_interfaces(text), 2);
    }
}
