//! Routing state of a namespace: the route the kernel picks for a packet (its own lookup, so
//! policy rules, other tables, marks and the input interface count), whether the namespace
//! looks like an end host (one interface) or a router, and unresolved neighbours.
use std::{fs, net::IpAddr, path::Path, process::Command};

use ipnet::IpNet;
use serde_json::Value;

use super::policy;
use crate::netns::in_namespace;

/// What to ask the kernel's route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteQuery {
    pub dst: IpAddr,
    pub src: Option<IpAddr>,
    /// Route as a packet received on this interface (input lookup); `None`: as sent locally.
    pub iif: Option<String>,
    pub mark: Option<u32>,
    /// IP protocol and ports (policy rules may select on them).
    pub proto: Option<u8>,
    pub ports: Option<(u16, u16)>,
}

/// The kernel's answer for one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// unicast | local | broadcast | multicast | unreachable | prohibit | blackhole | throw |
    /// none (no route at all).
    pub kind: &'static str,
    /// The route as `ip route` prints it, with its table ("unreachable 10.9.0.0/16 table 100").
    pub text: String,
    /// The path MTU the kernel uses for this destination, when the route has one (a route
    /// `mtu` metric, or one learned from an ICMP "fragmentation needed" / "packet too big").
    pub mtu: Option<u32>,
    /// Seconds until a learned path MTU expires (learned ones only).
    pub mtu_expires: Option<u64>,
    /// MTU of the route's device (what applies when the route has no MTU of its own).
    pub dev_mtu: Option<u32>,
    /// For a refused packet: the policy rule that decided, as `ip rule` prints it, when it
    /// is not the main table's.
    pub rule: Option<String>,
    /// The `ip route del` arguments that remove the deciding route, when one decided.
    pub entry: Option<String>,
    /// The main table's route for the destination when another table decided first.
    pub bypassed_main: Option<String>,
}

impl Route {
    /// The MTU the kernel uses for this route: its own (configured or learned), else its
    /// device's.
    pub fn path_mtu(&self) -> Option<u32> {
        self.mtu.or(self.dev_mtu)
    }
}

/// Asks the kernel how it routes `q` inside the namespace at `ns` (`None`: dropscope's own).
/// Routes that refuse the packet (unreachable, prohibit, blackhole, none) come back from the
/// kernel as an error; the matching entry is then looked up among the routes of that type.
pub fn get(ns: Option<&Path>, q: RouteQuery) -> Option<Route> {
    in_namespace(ns, move || {
        let answer = route_get(&q);
        match answer {
            Ok(json) => parse_route(&json, q.dst).map(|mut r| {
                r.dev_mtu = json[0]["dev"].as_str().and_then(device_mtu);
                r
            }),
            Err(kind) => Some(refusing_route(kind, &q)),
        }
    })
    .flatten()
}

/// The MTU of device `dev` in the calling thread's namespace.
fn device_mtu(dev: &str) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", dev])
        .output()
        .ok()?;
    let json: Value = serde_json::from_slice(&out.stdout).ok()?;
    json[0]["mtu"].as_u64().map(|m| m as u32)
}

/// `ip -d -j route get ...`: the route's JSON, or the kind of route the errno means.
fn route_get(q: &RouteQuery) -> Result<Value, &'static str> {
    let mut args = vec![
        "-d".to_string(),
        "-j".into(),
        if q.dst.is_ipv4() { "-4" } else { "-6" }.into(),
        "route".into(),
        "get".into(),
        q.dst.to_string(),
    ];
    if let Some(src) = q.src.filter(|s| !s.is_unspecified()) {
        args.extend(["from".into(), src.to_string()]);
    }
    if let Some(iif) = &q.iif {
        args.extend(["iif".into(), iif.clone()]);
    }
    if let Some(mark) = q.mark {
        args.extend(["mark".into(), mark.to_string()]);
    }
    if let Some(p) = q.proto.filter(|&p| p != 0) {
        args.extend(["ipproto".into(), p.to_string()]);
        if let Some((sport, dport)) = q.ports {
            args.extend(["sport".into(), sport.to_string(), "dport".into(), dport.to_string()]);
        }
    }
    let out = Command::new("ip").args(&args).output().map_err(|_| "")?;
    if out.status.success() {
        return serde_json::from_slice(&out.stdout).map_err(|_| "");
    }
    Err(kind_of_error(&String::from_utf8_lossy(&out.stderr)))
}

/// The route kind behind a route lookup error (`fib_lookup`'s errno).
pub fn kind_of_error(stderr: &str) -> &'static str {
    if stderr.contains("No route to host") {
        "unreachable"
    } else if stderr.contains("Permission denied") {
        "prohibit"
    } else if stderr.contains("Invalid argument") {
        "blackhole"
    } else if stderr.contains("Network is unreachable") {
        "none"
    } else {
        ""
    }
}

/// A route the kernel refused the packet with. The policy rules and tables are walked to name
/// the rule and route that decided; when the walk cannot say (or disagrees with the kernel),
/// the most specific route of that kind in any table is named as such.
fn refusing_route(kind: &'static str, q: &RouteQuery) -> Route {
    let mut route = Route {
        kind: if kind.is_empty() { "none" } else { kind },
        text: String::new(),
        mtu: None,
        mtu_expires: None,
        dev_mtu: None,
        rule: None,
        entry: None,
        bypassed_main: None,
    };
    let decision = (!kind.is_empty())
        .then(|| decide(q))
        .flatten()
        .filter(|d| d.kind == kind || (kind == "none" && d.kind == "none"));
    if let Some(d) = decision {
        let rule = d.rule.as_ref().map(|r| r.text.clone());
        route.text = match (&d.route, &rule) {
            (Some(r), Some(rule)) if !rule.ends_with("lookup main") => {
                format!("{} (ip rule {rule})", r.text)
            }
            (Some(r), _) => r.text.clone(),
            (None, Some(rule)) => format!("ip rule {rule}"),
            (None, None) => format!(
                "no route to it in the tables the policy rules consult ({})",
                d.consulted.join(", ")
            ),
        };
        route.entry = d.route.as_ref().map(|r| r.text.clone());
        route.rule = rule.filter(|r| !r.ends_with("lookup main"));
        if d.route.is_some() && route.rule.is_some() {
            route.bypassed_main = main_route(q);
        }
        return route;
    }
    route.text = match kind {
        "none" => "no route to it in the tables the policy rules consult".to_string(),
        "" => "the route lookup failed".to_string(),
        kind => typed_route(kind, q.dst)
            .map(|r| format!("{r} (the most specific {kind} route in any table)"))
            .unwrap_or_else(|| format!("a {kind} route (the kernel's lookup answered so)")),
    };
    route
}

/// The policy walk for `q`, in the calling thread's namespace.
fn decide(q: &RouteQuery) -> Option<policy::Decision> {
    let v4 = q.dst.is_ipv4();
    let family = if v4 { "-4" } else { "-6" };
    let rules = policy::parse_rules(&ip_json(&[family, "-j", "rule", "show"])?);
    let packet = policy::Packet {
        dst: q.dst,
        src: q.src.filter(|s| !s.is_unspecified()),
        iif: q.iif.clone(),
        mark: q.mark.unwrap_or(0),
        proto: q.proto,
        sport: q.ports.map(|p| p.0),
        dport: q.ports.map(|p| p.1),
    };
    policy::decide(&rules, &packet, |table| {
        ip_json(&[family, "-j", "route", "show", "table", table])
            .map(|j| policy::parse_table(&j, table, v4))
            .unwrap_or_default()
    })
}

/// The main table's most specific unicast route to `q.dst`, as `ip route` prints it.
fn main_route(q: &RouteQuery) -> Option<String> {
    let v4 = q.dst.is_ipv4();
    let json = ip_json(&[if v4 { "-4" } else { "-6" }, "-j", "route", "show", "table", "main"])?;
    policy::parse_table(&json, "main", v4)
        .into_iter()
        .filter(|r| r.prefix.contains(&q.dst))
        .max_by_key(|r| r.prefix.prefix_len())
        .filter(|r| r.kind == "unicast")
        .map(|r| r.text)
}

/// The most specific route of `kind` containing `dst`, in any table.
fn typed_route(kind: &str, dst: IpAddr) -> Option<String> {
    let family = if dst.is_ipv4() { "-4" } else { "-6" };
    let out = Command::new("ip")
        .args([family, "-o", "route", "show", "table", "all", "type", kind])
        .output()
        .ok()?;
    best_match(&String::from_utf8_lossy(&out.stdout), dst)
}

fn ip_json(args: &[&str]) -> Option<Value> {
    let out = Command::new("ip").args(args).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The first route of `ip -d -j route get` output, as a [`Route`].
pub fn parse_route(json: &Value, dst: IpAddr) -> Option<Route> {
    let r = json.as_array()?.first()?;
    let kind = match r["type"].as_str().unwrap_or("unicast") {
        "unicast" => "unicast",
        "local" => "local",
        "broadcast" => "broadcast",
        "multicast" => "multicast",
        "unreachable" => "unreachable",
        "prohibit" => "prohibit",
        "blackhole" => "blackhole",
        "throw" => "throw",
        _ => "unicast",
    };
    let mut text = match kind {
        "unicast" => dst.to_string(),
        k => format!("{k} {dst}"),
    };
    for (key, word) in [("gateway", "via"), ("dev", "dev"), ("table", "table")] {
        if let Some(v) = r[key].as_str() {
            text.push_str(&format!(" {word} {v}"));
        }
    }
    let mtu = r["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|m| m["mtu"].as_u64())
        .map(|m| m as u32);
    let mtu_expires = mtu.and(r["expires"].as_u64());
    if let Some(m) = mtu {
        text.push_str(&format!(" mtu {m}"));
        if let Some(e) = mtu_expires {
            text.push_str(&format!(" (learned, expires in {e} s)"));
        }
    }
    Some(Route {
        kind,
        text,
        mtu,
        mtu_expires,
        dev_mtu: None,
        rule: None,
        entry: None,
        bypassed_main: None,
    })
}

/// Non-loopback interfaces in the namespace at `ns`.
pub fn interfaces(ns: Option<&Path>) -> Option<usize> {
    in_namespace(ns, || {
        fs::read_to_string("/proc/thread-self/net/dev")
            .ok()
            .map(|t| count_interfaces(&t))
    })
    .flatten()
}

/// Neighbour entries on `dev` that are not resolved (INCOMPLETE, FAILED), as "ADDR STATE",
/// the one for `dst` first when it is among them.
pub fn unresolved_neighbours(ns: Option<&Path>, dev: String, dst: Option<IpAddr>) -> Vec<String> {
    in_namespace(ns, move || {
        let out = Command::new("ip")
            .args(["-j", "neigh", "show", "dev", &dev])
            .output()
            .ok();
        let json: serde_json::Value = out
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        parse_unresolved(&json, dst)
    })
    .unwrap_or_default()
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
    fn route_get_answers_name_the_route_and_its_path_mtu() {
        let dst: IpAddr = "10.77.2.2".parse().unwrap();
        let json = serde_json::json!([{"type":"unicast","dst":"10.77.2.2","gateway":"10.77.1.1",
            "dev":"a0","table":"main","prefsrc":"10.77.1.2","flags":[],"uid":0,"cache":[],
            "expires":600,"metrics":[{"mtu":1300}]}]);
        let r = parse_route(&json, dst).unwrap();
        assert_eq!(r.kind, "unicast");
        assert_eq!((r.mtu, r.mtu_expires), (Some(1300), Some(600)));
        assert_eq!(
            r.text,
            "10.77.2.2 via 10.77.1.1 dev a0 table main mtu 1300 (learned, expires in 600 s)"
        );
        let json = serde_json::json!([{"type":"broadcast","dst":"10.77.1.255","dev":"a0"}]);
        assert_eq!(parse_route(&json, dst).unwrap().kind, "broadcast");
        for (err, kind) in [
            ("RTNETLINK answers: No route to host", "unreachable"),
            ("RTNETLINK answers: Permission denied", "prohibit"),
            ("RTNETLINK answers: Invalid argument", "blackhole"),
            ("RTNETLINK answers: Network is unreachable", "none"),
        ] {
            assert_eq!(kind_of_error(err), kind);
        }
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

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const ROUTE_GET: &str = include_str!("../../testdata/route-get.json");
        const ROUTE_GET6: &str = include_str!("../../testdata/route-get6.json");
        const NEIGH: &str = include_str!("../../testdata/neigh.json");
        const ROUTES: &str = include_str!("../../testdata/routes-o.txt");
        const DEV: &str = include_str!("../../testdata/dev.txt");
        const WORDS: &[&str] = &[
            "type",
            "unicast",
            "local",
            "broadcast",
            "unreachable",
            "blackhole",
            "dst",
            "gateway",
            "dev",
            "table",
            "main",
            "metrics",
            "mtu",
            "expires",
            "state",
            "FAILED",
            "INCOMPLETE",
            "STALE",
            "REACHABLE",
            "10.250.1.9",
            "fd00::1",
            "10.0.0.0/8",
            "lladdr",
        ];

        fn addr() -> impl Strategy<Value = IpAddr> {
            fuzz::addr(&["10.250.66.5", "10.250.77.1"])
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_json_never_panics(
                a in fuzz::json(WORDS),
                b in fuzz::mutated_json(ROUTE_GET, WORDS),
                c in fuzz::mutated_json(ROUTE_GET6, WORDS),
                d in fuzz::mutated_json(NEIGH, WORDS),
                dst in addr(),
            ) {
                for v in [&a, &b, &c, &d] {
                    if let Some(r) = parse_route(v, dst) {
                        r.path_mtu();
                    }
                    parse_unresolved(v, Some(dst));
                }
            }

            #[test]
            fn prop_any_text_never_panics(
                text in fuzz::text(),
                routes in fuzz::mutated(ROUTES),
                dev in fuzz::mutated(DEV),
                dst in addr(),
            ) {
                for t in [&text, &routes, &dev] {
                    best_match(t, dst);
                    count_interfaces(t);
                    kind_of_error(t);
                }
            }

            #[test]
            fn prop_route_answers_keep_their_values(
                mtu in any::<u32>(),
                expires in any::<u64>(),
                kind in prop::sample::select(&["unicast", "local", "broadcast", "multicast", "unreachable", "prohibit", "blackhole", "throw"][..]),
                dst in addr(),
            ) {
                let mut json: Value = serde_json::from_str(ROUTE_GET).unwrap();
                json[0]["metrics"][0]["mtu"] = mtu.into();
                json[0]["expires"] = expires.into();
                json[0]["type"] = kind.into();
                let r = parse_route(&json, dst).unwrap();
                prop_assert_eq!((r.kind, r.mtu, r.mtu_expires), (kind, Some(mtu), Some(expires)));
                prop_assert!(r.text.contains(&format!(" mtu {mtu}")), "{}", r.text);
            }

            #[test]
            fn prop_the_longest_prefix_wins(
                len_a in 0u8..=32,
                len_b in 0u8..=32,
                dst in any::<[u8; 4]>(),
                noise in fuzz::lines(),
            ) {
                let dst = IpAddr::from(dst);
                let net = |len: u8| IpNet::new(dst, len).unwrap().trunc();
                let text = format!(
                    "{noise}\nunreachable {} table 100 \n{} dev r0 scope link \n",
                    net(len_a), net(len_b)
                );
                let best = best_match(&text, dst).unwrap();
                let want = match len_a.cmp(&len_b) {
                    std::cmp::Ordering::Greater => "unreachable",
                    std::cmp::Ordering::Less => "dev r0",
                    std::cmp::Ordering::Equal => "",
                };
                prop_assert!(best.contains(want) || best_match(&noise, dst).is_some(), "{}", best);
            }

            #[test]
            fn prop_unresolved_entries_are_exactly_the_failed_ones(
                states in prop::collection::vec(prop::sample::select(&["FAILED", "INCOMPLETE", "STALE", "REACHABLE", "PERMANENT", "NOARP"][..]), 0..20),
            ) {
                let json = Value::Array(states.iter().enumerate().map(|(i, s)| {
                    serde_json::json!({"dst": format!("10.0.{}.{}", i / 256, i % 256), "state": [s]})
                }).collect());
                let found = parse_unresolved(&json, None);
                let want = states.iter().filter(|s| matches!(**s, "FAILED" | "INCOMPLETE")).count();
                prop_assert_eq!(found.len(), want);
            }
        }
    }
}
