//! The facts a rule can test or print, computed from one drop and, only when a rule reaches
//! them, from the live state of its namespace (through an [`Investigator`]).
use std::{borrow::Cow, cell::RefCell, collections::HashMap, sync::Arc};

use crate::{
    events::{Answer, DropEvent},
    evidence::{
        counters::Counters,
        investigator::{Investigator, NfState},
        netfilter,
        routes::Route,
        rules::{Moved, Target},
        tunnels::Tunnel,
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
    "icmp_sent_kind",
    "icmp_sent_name",
    "rst_sent",
    "nf_engine",
    "nf_family",
    "nf_bridged",
    "nf_verdict",
    "nf_rule_found",
    "nf_hook",
    "nf_ct_invalid",
    "conntrack",
    "frag_needed",
    "frag_needed_dropped",
    "end_host",
    "route_type",
    "route_source",
    "route_bypasses_main",
    "over_mtu",
    "dst_multicast",
    "dst_link_local",
    "pkt_icmp_type",
    "fragment",
    "tunnel",
    "moved",
    "traceroute_port",
    "echo_ignore",
    "stack_has",
    "len",
];

/// Facts usable only as placeholders in evidence and fix texts.
pub const PLACEHOLDERS: &[&str] = &[
    "ifname",
    "in_ifname",
    "out_ifname",
    "mtu",
    "path_mtu",
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
    "nf_where",
    "ct_count",
    "ct_max",
    "ct_drops",
    "route",
    "route_entry",
    "route_rule",
    "route_rule_pref",
    "route_main",
    "neighbours",
    "tunnel_dev",
    "tunnel_mtu",
    "frag_off",
    "counters",
    "ipfrag_time",
    "frames",
    "echo_ignore_key",
    "rule_table",
];

/// A fact's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Int(i64),
    Str(Cow<'a, str>),
    Bool(bool),
    /// Several values (e.g. the counters that moved); a condition matches any of them.
    List(Vec<String>),
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Str(v) => f.write_str(v),
            Value::Bool(v) => write!(f, "{v}"),
            Value::List(v) => f.write_str(&v.join(", ")),
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
            (Value::List(items), toml::Value::String(b)) => items.iter().any(|i| i == b),
            _ => false,
        }
    }
}

/// Which answers this kernel lets dropscope see. An answer that cannot be traced is
/// "unknown", never "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traced {
    /// ICMP errors (`icmp:icmp_send`).
    pub icmp: bool,
    /// ICMPv6 errors (`icmp6_send` probe).
    pub icmp6: bool,
    /// TCP resets answering packets (closed ports).
    pub rst: bool,
}

impl Traced {
    #[cfg(test)]
    pub const ALL: Traced = Traced {
        icmp: true,
        icmp6: true,
        rst: true,
    };
    pub const NONE: Traced = Traced {
        icmp: false,
        icmp6: false,
        rst: false,
    };
}

/// One drop plus what correlation added to it; live evidence is fetched on first use.
pub struct Facts<'a> {
    pub drop: &'a DropEvent,
    /// How the kernel answered this very packet (ICMP error, TCP reset), if it was seen.
    pub answer: Option<Answer>,
    /// Whether the answer could have been seen at all (probes attached, event paired).
    pub traced: Traced,
    /// The kernel stack of the drop, symbolized, innermost first (empty when not taken).
    pub stack: &'a [Arc<str>],
    /// An ICMP "fragmentation needed" to this packet's sender was just dropped in this namespace.
    pub frag_needed_dropped: bool,
    live: RefCell<Live<'a>>,
}

/// Answers fetched from the investigator during one classification.
struct Live<'a> {
    inv: &'a mut dyn Investigator,
    nsexec: Option<String>,
    netns_name: Option<Option<String>>,
    nf: Option<NfState>,
    route: Option<Option<Route>>,
    ifaces: Option<Option<usize>>,
    neighbours: Option<Vec<String>>,
    sysctls: HashMap<&'static str, Option<String>>,
    counters: Option<Counters>,
    tunnel: Option<Option<Tunnel>>,
    underlay: Option<Option<Route>>,
}

/// What the facts fetched, for the attribution fields of a verdict.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub rule: Option<Moved>,
    pub route: Option<Route>,
    pub tunnel: Option<Tunnel>,
    pub counters: Vec<(String, u64)>,
}

impl<'a> Facts<'a> {
    pub fn new(
        drop: &'a DropEvent,
        answer: Option<Answer>,
        traced: Traced,
        stack: &'a [Arc<str>],
        inv: &'a mut dyn Investigator,
    ) -> Self {
        Facts {
            drop,
            answer,
            traced,
            stack,
            frag_needed_dropped: false,
            live: RefCell::new(Live {
                inv,
                nsexec: None,
                netns_name: None,
                nf: None,
                route: None,
                ifaces: None,
                neighbours: None,
                sysctls: HashMap::new(),
                counters: None,
                tunnel: None,
                underlay: None,
            }),
        }
    }

    /// What was fetched while classifying (nothing is fetched here).
    pub fn fetched(&self) -> Fetched {
        let live = self.live.borrow();
        Fetched {
            rule: live.nf.as_ref().and_then(|n| n.rule.clone()),
            route: live.route.clone().flatten(),
            tunnel: live.tunnel.clone().flatten(),
            counters: live
                .counters
                .as_ref()
                .map(|c| c.trouble())
                .unwrap_or_default(),
        }
    }

    fn nf(&self) -> NfState {
        let mut live = self.live.borrow_mut();
        if live.nf.is_none() {
            let state = live.inv.netfilter(self.drop, self.answer);
            live.nf = Some(state);
        }
        live.nf.clone().unwrap_or_default()
    }

    fn route(&self) -> Option<Route> {
        let mut live = self.live.borrow_mut();
        if live.route.is_none() {
            let r = live.inv.route(self.drop);
            live.route = Some(r);
        }
        live.route.clone().flatten()
    }

    fn ifaces(&self) -> Option<usize> {
        let mut live = self.live.borrow_mut();
        if live.ifaces.is_none() {
            let n = live.inv.interfaces(self.drop.netns);
            live.ifaces = Some(n);
        }
        live.ifaces.flatten()
    }

    fn neighbours(&self) -> Vec<String> {
        let mut live = self.live.borrow_mut();
        if live.neighbours.is_none() {
            let n = live.inv.neighbours(self.drop);
            live.neighbours = Some(n);
        }
        live.neighbours.clone().unwrap_or_default()
    }

    fn sysctl(&self, key: &'static str) -> Option<String> {
        let mut live = self.live.borrow_mut();
        if !live.sysctls.contains_key(key) {
            let v = live.inv.sysctl(self.drop.netns, key);
            live.sysctls.insert(key, v);
        }
        live.sysctls.get(key).cloned().flatten()
    }

    fn counters(&self) -> Counters {
        let mut live = self.live.borrow_mut();
        if live.counters.is_none() {
            let c = live.inv.counters(self.drop.netns);
            live.counters = Some(c);
        }
        live.counters.clone().unwrap_or_default()
    }

    /// The tunnel of this drop: the device the inner packet was sent on, or the one that
    /// sent this outer packet.
    fn tunnel_dev(&self) -> Option<Tunnel> {
        let flow = self.drop.flow?;
        let dev = self.drop.dev.map(|d| d.name().to_string());
        let mut live = self.live.borrow_mut();
        if live.tunnel.is_none() {
            let t = live.inv.tunnel(self.drop.netns, dev, flow.src, flow.dst);
            live.tunnel = Some(t);
        }
        live.tunnel.clone().flatten()
    }

    /// The MTU a tunnel device may have so that its packets fit the underlay: the path MTU
    /// towards its remote end (or towards this outer packet's destination) minus the
    /// encapsulation overhead.
    fn fitting_tunnel_mtu(&self) -> Option<u32> {
        let d = self.drop;
        let tunnel = self.tunnel_dev();
        let underlay = match tunnel.as_ref().and_then(|t| t.remote) {
            Some(remote) => {
                let mut live = self.live.borrow_mut();
                if live.underlay.is_none() {
                    let r = live.inv.route_to(d.netns, remote);
                    live.underlay = Some(r);
                }
                live.underlay.clone().flatten().and_then(|r| r.path_mtu())
            }
            None => self.path_mtu(),
        }?;
        let overhead = tunnel.map(|t| t.overhead).or_else(|| {
            let kind = netfilter::tunnel_from_stack(self.stack)?;
            let v6 = d.flow.is_some_and(|f| f.dst.is_ipv6());
            Some(crate::evidence::tunnels::overhead(kind, v6))
        })?;
        Some(underlay.saturating_sub(overhead))
    }

    /// Command prefix to act in the drop's namespace.
    pub fn nsexec(&self) -> String {
        let mut live = self.live.borrow_mut();
        if live.nsexec.is_none() {
            let p = live.inv.exec_prefix(self.drop.netns);
            live.nsexec = Some(p);
        }
        live.nsexec.clone().unwrap_or_default()
    }

    fn netns_name(&self) -> Option<String> {
        let mut live = self.live.borrow_mut();
        if live.netns_name.is_none() {
            let n = live.inv.netns_name(self.drop.netns);
            live.netns_name = Some(n);
        }
        live.netns_name.clone().flatten()
    }

    /// The ICMP error sent about this packet as "type/code", "none" (traceable and not
    /// seen) or "unknown" (this kernel does not let dropscope see it).
    fn icmp_sent(&self) -> String {
        match self.answer {
            Some(Answer::Icmp(t, c) | Answer::Icmp6(t, c)) => format!("{t}/{c}"),
            _ if self.answer_traceable() => "none".into(),
            _ => "unknown".into(),
        }
    }

    /// Whether an ICMP error about this packet would have been seen.
    fn answer_traceable(&self) -> bool {
        match self.drop.flow.map(|f| f.family) {
            Some(crate::events::Family::Ipv6) => self.traced.icmp6,
            Some(crate::events::Family::Ipv4) => self.traced.icmp,
            None => false,
        }
    }

    /// The netfilter family of the hook: from the nf_hook_slow probe, else from the stack;
    /// an IP hook that br_netfilter ran for a bridged frame is the packet's own family.
    pub fn nf_family(&self) -> Option<&'static str> {
        self.drop
            .context
            .netfilter
            .and_then(|n| n.family)
            .or_else(|| netfilter::family_from_stack(self.stack))
            .or_else(|| {
                netfilter::via_br_netfilter(self.stack)
                    .then(|| self.drop.flow.map(|f| f.family.as_str()))
                    .flatten()
            })
    }

    /// The hook, from the probe or else the stack.
    pub fn nf_hook(&self) -> Option<&'static str> {
        self.drop
            .context
            .netfilter
            .and_then(|n| n.hook)
            .or_else(|| netfilter::hook_from_stack(self.stack))
    }

    /// The engine of a netfilter drop: the rule's, the probe's, or from the location.
    fn nf_engine(&self) -> Option<String> {
        if &*self.drop.reason != "NETFILTER_DROP" {
            return None;
        }
        // The rule names the tool that wrote it (iptables-nft or native nft); the probe and
        // the location only the engine.
        let nf = self.nf();
        if let Some(m) = &nf.rule {
            return Some(m.rule.engine.to_string());
        }
        if let Some(r) = &self.drop.context.ruleset {
            return Some(r.engine.to_string());
        }
        if &*self.drop.location == "nft_do_chain" {
            return Some("nftables".into());
        }
        Some(netfilter::engine(&self.drop.location, Some(&nf.legacy_tables)).to_string())
    }

    /// The value of a fact, or `None` when this drop does not carry it.
    pub fn get(&self, name: &str) -> Option<Value<'static>> {
        let d = self.drop;
        let s = d.sysctls;
        let int = |v: Option<u8>| v.map(|v| Value::Int(v.into()));
        let text = |v: String| Some(Value::Str(Cow::Owned(v)));
        let dev_name = |dev: Option<crate::events::Device>| dev.map(|d| d.name().to_string());
        match name {
            "family" => d.flow.and_then(|f| text(f.family.as_str().into())),
            "proto" => d.flow.and_then(|f| text(f.proto_name())),
            "dev_forwarding" => int(s.dev_forwarding),
            "all_forwarding" => int(s.all_forwarding),
            "dev6_forwarding" => int(s.dev6_forwarding),
            "all6_forwarding" => int(s.all6_forwarding),
            "dev_rp_filter" => int(s.dev_rp_filter),
            "all_rp_filter" => int(s.all_rp_filter),
            "rp_filter" => int(s.effective_rp_filter()),
            "icmp_sent" => text(self.icmp_sent()),
            "icmp_sent_kind" => text(match self.answer {
                Some(Answer::Icmp(t, c)) => icmp_kind(t, c).into(),
                Some(Answer::Icmp6(t, c)) => icmp6_kind(t, c).into(),
                _ if self.answer_traceable() => "none".into(),
                _ => "unknown".into(),
            }),
            "icmp_sent_name" => text(match self.answer {
                Some(Answer::Icmp(t, c)) => icmp_name(t, c).into(),
                Some(Answer::Icmp6(t, c)) => format!("ICMPv6 {}", icmp6_name(t, c)),
                _ if self.answer_traceable() => "none".into(),
                Some(Answer::TcpReset) | None => match d.flow.map(|f| f.family) {
                    Some(crate::events::Family::Ipv6) => {
                        "unknown (this kernel does not let dropscope see ICMPv6 errors)".into()
                    }
                    _ => "unknown (this kernel does not let dropscope see ICMP errors)".into(),
                },
            }),
            "rst_sent" => match self.answer {
                Some(Answer::TcpReset) => Some(Value::Bool(true)),
                _ if self.traced.rst => Some(Value::Bool(false)),
                _ => None,
            },
            "nf_engine" => self.nf_engine().and_then(text),
            "nf_family" => self.nf_family().and_then(|f| text(f.into())),
            "nf_bridged" => Some(Value::Bool(netfilter::via_br_netfilter(self.stack))),
            "nf_hook" => self.nf_hook().and_then(|h| text(h.into())),
            "nf_where" => text(match (self.nf_hook(), self.nf_family()) {
                (Some(h), Some(f)) if h != "bridge" && f != "bridge" => {
                    format!("the {f} {h} hook")
                }
                (Some(h), _) => format!("the {h} hook"),
                (None, _) => format!(
                    "an unidentified hook (called from {})",
                    self.hook_frame()
                        .unwrap_or_else(|| "an unknown function".into())
                ),
            }),
            "nf_ct_invalid" => self
                .nf()
                .rule
                .as_ref()
                .map(|m| Value::Bool(m.matcher.ct_invalid)),
            "nf_rule_found" => {
                let nf = self.nf();
                match (&nf.rule, nf.counters_read && nf.unread.is_empty()) {
                    (Some(_), _) => Some(Value::Bool(true)),
                    (None, true) => Some(Value::Bool(false)),
                    // Rules that could have dropped it were not read.
                    (None, false) => None,
                }
            }
            "conntrack" => self.nf().ct.map(|c| {
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
            "ct_count" => self
                .nf()
                .ct
                .and_then(|c| c.count)
                .map(|v| Value::Int(v as i64)),
            "ct_max" => self
                .nf()
                .ct
                .and_then(|c| c.max)
                .map(|v| Value::Int(v as i64)),
            "ct_drops" => self.nf().ct.map(|c| Value::Int(c.drop as i64)),
            "frag_needed" => Some(Value::Bool(is_frag_needed(d))),
            "frag_needed_dropped" => Some(Value::Bool(self.frag_needed_dropped)),
            "neighbours" => text({
                let n = self.neighbours();
                if n.is_empty() {
                    "none unresolved now".into()
                } else {
                    n.join(", ")
                }
            }),
            "route" => text(
                self.route()
                    .map(|r| r.text)
                    .unwrap_or_else(|| "unknown (the route could not be looked up)".into()),
            ),
            "route_type" => self.route().map(|r| Value::Str(r.kind.into())),
            // Who refused the packet: a policy rule itself, a route of a table the rule walk
            // names, or only "a route of that kind in some table".
            "route_source" => self.route().filter(|r| r.kind != "unicast").map(|r| {
                Value::Str(match (&r.entry, &r.rule) {
                    (Some(_), _) => "table".into(),
                    (None, Some(_)) => "rule".into(),
                    (None, None) => "any_table".into(),
                })
            }),
            "route_bypasses_main" => self
                .route()
                .filter(|r| r.entry.is_some())
                .map(|r| Value::Bool(r.bypassed_main.is_some())),
            "route_entry" => self.route().and_then(|r| r.entry).map(|e| Value::Str(e.into())),
            "route_rule" => self.route().and_then(|r| r.rule).map(|e| Value::Str(e.into())),
            "route_rule_pref" => self
                .route()
                .and_then(|r| r.rule)
                .and_then(|t| t.split(':').next()?.parse::<i64>().ok())
                .map(Value::Int),
            "route_main" => self
                .route()
                .and_then(|r| r.bypassed_main)
                .map(|e| Value::Str(e.into())),
            "end_host" => self.ifaces().map(|n| Value::Bool(n <= 1)),
            "nf_verdict" => self.nf().rule.as_ref().map(|m| match m.verdict {
                Target::Drop => Value::Str("drop".into()),
                Target::Reject(_) => Value::Str("reject".into()),
            }),
            "nf_reject_with" => self.nf().rule.and_then(|m| match m.verdict {
                Target::Reject(with) => Some(Value::Str(Cow::Owned(with))),
                Target::Drop => None,
            }),
            "nf_rule" => text(match &self.nf().rule {
                Some(m) => format!("[{}] (+{} packets)", m.rule, m.packets),
                None => self.unnamed_rule(),
            }),
            "nf_delete" => {
                let ns = self.nsexec();
                text(match &self.nf().rule {
                    Some(m) => format!("{ns}{}", delete_command(m)),
                    None => format!("{ns}nft -a list ruleset; {ns}iptables-save -c"),
                })
            }
            "dst_multicast" => d.flow.map(|f| Value::Bool(f.dst.is_multicast())),
            "dst_link_local" => d.flow.map(|f| Value::Bool(is_link_local_multicast(f.dst))),
            "pkt_icmp_type" => d
                .flow
                .and_then(|f| f.icmp)
                .map(|(t, _)| Value::Int(t.into())),
            "over_mtu" => self.egress_mtu().map(|m| Value::Bool(d.len > m)),
            "fragment" => Some(Value::Bool(d.fragment.is_some())),
            "frag_off" => d.fragment.map(|o| Value::Int(o.into())),
            "tunnel" => netfilter::tunnel_from_stack(self.stack).and_then(|t| text(t.into())),
            "tunnel_dev" => text(match self.tunnel_dev() {
                Some(t) => t.name,
                None => "<tunnel device>".into(),
            }),
            "tunnel_mtu" => self.fitting_tunnel_mtu().map(|m| Value::Int(m.into())),
            "rule_table" => self.nf().rule.and_then(|m| text(rule_table_key(&m.rule))),
            "path_mtu" => self.path_mtu().map(|m| Value::Int(m.into())),
            "moved" => Some(Value::List(
                self.counters().moved.into_iter().map(|(n, _)| n).collect(),
            )),
            "counters" => text({
                let c = self.counters().trouble();
                if c.is_empty() {
                    "no error counter moved in the last 10 s".into()
                } else {
                    c.iter()
                        .map(|(n, v)| format!("{n} +{v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            }),
            "ipfrag_time" => {
                let key = match d.flow.map(|f| f.family) {
                    Some(crate::events::Family::Ipv6) => "net.ipv6.ip6frag_time",
                    _ => "net.ipv4.ipfrag_time",
                };
                self.sysctl(key).and_then(text)
            }
            "echo_ignore" => self
                .sysctl(self.echo_ignore_key()?)
                .and_then(|v| v.parse::<i64>().ok())
                .map(Value::Int),
            "echo_ignore_key" => self.echo_ignore_key().and_then(|k| text(k.into())),
            "stack_has" => Some(Value::List(
                self.stack.iter().map(|f| f.to_string()).collect(),
            )),
            "traceroute_port" => d
                .flow
                .and_then(|f| f.ports)
                .map(|(_, dport)| Value::Bool((33434..=33534).contains(&dport))),
            "frames" => text(if self.stack.is_empty() {
                "no stack".into()
            } else {
                self.stack
                    .iter()
                    .skip(1)
                    .take(6)
                    .map(|f| &**f)
                    .collect::<Vec<_>>()
                    .join(" <- ")
            }),
            "ifname" => dev_name(d.dev).and_then(text),
            "in_ifname" => dev_name(d.ingress()).and_then(text),
            "out_ifname" => dev_name(d.out.or(d.dev)).and_then(text),
            "mtu" => self.egress_mtu().map(|m| Value::Int(m.into())),
            "len" => Some(Value::Int(d.len.into())),
            "src" => d.flow.and_then(|f| text(f.src.to_string())),
            "dst" => d.flow.and_then(|f| text(f.dst.to_string())),
            "sport" => d.flow.and_then(|f| f.ports).map(|p| Value::Int(p.0.into())),
            "dport" => d.flow.and_then(|f| f.ports).map(|p| Value::Int(p.1.into())),
            "flow" => d.flow.and_then(|f| text(f.to_string())),
            "ttl" => d.ttl.map(|t| Value::Int(t.into())),
            "netns" => text(match self.netns_name() {
                Some(name) => name,
                None => d.netns.to_string(),
            }),
            "reason" => text(d.reason.to_string()),
            "location" => text(d.location.to_string()),
            "nsexec" => text(self.nsexec()),
            _ => None,
        }
    }

    /// The sysctl that makes the kernel ignore an echo request to this destination (IPv6's
    /// echo_ignore_all first: it silences every destination).
    fn echo_ignore_key(&self) -> Option<&'static str> {
        let f = self.drop.flow?;
        const V6_ALL: &str = "net.ipv6.icmp.echo_ignore_all";
        Some(match f.family {
            crate::events::Family::Ipv4 => "net.ipv4.icmp_echo_ignore_broadcasts",
            crate::events::Family::Ipv6 if self.sysctl(V6_ALL).as_deref() == Some("1") => V6_ALL,
            crate::events::Family::Ipv6 if f.dst.is_multicast() => {
                "net.ipv6.icmp.echo_ignore_multicast"
            }
            crate::events::Family::Ipv6 => "net.ipv6.icmp.echo_ignore_anycast",
        })
    }

    /// What to say when no rule counter explains a netfilter drop.
    fn unnamed_rule(&self) -> String {
        let nf = self.nf();
        if nf.before_baseline {
            return "not identified (dropped while dropscope was still reading the starting rule counters)".into();
        }
        if !nf.unread.is_empty() {
            let how = if nf.counters_read {
                "only partly"
            } else {
                "not"
            };
            return format!(
                "not identified: {} (the rule sets of this namespace could {how} be read)",
                nf.unread.join(", ")
            );
        }
        if !nf.counters_read {
            return "not identified (the rule sets of this namespace could not be read)".into();
        }
        if &*self.drop.location == "nft_do_chain" {
            return "not identified: no rule counter moved, so a chain policy or a rule without \
                    `counter` dropped it"
                .into();
        }
        "none: no DROP/REJECT rule counter moved".into()
    }

    /// The function that ran the netfilter hook, from the stack.
    fn hook_frame(&self) -> Option<String> {
        let at = self.stack.iter().position(|f| &**f == "nf_hook_slow")?;
        self.stack.get(at + 1).map(|f| f.to_string())
    }

    /// MTU of the device the packet leaves through (the route's device, else `skb->dev`).
    fn egress_mtu(&self) -> Option<u32> {
        self.drop
            .out
            .or(self.drop.dev)
            .map(|d| d.mtu)
            .filter(|&m| m > 0)
    }

    /// The MTU the kernel compares with: the route's path MTU (learned or configured), else
    /// the egress device's.
    fn path_mtu(&self) -> Option<u32> {
        self.route()
            .and_then(|r| r.mtu)
            .or_else(|| self.egress_mtu())
    }
}

/// The change key of the ruleset a rule belongs to: `nftables.inet t1` (native nft and
/// iptables-nft, whose tables live in nftables), `iptables-legacy.ip filter`.
pub fn rule_table_key(r: &crate::evidence::rules::RuleId) -> String {
    match r.engine {
        "nftables" => format!("nftables.{}", r.table),
        "iptables-nft" => format!("nftables.ip {}", r.table),
        "ip6tables-nft" => format!("nftables.ip6 {}", r.table),
        "ip6tables-legacy" => format!("iptables-legacy.ip6 {}", r.table),
        _ => format!("iptables-legacy.ip {}", r.table),
    }
}

/// Whether a packet is itself an ICMP "fragmentation needed" / ICMPv6 "packet too big".
pub fn is_frag_needed(d: &DropEvent) -> bool {
    d.flow
        .is_some_and(|f| matches!((f.proto, f.icmp), (1, Some((3, 4))) | (58, Some((2, _)))))
}

/// Link-local multicast: 224.0.0.0/24 (IGMP, routing protocols) and ff02::/16 (ND, MLD).
pub fn is_link_local_multicast(a: std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        std::net::IpAddr::V6(v6) => v6.segments()[0] == 0xff02,
    }
}

/// The kind of an ICMP error, the same words for both families.
pub fn icmp_kind(ty: u8, code: u8) -> &'static str {
    match (ty, code) {
        (3, 4) => "too_big",
        (3, 9 | 10 | 13) => "prohibited",
        (3, _) => "unreachable",
        (11, _) => "time_exceeded",
        (5, _) => "redirect",
        (12, _) => "param_problem",
        _ => "other",
    }
}

/// The kind of an ICMPv6 error (RFC 4443), in [`icmp_kind`]'s words.
pub fn icmp6_kind(ty: u8, code: u8) -> &'static str {
    match (ty, code) {
        (1, 1) => "prohibited",
        (1, _) => "unreachable",
        (2, _) => "too_big",
        (3, _) => "time_exceeded",
        (4, _) => "param_problem",
        (137, _) => "redirect",
        _ => "other",
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
        (11, 1) => "fragment reassembly time exceeded",
        (11, _) => "time exceeded",
        (12, _) => "parameter problem",
        (5, _) => "redirect",
        _ => "ICMP error",
    }
}

/// ICMPv6 error names (RFC 4443).
pub fn icmp6_name(ty: u8, code: u8) -> &'static str {
    match (ty, code) {
        (1, 0) => "no route to destination",
        (1, 1) => "administratively prohibited",
        (1, 3) => "address unreachable",
        (1, 4) => "port unreachable",
        (1, 5) => "source address failed policy",
        (1, 6) => "reject route to destination",
        (1, _) => "destination unreachable",
        (2, _) => "packet too big",
        (3, 0) => "hop limit exceeded",
        (3, 1) => "fragment reassembly time exceeded",
        (3, _) => "time exceeded",
        (4, _) => "parameter problem",
        (137, _) => "redirect",
        _ => "ICMPv6 error",
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
