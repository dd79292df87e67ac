//! The facts a rule can test or print, computed from one drop and its context.
use std::borrow::Cow;

use crate::{
    events::Drop,
    evidence::{
        conntrack::CtStats,
        rules::{Moved, Verdict},
    },
};

/// Facts usable in a rule's `when` (and as placeholders).
pub const CONDITION_FACTS: &[&str] = &[
    "family",
    "proto",
    "dev_forwarding",
    "all_forwarding",
    "dev6_forwarding",
    "all6_forwarding",
    "dev_rp_filter",
    "all_rp_filter",
    "rp_filter",
    "icmp_sent",
    "icmp_sent_name",
    "rst_sent",
    "nf_engine",
    "nf_verdict",
    "nf_hook",
    "nf_ct_invalid",
    "conntrack",
    "frag_needed",
    "frag_needed_dropped",
    "end_host",
    "route_type",
    "over_mtu",
    "dst_multicast",
    "pkt_icmp_type",
];

/// Facts usable only as placeholders in evidence and fix texts.
pub const PLACEHOLDERS: &[&str] = &[
    "ifname",
    "out_ifname",
    "mtu",
    "len",
    "src",
    "dst",
    "sport",
    "dport",
    "flow",
    "ttl",
    "netns",
    "reason",
    "location",
    "nsexec",
    "nf_rule",
    "nf_reject_with",
    "nf_delete",
    "ct_count",
    "ct_max",
    "ct_drops",
    "route",
    "neighbours",
];

/// A fact's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Int(i64),
    Str(Cow<'a, str>),
    Bool(bool),
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Str(v) => f.write_str(v),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

impl Value<'_> {
    /// Whether this value equals a value written in the table.
    pub fn matches(&self, want: &toml::Value) -> bool {
        match (self, want) {
            (_, toml::Value::Array(options)) => options.iter().any(|o| self.matches(o)),
            (Value::Int(a), toml::Value::Integer(b)) => a == b,
            (Value::Str(a), toml::Value::String(b)) => a == b,
            (Value::Bool(a), toml::Value::Boolean(b)) => a == b,
            _ => false,
        }
    }
}

/// One drop plus what correlation and live state added to it.
pub struct Facts<'a> {
    pub drop: &'a Drop,
    /// ICMP error the kernel sent about this very packet (type, code).
    pub icmp_sent: Option<(u8, u8)>,
    /// The kernel answered this very packet with a TCP reset.
    pub rst_sent: bool,
    /// Netfilter engine, for netfilter drops.
    pub nf_engine: Option<&'static str>,
    /// Command prefix to act in the drop's namespace.
    pub nsexec: String,
    /// The DROP/REJECT rule whose counter moved with this drop, when one did.
    pub nf_rule: Option<Moved>,
    /// The netfilter hook (prerouting, input, forward, output, postrouting, bridge).
    pub nf_hook: Option<&'static str>,
    /// Conntrack counters moved since the last look at this namespace, with its fill level.
    pub ct: Option<CtStats>,
    /// An ICMP "fragmentation needed" to this packet's sender was just dropped in this namespace.
    pub frag_needed_dropped: bool,
    /// The route matching the destination, as `ip route` prints it.
    pub route: Option<String>,
    /// Non-loopback interfaces in the namespace.
    pub ifaces: Option<usize>,
    /// Unresolved neighbour entries on the egress device ("ADDR STATE").
    pub neighbours: Vec<String>,
}

impl Facts<'_> {
    /// Facts of a drop with no context beyond the drop itself.
    #[cfg(test)]
    pub fn bare(drop: &Drop) -> Facts<'_> {
        Facts {
            drop,
            icmp_sent: None,
            rst_sent: false,
            nf_engine: None,
            nsexec: String::new(),
            nf_rule: None,
            nf_hook: None,
            ct: None,
            frag_needed_dropped: false,
            route: None,
            ifaces: None,
            neighbours: Vec::new(),
        }
    }
}

/// Whether a packet is itself an ICMP "fragmentation needed" / ICMPv6 "packet too big".
pub fn is_frag_needed(d: &Drop) -> bool {
    d.flow
        .is_some_and(|f| matches!((f.proto, f.icmp), (1, Some((3, 4))) | (58, Some((2, _)))))
}

impl<'a> Facts<'a> {
    /// The value of a fact, or `None` when this drop does not carry it.
    pub fn get(&self, name: &str) -> Option<Value<'_>> {
        let d = self.drop;
        let s = d.sysctls;
        let int = |v: Option<u8>| v.map(|v| Value::Int(v.into()));
        let text = |v: String| Some(Value::Str(Cow::Owned(v)));
        match name {
            "family" => d.flow.map(|f| Value::Str(f.family.as_str().into())),
            "proto" => d.flow.and_then(|f| text(f.proto_name())),
            "dev_forwarding" => int(s.dev_forwarding),
            "all_forwarding" => int(s.all_forwarding),
            "dev6_forwarding" => int(s.dev6_forwarding),
            "all6_forwarding" => int(s.all6_forwarding),
            "dev_rp_filter" => int(s.dev_rp_filter),
            "all_rp_filter" => int(s.all_rp_filter),
            "rp_filter" => int(s.effective_rp_filter()),
            "icmp_sent" => text(self.icmp_sent.map_or("none".into(), |(t, c)| format!("{t}/{c}"))),
            "rst_sent" => Some(Value::Bool(self.rst_sent)),
            "icmp_sent_name" => text(self.icmp_sent.map_or("none".into(), |(t, c)| icmp_name(t, c).into())),
            "nf_engine" => self.nf_rule.as_ref().map(|m| m.rule.engine).or(self.nf_engine).map(|e| Value::Str(e.into())),
            "nf_hook" => self.nf_hook.map(|h| Value::Str(h.into())),
            "nf_ct_invalid" => self.nf_rule.as_ref().map(|m| Value::Bool(m.matcher.ct_invalid)),
            "conntrack" => self.ct.map(|c| {
                Value::Str(
                    if c.insert_failed > 0 {
                        "insert_failed"
                    } else if c.drop > 0 {
                        "table_full"
                    } else {
                        "none"
                    }
                    .into(),
                )
            }),
            "ct_count" => self.ct.and_then(|c| c.count).map(|v| Value::Int(v as i64)),
            "ct_max" => self.ct.and_then(|c| c.max).map(|v| Value::Int(v as i64)),
            "ct_drops" => self.ct.map(|c| Value::Int(c.drop as i64)),
            "frag_needed" => Some(Value::Bool(is_frag_needed(d))),
            "frag_needed_dropped" => Some(Value::Bool(self.frag_needed_dropped)),
            "neighbours" => text(if self.neighbours.is_empty() {
                "none unresolved now".into()
            } else {
                self.neighbours.join(", ")
            }),
            "route" => text(self.route.clone().unwrap_or_else(|| "no matching route".into())),
            "end_host" => self.ifaces.map(|n| Value::Bool(n <= 1)),
            "route_type" => self.route.as_deref().map(|r| {
                let first = r.split_whitespace().next().unwrap_or("");
                let kind = match first {
                    "unreachable" | "prohibit" | "blackhole" | "throw" => first,
                    _ => "unicast",
                };
                Value::Str(kind.into())
            }),
            "nf_verdict" => self.nf_rule.as_ref().map(|m| match m.verdict {
                Verdict::Drop => Value::Str("drop".into()),
                Verdict::Reject(_) => Value::Str("reject".into()),
            }),
            "nf_reject_with" => self.nf_rule.as_ref().and_then(|m| match &m.verdict {
                Verdict::Reject(with) => Some(Value::Str(Cow::Borrowed(with))),
                Verdict::Drop => None,
            }),
            "nf_rule" => text(match &self.nf_rule {
                Some(m) => format!("[{}] (+{} packets)", m.rule, m.packets),
                None => "not identified (no DROP/REJECT rule counter moved; nftables rules need `counter`)".into(),
            }),
            "nf_delete" => text(match &self.nf_rule {
                Some(m) => format!("{}{}", self.nsexec, delete_command(m)),
                None => format!("{}nft -a list ruleset; {}iptables-save -c", self.nsexec, self.nsexec),
            }),
            "dst_multicast" => d.flow.map(|f| Value::Bool(f.dst.is_multicast())),
            "pkt_icmp_type" => d.flow.and_then(|f| f.icmp).map(|(t, _)| Value::Int(t.into())),
            "over_mtu" => self.egress_mtu().map(|m| Value::Bool(d.len > m)),
            "ifname" => d.dev.map(|dev| Value::Str(Cow::Owned(dev.name().to_string()))),
            "out_ifname" => d.out.or(d.dev).map(|dev| Value::Str(Cow::Owned(dev.name().to_string()))),
            "mtu" => self.egress_mtu().map(|m| Value::Int(m.into())),
            "len" => Some(Value::Int(d.len.into())),
            "src" => d.flow.and_then(|f| text(f.src.to_string())),
            "dst" => d.flow.and_then(|f| text(f.dst.to_string())),
            "sport" => d.flow.and_then(|f| f.ports).map(|p| Value::Int(p.0.into())),
            "dport" => d.flow.and_then(|f| f.ports).map(|p| Value::Int(p.1.into())),
            "flow" => d.flow.and_then(|f| text(f.to_string())),
            "ttl" => d.ttl.map(|t| Value::Int(t.into())),
            "netns" => Some(Value::Int(d.netns.into())),
            "reason" => Some(Value::Str(Cow::Borrowed(&d.reason))),
            "location" => Some(Value::Str(Cow::Borrowed(&d.location))),
            "nsexec" => Some(Value::Str(Cow::Borrowed(&self.nsexec))),
            _ => None,
        }
    }

    /// MTU of the device the packet leaves through (the route's device, else `skb->dev`).
    fn egress_mtu(&self) -> Option<u32> {
        self.drop
            .out
            .or(self.drop.dev)
            .map(|d| d.mtu)
            .filter(|&m| m > 0)
    }
}

/// ICMP(v4) error names for the types the kernel sends.
pub fn icmp_name(ty: u8, code: u8) -> &'static str {
    match (ty, code) {
        (3, 0) => "net unreachable",
        (3, 1) => "host unreachable",
        (3, 2) => "protocol unreachable",
        (3, 3) => "port unreachable",
        (3, 4) => "fragmentation needed",
        (3, 9) => "net prohibited",
        (3, 10) => "host prohibited",
        (3, 13) => "administratively prohibited",
        (3, _) => "destination unreachable",
        (11, 0) => "TTL exceeded",
        (11, _) => "time exceeded",
        (12, _) => "parameter problem",
        (5, _) => "redirect",
        _ => "ICMP error",
    }
}

/// The command that removes (or, for a chain policy, relaxes) the rule that dropped.
pub fn delete_command(m: &Moved) -> String {
    let r = &m.rule;
    let tool = r.engine;
    if r.engine == "nftables" {
        // table is "<family> <name>", text starts with "handle N".
        let handle = r.text.split_whitespace().nth(1).unwrap_or("?");
        return format!("nft delete rule {} {} handle {handle}", r.table, r.chain);
    }
    if r.text.starts_with("policy ") {
        return format!(
            "{tool} -t {} -P {} ACCEPT   # only if nothing else should drop here",
            r.table, r.chain
        );
    }
    match r.text.strip_prefix("-A ") {
        Some(rest) => format!("{tool} -t {} -D {rest}", r.table),
        None => format!("{tool} -t {} -L {} -v -n --line-numbers", r.table, r.chain),
    }
}
