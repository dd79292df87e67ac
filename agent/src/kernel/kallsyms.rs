//! Kernel addresses -> function names, from /proc/kallsyms.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
    sync::Arc,
};

use anyhow::{Context, Result};

/// A sorted table of kernel text symbols, stored compactly (one string buffer, fixed-size
/// entries: ~2 MB for 120k symbols instead of one allocation each).
pub struct Kallsyms {
    /// (address, offset of the name in `names`, name length), sorted by address.
    syms: Vec<(u64, u32, u16)>,
    names: String,
    /// Names already handed out, so each location is one shared string.
    cache: HashMap<u64, Arc<str>>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`. Fails with a hint when addresses are hidden (kptr_restrict).
    pub fn load() -> Result<Self> {
        // Line by line: the whole text (several MB) would be held next to the table.
        let file = fs::File::open("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let mut failed = None;
        let k = Self::parse_lines(BufReader::new(file).lines().map_while(|l| match l {
            Ok(line) => Some(line),
            Err(e) => {
                failed = Some(e);
                None
            }
        }));
        if let Some(e) = failed {
            return Err(e).context("reading /proc/kallsyms");
        }
        if k.syms.is_empty() {
            anyhow::bail!(
                "/proc/kallsyms shows no addresses (kernel.kptr_restrict); drop locations will be raw"
            );
        }
        Ok(k)
    }

    /// Parses kallsyms text: `ADDR TYPE NAME [MODULE]`, keeping text symbols only.
    #[cfg(test)]
    pub fn parse(text: &str) -> Self {
        Self::parse_lines(text.lines())
    }

    fn parse_lines<S: AsRef<str>>(lines: impl Iterator<Item = S>) -> Self {
        let mut syms = Vec::new();
        let mut names = String::new();
        for line in lines {
            let line = line.as_ref();
            let mut it = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr == 0 || !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            // Offsets and lengths are stored in 32 and 16 bits: a longer name is cut (at a
            // character), a table past 4 GiB ends there.
            let mut name = clean(name);
            let mut len = name.len().min(u16::MAX as usize);
            while !name.is_char_boundary(len) {
                len -= 1;
            }
            name = &name[..len];
            let Ok(at) = u32::try_from(names.len()) else {
                break;
            };
            syms.push((addr, at, len as u16));
            names.push_str(name);
        }
        syms.sort_by_key(|(a, _, _)| *a);
        syms.shrink_to_fit();
        names.shrink_to_fit();
        Kallsyms {
            syms,
            names,
            cache: HashMap::new(),
        }
    }

    /// An empty table: every address stays raw.
    pub fn empty() -> Self {
        Kallsyms {
            syms: Vec::new(),
            names: String::new(),
            cache: HashMap::new(),
        }
    }

    /// The function containing `addr` (suffixes like `.constprop.0` removed), or the raw address.
    pub fn resolve(&mut self, addr: u64) -> Arc<str> {
        if let Some(name) = self.cache.get(&addr) {
            return name.clone();
        }
        let idx = self.syms.partition_point(|(a, _, _)| *a <= addr);
        let name: Arc<str> = match idx.checked_sub(1).map(|i| self.syms[i]) {
            Some((_, at, len)) => Arc::from(&self.names[at as usize..at as usize + len as usize]),
            None => Arc::from(format!("0x{addr:x}")),
        };
        if self.cache.len() < 65_536 {
            self.cache.insert(addr, name.clone());
        }
        name
    }

    /// `[start, end)` of the code of function `name` (suffixes ignored; the first such symbol):
    /// from its address to the next symbol's.
    pub fn range(&self, name: &str) -> Option<(u64, u64)> {
        let i = self.syms.iter().position(|&(_, at, len)| {
            &self.names[at as usize..at as usize + len as usize] == name
        })?;
        let start = self.syms[i].0;
        let end = self.syms[i + 1..]
            .iter()
            .map(|s| s.0)
            .find(|&a| a > start)?;
        Some((start, end))
    }

    /// Function names of a stack, innermost first.
    pub fn frames(&mut self, ips: impl IntoIterator<Item = u64>) -> Vec<Arc<str>> {
        ips.into_iter().map(|ip| self.resolve(ip)).collect()
    }
}

/// Strips compiler-generated suffixes: `ip_rcv_finish_core.isra.0` -> `ip_rcv_finish_core`.
pub fn clean(name: &str) -> &str {
    name.split_once('.').map_or(name, |(base, _)| base)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81a00000 t ip_rcv_finish_core.isra.0
ffffffff81a00400 T ip_error
ffffffff81a00800 d some_data
ffffffff81a00900 t nft_do_chain\t[nf_tables]
";

    #[test]
    fn resolves_inside_functions_and_strips_suffixes() {
        let mut k = Kallsyms::parse(SAMPLE);
        assert_eq!(&*k.resolve(0xffffffff81a00010), "ip_rcv_finish_core");
        assert_eq!(&*k.resolve(0xffffffff81a00400), "ip_error");
        // Data symbols are not functions: the address still belongs to ip_error.
        assert_eq!(&*k.resolve(0xffffffff81a00850), "ip_error");
        assert_eq!(&*k.resolve(0xffffffff81a00901), "nft_do_chain");
        assert_eq!(&*k.resolve(0x10), "0x10");
        assert_eq!(
            k.range("ip_rcv_finish_core"),
            Some((0xffffffff81a00000, 0xffffffff81a00400))
        );
        assert_eq!(k.range("nft_do_chain"), None, "no symbol after it: no end");
        assert_eq!(
            k.frames([0xffffffff81a00410, 0xffffffff81a00010]),
            vec![Arc::from("ip_error"), Arc::from("ip_rcv_finish_core")]
        );
    }

    #[test]
    fn reads_this_machines_kallsyms() {
        let mut k = Kallsyms::load().expect("kallsyms readable as root");
        let text = fs::read_to_string("/proc/kallsyms").unwrap();
        let line = text
            .lines()
            .find(|l| l.ends_with(" T ip_rcv"))
            .expect("ip_rcv symbol");
        let addr = u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap();
        assert_eq!(&*k.resolve(addr + 1), "ip_rcv");
    }

    #[test]
    fn a_name_longer_than_the_length_field_is_cut_at_a_character() {
        // The stored length is 16 bits: a longer name was cut inside 'é' and resolving it
        // panicked.
        let name = format!("{}é", "a".repeat(u16::MAX as usize - 1));
        let mut k = Kallsyms::parse(&format!("ffffffff81000000 T {name}\n"));
        let got = k.resolve(0xffffffff81000001);
        assert!(name.starts_with(&*got) && got.len() <= u16::MAX as usize);
        assert_eq!(k.range(&got), None);
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const SAMPLE: &str = include_str!("../../testdata/kallsyms.txt");

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(
                text in fuzz::text(),
                addrs in prop::collection::vec(any::<u64>(), 0..8),
            ) {
                let mut k = Kallsyms::parse(&text);
                k.frames(addrs);
                for name in text.split_whitespace().take(8) {
                    k.range(name);
                }
            }

            #[test]
            fn prop_mutated_real_kallsyms_never_panics(
                text in fuzz::mutated(SAMPLE),
                addrs in prop::collection::vec(0xffffffff81000000u64..0xffffffff83000000, 0..8),
            ) {
                let mut k = Kallsyms::parse(&text);
                k.frames(addrs);
                k.range("ip_rcv");
            }

            #[test]
            fn prop_an_address_resolves_to_the_function_containing_it(
                syms in prop::collection::btree_map(
                    1u64..u64::MAX / 2,
                    ("[a-z_][a-z0-9_]{0,20}", prop::sample::select(&["T", "t", "W", "d", "D", "r"][..])),
                    1..20,
                ),
                shuffle in any::<u64>(),
                probe in any::<prop::sample::Index>(),
                offset in 0u64..4096,
            ) {
                // Written in any order, with module suffixes and compiler suffixes.
                let mut lines: Vec<String> = syms
                    .iter()
                    .map(|(a, (n, k))| format!("{a:016x} {k} {n}.isra.0\t[mod]"))
                    .collect();
                let by = (shuffle % lines.len() as u64) as usize;
                lines.rotate_left(by);
                let mut k = Kallsyms::parse(&lines.join("\n"));
                let text: Vec<(u64, &str)> = syms
                    .iter()
                    .filter(|(_, (_, k))| matches!(*k, "T" | "t" | "W"))
                    .map(|(a, (n, _))| (*a, n.as_str()))
                    .collect();
                let (&addr, _) = syms.iter().nth(probe.index(syms.len())).unwrap();
                let at = addr + offset;
                let want = text
                    .iter()
                    .rev()
                    .find(|(a, _)| *a <= at)
                    .map_or(format!("0x{at:x}"), |(_, n)| n.to_string());
                prop_assert_eq!(&*k.resolve(at), want.as_str());
            }
        }
    }
}
