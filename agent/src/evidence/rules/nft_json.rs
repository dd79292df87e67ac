//! A streaming reader of `nft -j list ...`: it walks the JSON as it arrives and keeps only the
//! rules that have a counter and a drop/reject verdict (their table, chain, handle, comment,
//! verdict, counter and simple match fields). Everything else (other rules, set elements,
//! tables, chains, whole tables read through iptables-nft) is skipped without being kept, so
//! memory stays at one rule's expressions whatever the ruleset's size.
use std::{collections::HashSet, fmt, io::Read};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{matches_matcher, Counted, RuleId, Target};

/// Reads `nft -j` output from `reader`, handing each kept rule to `keep`. Rules of the
/// `(family, table)` pairs in `skip` are passed over (their expressions are not even looked at).
/// An error means the text was not (complete) nft JSON; rules handed over before it are
/// still valid ones, but the caller should not treat the read as complete.
pub fn read(
    reader: impl Read,
    skip: &HashSet<(String, String)>,
    keep: &mut dyn FnMut(RuleId, Counted),
) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    Walk {
        skip,
        keep,
        level: Level::Root,
    }
    .deserialize(&mut de)?;
    de.end()
}

/// Reads nft JSON held in memory.
#[cfg(test)]
pub fn read_str(
    text: &str,
    skip: &HashSet<(String, String)>,
    keep: &mut dyn FnMut(RuleId, Counted),
) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_str(text);
    Walk {
        skip,
        keep,
        level: Level::Root,
    }
    .deserialize(&mut de)?;
    de.end()
}

/// The keys that matter, told apart without allocating a string per key.
enum Key {
    Nftables,
    Rule,
    Family,
    Table,
    Chain,
    Handle,
    Comment,
    Expr,
    Counter,
    Drop,
    Reject,
    Match,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "nftables" => Key::Nftables,
                    "rule" => Key::Rule,
                    "family" => Key::Family,
                    "table" => Key::Table,
                    "chain" => Key::Chain,
                    "handle" => Key::Handle,
                    "comment" => Key::Comment,
                    "expr" => Key::Expr,
                    "counter" => Key::Counter,
                    "drop" => Key::Drop,
                    "reject" => Key::Reject,
                    "match" => Key::Match,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Accepts any JSON value and ignores it, except that a map or sequence is walked with
/// `on_map` / `on_seq`: lets a visitor tolerate values of an unexpected kind.
macro_rules! ignore_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
}

/// Where the walk is: the top object, the `"nftables": [...]` array (one object per table,
/// chain, set, rule, ...), or one of its objects (`{"rule": {...}}` is read, anything else
/// skipped).
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Root,
    Items,
    Item,
}

struct Walk<'a, 'k> {
    skip: &'a HashSet<(String, String)>,
    keep: &'k mut dyn FnMut(RuleId, Counted),
    level: Level,
}

impl Walk<'_, '_> {
    fn down(&mut self, level: Level) -> Walk<'_, '_> {
        Walk {
            skip: self.skip,
            keep: &mut *self.keep,
            level,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("nft JSON output")
    }
    ignore_scalars!();
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        if self.level == Level::Items {
            while seq.next_element_seed(self.down(Level::Item))?.is_some() {}
        } else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            match (self.level, key) {
                (Level::Root, Key::Nftables) => map.next_value_seed(self.down(Level::Items))?,
                (Level::Item, Key::Rule) => {
                    if let Some((id, counted)) =
                        map.next_value_seed(RuleSeed { skip: self.skip })?
                    {
                        (self.keep)(id, counted);
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A rule object: kept when it has a counter and a drop/reject verdict and its table is not
/// skipped.
struct RuleSeed<'a> {
    skip: &'a HashSet<(String, String)>,
}

impl<'de> DeserializeSeed<'de> for RuleSeed<'_> {
    type Value = Option<(RuleId, Counted)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RuleSeed<'_> {
    type Value = Option<(RuleId, Counted)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a rule object")
    }
    ignore_scalars!();
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut family, mut table, mut chain) = (None::<Value>, None::<Value>, None::<Value>);
        let (mut handle, mut comment) = (None::<Value>, None::<Value>);
        let mut exprs = Exprs::default();
        let mut skipped = false;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Family => family = Some(map.next_value()?),
                Key::Table => table = Some(map.next_value()?),
                Key::Chain => chain = Some(map.next_value()?),
                Key::Handle => handle = Some(map.next_value()?),
                Key::Comment => comment = Some(map.next_value()?),
                Key::Expr => {
                    // nft writes family and table first: a skipped table's expressions are
                    // passed over unread.
                    let skip = match (
                        family.as_ref().and_then(Value::as_str),
                        table.as_ref().and_then(Value::as_str),
                    ) {
                        (Some(f), Some(t)) => self.skip.contains(&(f.to_string(), t.to_string())),
                        _ => false,
                    };
                    if skip {
                        skipped = true;
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        exprs = map.next_value_seed(ExprsSeed)?;
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let (Some(family), Some(table), Some(chain)) = (
            family.as_ref().and_then(Value::as_str),
            table.as_ref().and_then(Value::as_str),
            chain.as_ref().and_then(Value::as_str),
        ) else {
            return Ok(None);
        };
        if skipped || self.skip.contains(&(family.to_string(), table.to_string())) {
            return Ok(None);
        }
        let (Some(verdict), Some(packets)) = (exprs.verdict, exprs.packets) else {
            return Ok(None);
        };
        let handle = handle.as_ref().and_then(Value::as_u64).unwrap_or(0);
        let comment = comment
            .as_ref()
            .and_then(Value::as_str)
            .map(|c| format!(" comment \"{c}\""))
            .unwrap_or_default();
        let id = RuleId {
            engine: "nftables",
            table: format!("{family} {table}"),
            chain: chain.to_string(),
            text: format!("handle {handle}{comment}"),
        };
        let counted = Counted {
            verdict,
            matcher: matches_matcher(exprs.matches.iter()),
            packets,
        };
        Ok(Some((id, counted)))
    }
}

/// What a rule's expressions say: the first counter's packets, the first drop/reject, and
/// the match expressions (each small; only those of one rule are held at a time).
#[derive(Default)]
struct Exprs {
    packets: Option<u64>,
    verdict: Option<Target>,
    matches: Vec<Value>,
}

struct ExprsSeed;

impl<'de> DeserializeSeed<'de> for ExprsSeed {
    type Value = Exprs;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Exprs, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ExprsSeed {
    type Value = Exprs;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a rule's expressions")
    }
    ignore_scalars!();
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Exprs, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Exprs::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Exprs, A::Error> {
        let mut exprs = Exprs::default();
        while seq.next_element_seed(ExprSeed(&mut exprs))?.is_some() {}
        Ok(exprs)
    }
}

/// One expression: `{"counter": {...}}`, `{"drop": null}`, `{"reject": {...}}`,
/// `{"match": {...}}` are looked at, every other kind skipped.
struct ExprSeed<'a>(&'a mut Exprs);

impl<'de> DeserializeSeed<'de> for ExprSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ExprSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an expression")
    }
    ignore_scalars!();
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let e = self.0;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Counter => {
                    let c: Value = map.next_value()?;
                    if e.packets.is_none() {
                        e.packets = c["packets"].as_u64();
                    }
                }
                Key::Drop => {
                    map.next_value::<IgnoredAny>()?;
                    e.verdict.get_or_insert(Target::Drop);
                }
                Key::Reject => {
                    let r: Value = map.next_value()?;
                    let with = match (r["type"].as_str(), r["expr"].as_str()) {
                        (Some("tcp reset"), _) => "tcp-reset".to_string(),
                        (_, Some(code)) => code.to_string(),
                        _ => "icmp-port-unreachable".to_string(),
                    };
                    e.verdict.get_or_insert(Target::Reject(with));
                }
                Key::Match => e.matches.push(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}
