//! Which policy rule and which table refused a packet. For a refused packet the kernel's route
//! lookup answers only with an errno (unreachable, prohibit, blackhole, no route); the rule list
//! and the tables are read and walked the way `fib_rules_lookup` walks them, so the evidence
//! can name the rule and the route that decided. A rule with a selector this walk does not
//! evaluate (tos, uid range, VRF, output device...) ends the walk without an answer: a guess
//! would name the wrong rule.
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

/// The packet, as the lookup saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub dst: IpAddr,
    pub src: Option<IpAddr>,
    /// The device it arrived on (`None`: sent by this host).
    pub iif: Option<String>,
    pub mark: u32,
    /// IP protocol number and ports, when known.
    pub proto: Option<u8>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// One `ip rule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub pref: u32,
    not: bool,
    src: Option<IpNet>,
    dst: Option<IpNet>,
    iif: Option<String>,
    fwmark: Option<(u32, u32)>,
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
    action: Action,
    suppress_prefixlen: Option<u8>,
    /// A selector this walk cannot evaluate.
    opaque: bool,
    /// As `ip rule` prints it: "100: from 10.9.0.0/24 lookup 100".
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Lookup(String),
    /// `ip rule ... unreachable|prohibit|blackhole`.
    Refuse(&'static str),
    Goto(u32),
    Nop,
}

/// One route of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    /// unicast, local, unreachable, prohibit, blackhole, throw, ...
    pub kind: String,
    pub prefix: IpNet,
    /// As `ip route` prints it, with its table: "blackhole 10.9.0.0/24 table 100".
    pub text: String,
}

/// What decided a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// unreachable, prohibit, blackhole, unicast, ... or none (no table had a route).
    pub kind: String,
    /// The rule that decided (absent for "none").
    pub rule: Option<PolicyRule>,
    /// The route that decided (absent when the rule itself refuses, or for "none").
    pub route: Option<TableRoute>,
    /// Tables consulted, in order.
    pub consulted: Vec<String>,
}

/// `ip -j rule show` output.
pub fn parse_rules(json: &Value) -> Vec<PolicyRule> {
    let mut rules: Vec<PolicyRule> = json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(parse_rule)
        .collect();
    rules.sort_by_key(|r| r.pref);
    rules
}

fn parse_rule(r: &Value) -> Option<PolicyRule> {
    const KNOWN: &[&str] = &[
        "priority", "not", "src", "srclen", "dst", "dstlen", "iif", "iif_detached", "fwmark",
        "fwmask", "table", "action", "goto", "nop", "suppress_prefixlen", "protocol", "ipproto",
        "sport", "dport", "flags",
    ];
    let obj = r.as_object()?;
    let pref = u32::try_from(obj.get("priority")?.as_u64()?).ok()?;
    let prefix = |addr: &str, len: &str| -> Option<IpNet> {
        let a = obj.get(addr)?.as_str()?;
        if a == "all" {
            return None;
        }
        let ip: IpAddr = a.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let l = obj.get(len).and_then(Value::as_u64).unwrap_or(max);
        IpNet::new(ip, u8::try_from(l).ok()?).ok()
    };
    let hex = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    };
    let port = |k: &str| obj.get(k).and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok());
    let mut opaque = obj.keys().any(|k| !KNOWN.contains(&k.as_str()));
    let proto = match obj.get("ipproto") {
        None => None,
        Some(v) => match v.as_str().and_then(proto_number).or(v.as_u64().map(|n| n as u8)) {
            Some(p) => Some(p),
            None => {
                opaque = true;
                None
            }
        },
    };
    for k in ["sport", "dport"] {
        if obj.contains_key(k) && port(k).is_none() {
            opaque = true;
        }
    }
    let action = if let Some(a) = obj.get("action").and_then(Value::as_str) {
        match a {
            "unreachable" => Action::Refuse("unreachable"),
            "prohibit" => Action::Refuse("prohibit"),
            "blackhole" => Action::Refuse("blackhole"),
            _ => {
                opaque = true;
                Action::Nop
            }
        }
    } else if let Some(g) = obj.get("goto").and_then(Value::as_u64) {
        Action::Goto(u32::try_from(g).ok()?)
    } else if let Some(t) = obj.get("table").and_then(Value::as_str) {
        Action::Lookup(t.to_string())
    } else {
        Action::Nop
    };
    let fwmark = hex("fwmark").map(|m| (m, hex("fwmask").unwrap_or(u32::MAX)));
    let rule = PolicyRule {
        pref,
        not: obj.contains_key("not"),
        src: prefix("src", "srclen"),
        dst: prefix("dst", "dstlen"),
        iif: obj.get("iif").and_then(Value::as_str).map(str::to_string),
        fwmark,
        proto,
        sport: port("sport"),
        dport: port("dport"),
        action,
        suppress_prefixlen: obj
            .get("suppress_prefixlen")
            .and_then(Value::as_u64)
            .and_then(|l| u8::try_from(l).ok()),
        opaque,
        text: String::new(),
    };
    Some(PolicyRule {
        text: describe(&rule),
        ..rule
    })
}

fn proto_number(name: &str) -> Option<u8> {
    Some(match name {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        n => return n.parse().ok(),
    })
}

/// The rule as `ip rule` prints it.
fn describe(r: &PolicyRule) -> String {
    let mut s = format!("{}:", r.pref);
    if r.not {
        s.push_str(" not");
    }
    match r.src {
        Some(n) => s.push_str(&format!(" from {}", net_text(n))),
        None => s.push_str(" from all"),
    }
    if let Some(n) = r.dst {
        s.push_str(&format!(" to {}", net_text(n)));
    }
    if let Some((m, mask)) = r.fwmark {
        s.push_str(&format!(" fwmark {m:#x}"));
        if mask != u32::MAX {
            s.push_str(&format!("/{mask:#x}"));
        }
    }
    if let Some(i) = &r.iif {
        s.push_str(&format!(" iif {i}"));
    }
    if let Some(p) = r.proto {
        s.push_str(&format!(" ipproto {p}"));
    }
    if let Some(p) = r.sport {
        s.push_str(&format!(" sport {p}"));
    }
    if let Some(p) = r.dport {
        s.push_str(&format!(" dport {p}"));
    }
    match &r.action {
        Action::Lookup(t) => s.push_str(&format!(" lookup {t}")),
        Action::Refuse(k) => s.push_str(&format!(" {k}")),
        Action::Goto(p) => s.push_str(&format!(" goto {p}")),
        Action::Nop => s.push_str(" nop"),
    }
    if let Some(l) = r.suppress_prefixlen {
        s.push_str(&format!(" suppress_prefixlength {l}"));
    }
    s
}

fn net_text(n: IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// `ip -j route show table T` output for one family (`default` is that family's /0).
pub fn parse_table(json: &Value, table: &str, v4: bool) -> Vec<TableRoute> {
    json.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let prefix: IpNet = match r["dst"].as_str()? {
                "default" if v4 => "0.0.0.0/0".parse().ok()?,
                "default" => "::/0".parse().ok()?,
                d => d
                    .parse()
                    .ok()
                    .or_else(|| d.parse::<IpAddr>().ok().map(IpNet::from))?,
            };
            Some(table_route(r, prefix, table))
        })
        .collect()
}

fn table_route(r: &Value, prefix: IpNet, table: &str) -> TableRoute {
    let kind = r["type"].as_str().unwrap_or("unicast").to_string();
    let mut text = match kind.as_str() {
        "unicast" => net_text(prefix),
        k => format!("{k} {}", net_text(prefix)),
    };
    if let Some(g) = r["gateway"].as_str() {
        text.push_str(&format!(" via {g}"));
    }
    if let Some(d) = r["dev"].as_str() {
        text.push_str(&format!(" dev {d}"));
    }
    if table != "main" {
        text.push_str(&format!(" table {table}"));
    }
    TableRoute { kind, prefix, text }
}

impl PolicyRule {
    fn selects(&self, p: &Packet) -> Option<bool> {
        if self.opaque {
            return None;
        }
        let within = |net: Option<IpNet>, a: Option<IpAddr>| match (net, a) {
            (None, _) => true,
            (Some(n), Some(a)) => n.contains(&a),
            (Some(_), None) => false,
        };
        let iif = match (&self.iif, &p.iif) {
            (None, _) => true,
            // Locally generated packets match `iif lo`.
            (Some(want), None) => want == "lo",
            (Some(want), Some(got)) => want == got,
        };
        let mark = self.fwmark.is_none_or(|(m, mask)| p.mark & mask == m);
        let port = |want: Option<u16>, got: Option<u16>| match (want, got) {
            (None, _) => Some(true),
            (Some(w), Some(g)) => Some(w == g),
            (Some(_), None) => None,
        };
        let proto = match (self.proto, p.proto) {
            (None, _) => true,
            (Some(w), Some(g)) => w == g,
            (Some(_), None) => return None,
        };
        let all = within(self.src, p.src)
            && within(self.dst, Some(p.dst))
            && iif
            && mark
            && proto
            && port(self.sport, p.sport)?
            && port(self.dport, p.dport)?;
        Some(all != self.not)
    }
}

/// Walks `rules` for `p`, reading tables through `table`. `None` when the walk cannot be
/// trusted (a selector it does not evaluate was reached).
pub fn decide(
    rules: &[PolicyRule],
    p: &Packet,
    mut table: impl FnMut(&str) -> Vec<TableRoute>,
) -> Option<Decision> {
    let mut consulted = Vec::new();
    let mut from_pref = 0;
    for rule in rules {
        if rule.pref < from_pref || !rule.selects(p)? {
            continue;
        }
        match &rule.action {
            Action::Refuse(kind) => {
                return Some(Decision {
                    kind: kind.to_string(),
                    rule: Some(rule.clone()),
                    route: None,
                    consulted,
                })
            }
            Action::Nop => {}
            Action::Goto(to) => from_pref = *to,
            Action::Lookup(t) => {
                consulted.push(t.clone());
                let best = table(t)
                    .into_iter()
                    .filter(|r| r.prefix.contains(&p.dst))
                    .max_by_key(|r| r.prefix.prefix_len());
                let Some(route) = best else { continue };
                if rule
                    .suppress_prefixlen
                    .is_some_and(|l| route.prefix.prefix_len() <= l)
                    || route.kind == "throw"
                {
                    continue;
                }
                return Some(Decision {
                    kind: route.kind.clone(),
                    rule: Some(rule.clone()),
                    route: Some(route),
                    consulted,
                });
            }
        }
    }
    Some(Decision {
        kind: "none".into(),
        rule: None,
        route: None,
        consulted,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn packet(dst: &str, src: &str) -> Packet {
        Packet {
            dst: dst.parse().unwrap(),
            src: Some(src.parse().unwrap()),
            iif: Some("r0".into()),
            mark: 0,
            proto: Some(17),
            sport: Some(4000),
            dport: Some(53),
        }
    }

    fn rules() -> Vec<PolicyRule> {
        parse_rules(&json!([
            {"priority":0,"src":"all","table":"local"},
            {"priority":100,"src":"10.77.9.0","srclen":24,"table":"100"},
            {"priority":110,"src":"10.77.8.1","action":"prohibit"},
            {"priority":120,"not":null,"src":"all","fwmark":"0x10","fwmask":"0xff","table":"120"},
            {"priority":32766,"src":"all","table":"main"},
            {"priority":32767,"src":"all","table":"default"}
        ]))
    }

    fn tables(t: &str) -> Vec<TableRoute> {
        let json = match t {
            "main" => json!([{"dst":"10.77.2.0/24","dev":"r1","protocol":"kernel"},{"dst":"default","gateway":"10.77.1.9","dev":"r0"}]),
            "100" => json!([{"type":"blackhole","dst":"10.77.2.0/24","flags":[]}]),
            "120" => json!([{"type":"throw","dst":"10.77.0.0/16"}]),
            _ => json!([]),
        };
        parse_table(&json, t, true)
    }

    #[test]
    fn the_rule_that_selects_another_table_decides_before_main() {
        let d = decide(&rules(), &packet("10.77.2.2", "10.77.9.2"), tables).unwrap();
        assert_eq!(d.kind, "blackhole");
        assert_eq!(d.rule.unwrap().text, "100: from 10.77.9.0/24 lookup 100");
        assert_eq!(d.route.unwrap().text, "blackhole 10.77.2.0/24 table 100");
        assert_eq!(d.consulted, ["local", "100"]);
    }

    #[test]
    fn a_refusing_rule_decides_without_a_route() {
        let d = decide(&rules(), &packet("10.77.2.2", "10.77.8.1"), tables).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.rule.unwrap().text.as_str(), d.route),
            ("prohibit", "110: from 10.77.8.1 prohibit", None)
        );
    }

    #[test]
    fn not_fwmark_and_throw_fall_through_to_main() {
        // Mark 0: "not fwmark 0x10/0xff" selects; table 120 throws; main routes.
        let d = decide(&rules(), &packet("10.77.2.2", "10.77.7.7"), tables).unwrap();
        assert_eq!(d.kind, "unicast");
        assert_eq!(d.consulted, ["local", "120", "main"]);
        assert_eq!(d.route.unwrap().text, "10.77.2.0/24 dev r1");
        let mut marked = packet("10.77.2.2", "10.77.7.7");
        marked.mark = 0x110;
        let d = decide(&rules(), &marked, tables).unwrap();
        assert_eq!(d.consulted, ["local", "main"]);
    }

    #[test]
    fn suppress_prefixlength_skips_the_default_route() {
        let r = parse_rules(&json!([
            {"priority":1,"src":"all","table":"main","suppress_prefixlen":0},
            {"priority":2,"src":"all","table":"51820"}
        ]));
        let t = |name: &str| match name {
            "main" => parse_table(&json!([{"dst":"default","gateway":"10.0.0.1","dev":"eth0"}]), name, true),
            _ => parse_table(&json!([{"type":"unreachable","dst":"default"}]), name, true),
        };
        let d = decide(&r, &packet("192.0.2.1", "10.0.0.5"), t).unwrap();
        assert_eq!(d.kind, "unreachable");
        assert_eq!(d.route.unwrap().text, "unreachable 0.0.0.0/0 table 51820");
    }

    #[test]
    fn an_unevaluated_selector_gives_no_answer() {
        let r = parse_rules(&json!([
            {"priority":1,"src":"all","uid_start":100,"uid_end":200,"table":"7"},
            {"priority":2,"src":"all","table":"main"}
        ]));
        assert_eq!(decide(&r, &packet("10.77.2.2", "10.77.9.2"), tables), None);
        let r = parse_rules(&json!([
            {"priority":1,"src":"all","ipproto":"udp","dport":53,"table":"100"}
        ]));
        let mut p = packet("10.77.2.2", "10.77.9.2");
        assert_eq!(decide(&r, &p, tables).unwrap().kind, "blackhole");
        p.dport = None;
        assert_eq!(decide(&r, &p, tables), None);
    }
}
