//! Shared pieces of the property tests (`prop_*`) of everything dropscope parses from outside
//! the process: the case count, and generators of hostile input (garbage bytes and text,
//! mutations of real samples, JSON trees made of the words the parsers look for).
use proptest::{prelude::*, sample::Index, test_runner::Config};

/// Cases per property: 64 by default, so the unit suite stays fast; `PROPTEST_CASES=100000`
/// for a long run. Failures are not written to files: a failing input found once is kept as
/// a regular unit test beside the parser.
pub fn config() -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c.failure_persistence = None;
    c
}

/// Arbitrary bytes, up to `max` of them.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

/// Short pieces of text of every kind: printable ASCII, separators parsers split on, any
/// Unicode (multi-byte characters catch slicing at byte offsets).
pub fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,12}",
        "[ \t\n:;,/\\[\\]{}()*_.=-]{0,6}",
        "[0-9a-fA-F]{1,20}",
        any::<String>().prop_map(|s| s.chars().take(8).collect()),
        Just("é".to_string()),
        Just("\u{1F600}".to_string()),
        Just("\r\n".to_string()),
        Just("\0".to_string()),
    ]
}

/// Text made of lines of junk.
pub fn lines() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::collection::vec(junk(), 0..6), 0..12).prop_map(|lines| {
        lines
            .into_iter()
            .map(|l| l.concat())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Any text a parser may be handed: junk lines or arbitrary Unicode.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![lines(), any::<String>()]
}

/// Any IPv4 or IPv6 address, or one of `known` (the addresses of a sample).
pub fn addr(known: &'static [&'static str]) -> impl Strategy<Value = std::net::IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u8; 16]>().prop_map(std::net::IpAddr::from),
        prop::sample::select(known).prop_map(|a| a.parse().expect("an address")),
    ]
}

/// The largest char boundary of `s` at or below `i`.
fn floor(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `seed` with a few random edits: truncated, junk inserted, a range cut out, a line
/// duplicated, a junk line added.
pub fn mutated(seed: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec((any::<Index>(), any::<Index>(), 0u8..5, junk()), 0..6).prop_map(
        move |edits| {
            let mut s = seed.to_string();
            for (a, b, kind, junk) in edits {
                let i = floor(&s, a.index(s.len() + 1));
                match kind {
                    0 => s.truncate(i),
                    1 => s.insert_str(i, &junk),
                    2 => {
                        let j = floor(&s, i + b.index(64));
                        s.replace_range(i..j, "");
                    }
                    3 => {
                        let lines: Vec<&str> = s.lines().collect();
                        if !lines.is_empty() {
                            let line = lines[b.index(lines.len())].to_string();
                            s.insert_str(i, &format!("{line}\n"));
                        }
                    }
                    _ => s.insert_str(i, &format!("\n{junk}\n")),
                }
            }
            s
        },
    )
}

/// `seed` with a few random byte edits: truncated, bytes flipped, bytes inserted.
pub fn mutated_bytes(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<Index>(), 0u8..3, any::<u8>()), 0..8).prop_map(move |edits| {
        let mut v = seed.clone();
        for (at, kind, byte) in edits {
            let i = at.index(v.len() + 1);
            match kind {
                0 => v.truncate(i),
                1 if i < v.len() => v[i] ^= byte | 1,
                _ => v.insert(i, byte),
            }
        }
        v
    })
}

/// JSON trees whose keys and strings are mostly `words` (the names a parser looks up), so
/// that random values reach its deeper paths, with numbers of every size and sign.
pub fn json(words: &'static [&'static str]) -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let word = prop_oneof![
        4 => prop::sample::select(words).prop_map(str::to_string),
        1 => junk(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..70000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word.clone().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((word.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `seed` with random subtrees replaced by random JSON made of `words`.
pub fn mutated_json(
    seed: &'static str,
    words: &'static [&'static str],
) -> impl Strategy<Value = serde_json::Value> {
    let seed: serde_json::Value = serde_json::from_str(seed).expect("seed is JSON");
    prop::collection::vec((any::<u64>(), json(words)), 0..4).prop_map(move |edits| {
        let mut v = seed.clone();
        for (pick, with) in edits {
            replace_nth(&mut v, pick, with);
        }
        v
    })
}

/// Replaces the node at position `pick` (modulo the node count, depth-first) with `with`.
fn replace_nth(v: &mut serde_json::Value, pick: u64, with: serde_json::Value) {
    fn count(v: &serde_json::Value) -> u64 {
        1 + match v {
            serde_json::Value::Array(a) => a.iter().map(count).sum(),
            serde_json::Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut serde_json::Value, n: &mut u64, with: &mut Option<serde_json::Value>) {
        if *n == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return;
        }
        *n -= 1;
        match v {
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, n, with)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| walk(x, n, with)),
            _ => {}
        }
    }
    let mut n = pick % count(v);
    walk(v, &mut n, &mut Some(with));
}
