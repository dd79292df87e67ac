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
    pub hint: String,
    pub benign: bool,
    /// Index of the rule that matched (for tests and `--explain`-style output).
    pub rule: usize,
    /// Attribution beyond the cause (netfilter hook, rule, engine), shown as extra fields.
    pub details: Vec<(&'static str, String)>,
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
            hint: render(&rule.fix_tpl, facts),
            benign: rule.benign,
            rule: index,
            details: Vec::new(),
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
