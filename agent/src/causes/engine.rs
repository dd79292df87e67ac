//! Applies the cause table to a drop: first matching rule wins.
use super::{
    facts::Facts,
    table::{Cause, Piece, Rule, Table},
};

/// The table, ready to classify.
pub struct Engine {
    table: Table,
}

/// The answer for one drop.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub cause: String,
    pub title: String,
    pub evidence: String,
    pub fix: String,
    /// Normal operation or not a drop at all: counted, shown only with `--all`.
    pub benign: bool,
    /// Index of the rule that matched (for tests and `--explain`-style output).
    pub rule: usize,
    /// Attribution beyond the cause (netfilter hook, rule, route, ...).
    pub attribution: Attribution,
}

/// What dropscope found out about a drop besides its cause, each part only when known.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    /// Netfilter hook (prerouting, input, forward, output, postrouting, bridge, ...).
    pub hook: Option<&'static str>,
    /// Where the hook came from: "probe" (nf_hook_slow) or "stack".
    pub hook_from: Option<&'static str>,
    /// Netfilter engine (nftables, iptables-legacy, a netfilter module).
    pub engine: Option<String>,
    /// The firewall rule whose counter moved with the drop.
    pub rule: Option<String>,
    /// Netfilter family (ipv4, ipv6, inet, bridge, arp, netdev).
    pub nf_family: Option<&'static str>,
    /// An IP hook ran for a bridged frame (br_netfilter).
    pub nf_bridged: bool,
    /// nftables table and base chain from the ruleset probe.
    pub nf_table: Option<String>,
    pub nf_chain: Option<String>,
    /// The route the kernel's lookup gave for the packet.
    pub route: Option<String>,
    /// The path MTU of that route, when it has one.
    pub path_mtu: Option<u32>,
    /// The tunnel device that sent the packet.
    pub tunnel: Option<String>,
    /// Kernel counters that moved in the namespace with the drop.
    pub counters: Vec<(String, u64)>,
    /// Stack frames, for drops no rule of the table knows.
    pub stack: Option<String>,
    /// The latest configuration change, in the drop's namespace and before it, to a setting
    /// its cause depends on.
    pub change: Option<std::sync::Arc<crate::changes::Change>>,
}

impl Engine {
    pub fn new(table: Table) -> Self {
        Engine { table }
    }

    pub fn builtin() -> Self {
        Self::new(Table::builtin())
    }

    /// Every cause id with its description, in table order of first use.
    pub fn causes(&self) -> impl Iterator<Item = (&String, &Cause)> {
        self.table.cause.iter()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.table.rule
    }

    /// The change keys a cause depends on (see [`Cause::changes`]).
    pub fn change_patterns(&self, cause: &str) -> &[String] {
        self.table
            .cause
            .get(cause)
            .map_or(&[], |c| c.changes.as_slice())
    }

    /// Classifies one drop.
    pub fn classify(&self, facts: &Facts) -> Verdict {
        let d = facts.drop;
        let (index, rule) = self
            .table
            .rule
            .iter()
            .enumerate()
            .find(|(_, r)| {
                r.reason.allows(&d.reason)
                    && r.at.allows(&d.location)
                    && r.when
                        .iter()
                        .all(|(fact, want)| facts.get(fact).is_some_and(|v| v.matches(want)))
            })
            .expect("the last rule matches everything");
        let cause = &self.table.cause[&rule.cause];
        Verdict {
            cause: rule.cause.clone(),
            title: cause.title.clone(),
            evidence: render(&rule.evidence_tpl, facts),
            fix: render(&rule.fix_tpl, facts),
            benign: rule.benign,
            rule: index,
            attribution: Attribution::default(),
        }
    }
}

/// Fills placeholders; unknown values print as "?" so a missing fact is visible, not invented.
pub fn render(pieces: &[Piece], facts: &Facts) -> String {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Fact(name) => match facts.get(name) {
                Some(v) => out.push_str(&v.to_string()),
                None => out.push('?'),
            },
        }
    }
    out
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
