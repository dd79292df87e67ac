//! The cause table as data: parsed from `rules.toml` (compiled in) and validated at start-up,
//! so a typo in a fact or cause name is a test failure, not a silent mismatch.
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::facts::{CONDITION_FACTS, PLACEHOLDERS};

/// The table shipped with dropscope.
pub const BUILTIN: &str = include_str!("rules.toml");

/// A cause as the operator reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cause {
    pub title: String,
    pub meaning: String,
    /// The configuration changes this cause depends on, as change keys (`*` matches any run
    /// of characters; `{ifname}`, `{in_ifname}`, `{out_ifname}`, `{tunnel_dev}` are filled
    /// from the drop, `{rule_table}` with the ruleset of the dropping rule; `a|b` takes the
    /// first alternative that can be filled). The latest such change before a drop, in its
    /// namespace, is named in its evidence.
    #[serde(default)]
    pub changes: Vec<String>,
}

/// One or several strings (TOML allows either for `reason` and `at`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    Any,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// Whether `value` is allowed (an absent list allows everything). A pattern ending in
    /// `*` allows every value that starts with what precedes it (`unix_*`).
    pub fn allows(&self, value: &str) -> bool {
        let is = |pattern: &str| match pattern.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => pattern == value,
        };
        match self {
            OneOrMany::Any => true,
            OneOrMany::One(v) => is(v),
            OneOrMany::Many(vs) => vs.iter().any(|v| is(v)),
        }
    }

    pub fn values(&self) -> Vec<&str> {
        match self {
            OneOrMany::Any => vec![],
            OneOrMany::One(v) => vec![v.as_str()],
            OneOrMany::Many(vs) => vs.iter().map(String::as_str).collect(),
        }
    }
}

/// A text with `{fact}` placeholders, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Fact(String),
}

/// One row: signal -> cause -> evidence -> fix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub cause: String,
    #[serde(default)]
    pub reason: OneOrMany,
    #[serde(default)]
    pub at: OneOrMany,
    #[serde(default)]
    pub when: BTreeMap<String, toml::Value>,
    pub evidence: String,
    pub fix: String,
    #[serde(default)]
    pub benign: bool,
    #[serde(skip)]
    pub evidence_tpl: Vec<Piece>,
    #[serde(skip)]
    pub fix_tpl: Vec<Piece>,
}

/// The whole table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub cause: BTreeMap<String, Cause>,
    pub rule: Vec<Rule>,
}

impl Table {
    /// Parses and validates a table.
    pub fn parse(text: &str) -> Result<Self> {
        let mut table: Table = toml::from_str(text).context("cause table is not valid TOML")?;
        for (id, cause) in &table.cause {
            for pattern in &cause.changes {
                for name in placeholders(pattern) {
                    if !CHANGE_PLACEHOLDERS.contains(&name) {
                        bail!("cause {id}: unknown placeholder {{{name}}} in changes");
                    }
                }
            }
        }
        for (i, rule) in table.rule.iter_mut().enumerate() {
            let at = || format!("rule {} (cause {})", i + 1, rule.cause);
            if !table.cause.contains_key(&rule.cause) {
                bail!("{}: unknown cause id", at());
            }
            for (fact, value) in &rule.when {
                if !CONDITION_FACTS.contains(&fact.as_str()) {
                    bail!("{}: unknown fact '{fact}' in when", at());
                }
                let ok = match value {
                    toml::Value::Array(vs) => vs.iter().all(is_scalar),
                    v => is_scalar(v),
                };
                if !ok {
                    bail!(
                        "{}: when.{fact} must be a string, number, boolean or a list of them",
                        at()
                    );
                }
            }
            rule.evidence_tpl = split(&rule.evidence).with_context(at)?;
            rule.fix_tpl = split(&rule.fix).with_context(at)?;
        }
        match table.rule.last() {
            Some(r)
                if matches!(r.reason, OneOrMany::Any)
                    && r.when.is_empty()
                    && matches!(r.at, OneOrMany::Any) => {}
            _ => bail!("the last rule must match everything (the unclassified fallback)"),
        }
        Ok(table)
    }

    /// The table compiled into dropscope.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN).expect("built-in cause table is valid (checked by tests)")
    }
}

/// Placeholders a cause's change keys may use: the devices of the drop.
pub const CHANGE_PLACEHOLDERS: &[&str] = &[
    "ifname",
    "in_ifname",
    "out_ifname",
    "tunnel_dev",
    "rule_table",
];

/// The `{name}`s of a text.
fn placeholders(text: &str) -> Vec<&str> {
    text.split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(n, _)| n))
        .collect()
}

fn is_scalar(v: &toml::Value) -> bool {
    matches!(
        v,
        toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Boolean(_)
    )
}

/// Splits "a {x} b" into text and placeholder pieces, rejecting unknown placeholders.
pub fn split(template: &str) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .context("unclosed '{' in template")?;
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let name = &rest[open + 1..close];
        if !PLACEHOLDERS.contains(&name) && !CONDITION_FACTS.contains(&name) {
            bail!("unknown placeholder {{{name}}}");
        }
        pieces.push(Piece::Fact(name.to_string()));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_is_valid_and_every_cause_has_a_rule() {
        let t = Table::parse(BUILTIN).unwrap();
        for id in t.cause.keys() {
            assert!(
                t.rule.iter().any(|r| &r.cause == id),
                "cause {id} has no rule"
            );
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{id} is not snake_case"
            );
        }
    }

    #[test]
    fn typos_are_caught() {
        let base = "[cause.x]\ntitle='t'\nmeaning='m'\n";
        let bad_fact = format!(
            "{base}[[rule]]\ncause='x'\nwhen={{ dev_fowarding = 0 }}\nevidence='e'\nfix='f'\n"
        );
        assert!(Table::parse(&bad_fact)
            .unwrap_err()
            .to_string()
            .contains("dev_fowarding"));
        let bad_cause = format!("{base}[[rule]]\ncause='y'\nevidence='e'\nfix='f'\n");
        assert!(Table::parse(&bad_cause)
            .unwrap_err()
            .to_string()
            .contains("unknown cause"));
        let bad_placeholder =
            format!("{base}[[rule]]\ncause='x'\nevidence='{{ifnmae}}'\nfix='f'\n");
        assert!(format!("{:#}", Table::parse(&bad_placeholder).unwrap_err()).contains("ifnmae"));
        let no_fallback =
            format!("{base}[[rule]]\ncause='x'\nreason='NO_SOCKET'\nevidence='e'\nfix='f'\n");
        assert!(Table::parse(&no_fallback)
            .unwrap_err()
            .to_string()
            .contains("last rule"));
    }

    #[test]
    fn a_trailing_star_matches_a_prefix() {
        let at = OneOrMany::Many(vec!["unix_*".into(), "ip_error".into()]);
        assert!(at.allows("unix_stream_connect") && at.allows("ip_error"));
        assert!(!at.allows("ip_error_x") && !at.allows("__unix_gc"));
    }

    #[test]
    fn templates_split_into_pieces() {
        assert_eq!(
            split("a {ifname} b").unwrap(),
            vec![
                Piece::Text("a ".into()),
                Piece::Fact("ifname".into()),
                Piece::Text(" b".into())
            ]
        );
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        /// Keys and values the table uses, for mutations that stay close to a table.
        const WORDS: &[&str] = &[
            "cause",
            "rule",
            "title",
            "meaning",
            "changes",
            "reason",
            "at",
            "when",
            "evidence",
            "fix",
            "benign",
            "{ifname}",
            "{nope}",
            "{",
            "}",
            "forwarding_disabled",
            "NO_SOCKET",
            "dev_forwarding",
            "*",
            "x",
        ];

        /// A TOML value made of the table's words.
        fn toml_value() -> impl Strategy<Value = toml::Value> {
            fuzz::json(WORDS).prop_map(|j| {
                // JSON null has no TOML form: drop it; everything else converts.
                fn conv(j: serde_json::Value) -> Option<toml::Value> {
                    Some(match j {
                        serde_json::Value::Null => return None,
                        serde_json::Value::Bool(b) => toml::Value::Boolean(b),
                        serde_json::Value::Number(n) => match n.as_i64() {
                            Some(i) => toml::Value::Integer(i),
                            None => toml::Value::Float(n.as_f64().unwrap_or(0.0)),
                        },
                        serde_json::Value::String(s) => toml::Value::String(s),
                        serde_json::Value::Array(a) => {
                            toml::Value::Array(a.into_iter().filter_map(conv).collect())
                        }
                        serde_json::Value::Object(o) => toml::Value::Table(
                            o.into_iter()
                                .filter_map(|(k, v)| Some((k, conv(v)?)))
                                .collect(),
                        ),
                    })
                }
                conv(j).unwrap_or(toml::Value::Boolean(true))
            })
        }

        /// A valid table of a few of the built-in rules (the whole one is slow to parse in a
        /// debug build): the first ones, the fallback, and their causes.
        fn small_table() -> toml::Table {
            static SMALL: std::sync::LazyLock<toml::Table> = std::sync::LazyLock::new(|| {
                let mut t: toml::Table = toml::from_str(BUILTIN).unwrap();
                let rules = t["rule"].as_array().unwrap();
                let kept: Vec<toml::Value> =
                    rules[..4].iter().chain(rules.last()).cloned().collect();
                let used: Vec<&str> = kept.iter().map(|r| r["cause"].as_str().unwrap()).collect();
                let causes: toml::Table = t["cause"]
                    .as_table()
                    .unwrap()
                    .iter()
                    .filter(|(id, _)| used.contains(&id.as_str()))
                    .map(|(id, c)| (id.clone(), c.clone()))
                    .collect();
                t.insert("rule".into(), toml::Value::Array(kept));
                t.insert("cause".into(), toml::Value::Table(causes));
                Table::parse(&toml::to_string(&t).unwrap()).expect("a valid small table");
                t
            });
            SMALL.clone()
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_is_an_error_not_a_panic(text in fuzz::text()) {
                prop_assert!(Table::parse(&text).is_err());
                let _ = split(&text);
                placeholders(&text);
            }

            #[test]
            fn prop_a_mutated_table_never_panics(text in fuzz::mutated(BUILTIN)) {
                let _ = Table::parse(&text);
            }

            #[test]
            fn prop_a_table_with_values_replaced_never_panics(
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), toml_value()), 1..4),
            ) {
                let mut table = small_table();
                for (at, key, value) in edits {
                    // Into one rule or one cause: a field replaced, or a new one.
                    let section = if at.index(2) == 0 { "rule" } else { "cause" };
                    let entry = match &mut table[section] {
                        toml::Value::Array(rules) => {
                            let i = at.index(rules.len());
                            &mut rules[i]
                        }
                        toml::Value::Table(causes) => {
                            let i = at.index(causes.len());
                            causes.iter_mut().nth(i).unwrap().1
                        }
                        _ => unreachable!(),
                    };
                    if let toml::Value::Table(t) = entry {
                        let name = WORDS[key.index(WORDS.len())].to_string();
                        t.insert(name, value);
                    }
                }
                let _ = Table::parse(&toml::to_string(&table).unwrap());
            }
        }
    }

    #[test]
    fn deeply_nested_toml_is_an_error() {
        for open in ["[", "{a="] {
            let text = format!("x = {}", open.repeat(100_000));
            assert!(Table::parse(&text).is_err());
        }
    }
}
