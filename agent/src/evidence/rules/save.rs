//! `iptables-save -c` read line by line: the DROP/REJECT rules and DROP chain policies, with
//! their packet counters. Any other line is passed over after a look at its first bytes and
//! its target, so a ruleset of tens of thousands of NAT rules costs no memory.
use std::collections::HashMap;

use super::{iptables_matcher, Counted, RuleId, Target};

/// A parser fed one line at a time.
pub struct SaveParser {
    engine: &'static str,
    table: String,
    /// The tables the output listed (`*filter`), in order.
    pub tables: Vec<String>,
    /// The chain of the last rule line and how many rules it had so far (the tools print
    /// each chain's rules together, in order).
    chain: String,
    place: usize,
    /// Lengths of the chains that have a kept rule: (table, chain).
    lengths: HashMap<(String, String), usize>,
    /// Whether the current chain has a kept rule.
    chain_kept: bool,
}

/// A DROP/REJECT rule or DROP policy the output listed.
pub struct Kept {
    pub id: RuleId,
    pub counted: Counted,
    /// Its place in its chain (0 first), for rules; `None` for a policy.
    pub index: Option<usize>,
}

impl SaveParser {
    pub fn new(engine: &'static str) -> Self {
        SaveParser {
            engine,
            table: String::new(),
            tables: Vec::new(),
            chain: String::new(),
            place: 0,
            lengths: HashMap::new(),
            chain_kept: false,
        }
    }

    /// Notes the length of the chain just finished, if it has a kept rule.
    fn end_chain(&mut self) {
        if self.chain_kept {
            self.lengths
                .insert((self.table.clone(), self.chain.clone()), self.place);
        }
        self.chain.clear();
        self.place = 0;
        self.chain_kept = false;
    }

    /// Reads one line (without its newline); returns the rule it keeps, if any.
    pub fn line(&mut self, line: &str) -> Option<Kept> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match line.as_bytes().first()? {
            b'*' => {
                self.end_chain();
                self.table = line[1..].trim().to_string();
                self.tables.push(self.table.clone());
                None
            }
            b':' => self.policy(&line[1..]).map(|(id, counted)| Kept {
                id,
                counted,
                index: None,
            }),
            b'[' => {
                // Every rule counts for the place of the next one in its chain.
                let chain = line.split_whitespace().nth(2).unwrap_or("");
                if chain != self.chain {
                    self.end_chain();
                    self.chain.push_str(chain);
                }
                let index = self.place;
                self.place += 1;
                let kept = self.rule(line).map(|(id, counted)| Kept {
                    id,
                    counted,
                    index: Some(index),
                });
                self.chain_kept |= kept.is_some();
                kept
            }
            _ => None,
        }
    }

    /// How many rules a chain with a kept rule listed (0 for any other chain).
    pub fn chain_len(&self, table: &str, chain: &str) -> usize {
        if self.chain_kept && table == self.table && chain == self.chain {
            return self.place;
        }
        self.lengths
            .get(&(table.to_string(), chain.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// ":FORWARD DROP [5:300]"
    fn policy(&self, policy: &str) -> Option<(RuleId, Counted)> {
        let mut it = policy.split_whitespace();
        let (chain, target, counts) = (it.next()?, it.next()?, it.next()?);
        let verdict = verdict_of_target(target, "")?;
        let packets = packets_of(counts)?;
        let id = RuleId {
            engine: self.engine,
            table: self.table.clone(),
            chain: chain.into(),
            text: format!("policy {target}"),
        };
        Some((
            id,
            Counted {
                verdict,
                matcher: Default::default(),
                packets,
            },
        ))
    }

    /// "[2:120] -A FORWARD -p tcp ... -j REJECT --reject-with tcp-reset"
    fn rule(&self, line: &str) -> Option<(RuleId, Counted)> {
        let (counts, rule) = line.split_once(' ')?;
        // The target is printed last, with its options after it: find the last " -j ".
        let at = rule.rfind(" -j ")?;
        let mut target_words = rule[at + 4..].split_whitespace();
        let target = target_words.next()?;
        if target != "DROP" && target != "REJECT" {
            return None;
        }
        let with = rule[at..]
            .split("--reject-with ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .unwrap_or("");
        let verdict = verdict_of_target(target, with)?;
        let packets = packets_of(counts)?;
        let chain = rule.split_whitespace().nth(1).unwrap_or("").to_string();
        let id = RuleId {
            engine: self.engine,
            table: self.table.clone(),
            chain,
            text: rule.to_string(),
        };
        Some((
            id,
            Counted {
                verdict,
                matcher: iptables_matcher(rule),
                packets,
            },
        ))
    }
}

pub(super) fn verdict_of_target(target: &str, with: &str) -> Option<Target> {
    match target {
        "DROP" => Some(Target::Drop),
        "REJECT" => Some(Target::Reject(if with.is_empty() {
            "icmp-port-unreachable".into()
        } else {
            with.into()
        })),
        _ => None,
    }
}

fn packets_of(counts: &str) -> Option<u64> {
    counts
        .trim_start_matches('[')
        .split(':')
        .next()?
        .parse()
        .ok()
}
