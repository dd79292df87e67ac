//! The kernel's BTF as the loader needs it: only the names it looks up, at their own type ids.
//!
//! aya finds the target of a `tp_btf` or fentry program by name in a parsed copy of the
//! kernel's BTF, and sends the kernel only the type id. A full parse of vmlinux's types is
//! about 15 MB (and aya's `EbpfLoader::new` makes one of its own, dropped at once by
//! [`new_loader`]). This copy keeps each type's id (one record per type) but only the
//! functions and tracepoint typedefs asked for keep their kind and name; every other type
//! becomes a nameless pointer to void. The programs carry no CO-RE relocations, so the loader
//! needs nothing else from it (were one added, loading would fail rather than guess).
use std::{collections::HashSet, path::Path};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{Btf, EbpfLoader, Endianness};

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const KIND_PTR: u32 = 2;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;

/// A loader without BTF yet. `EbpfLoader::new` parses all of `/sys/kernel/btf/vmlinux` for
/// itself; that copy is dropped here, before the reduced one is parsed, so the two are never
/// held at once (together they were the agent's peak memory). Set the reduced one with
/// `.btf(Some(..))` before loading.
pub fn new_loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

/// The loader's BTF for the kernel BTF file at `path`: the reduced copy that knows the names
/// in `keep`, or (if the file cannot be reduced) all of it.
pub fn load(path: &Path, keep: &HashSet<String>) -> Result<Btf> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read BTF at {}", path.display()))?;
    let parsed = match reduced(&raw, keep) {
        Ok(small) => Btf::parse(&small, Endianness::default()),
        Err(e) => {
            tracing::debug!("BTF not reduced for the loader ({e:#}); parsing all of it");
            Btf::parse(&raw, Endianness::default())
        }
    };
    parsed.map_err(|e| anyhow!("cannot parse BTF at {}: {e}", path.display()))
}

/// Builds the reduced copy of the raw BTF `raw` (a vmlinux BTF file, little-endian), keeping
/// the functions and typedefs named in `keep`.
pub fn reduced(raw: &[u8], keep: &HashSet<String>) -> Result<Vec<u8>> {
    ensure!(raw.len() >= HEADER_LEN, "BTF shorter than its header");
    let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
    ensure!(
        u16_at(0) == MAGIC,
        "not little-endian BTF (magic {:#x})",
        u16_at(0)
    );
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
    let types = raw
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .context("BTF type section out of bounds")?;
    let strings = raw
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .context("BTF string section out of bounds")?;
    let name_at = |off: u32| -> &[u8] {
        let s = strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };

    let mut out_types = Vec::with_capacity(type_len / 4);
    let mut out_strings = vec![0u8];
    let mut at = 0;
    while at < types.len() {
        ensure!(at + 12 <= types.len(), "truncated BTF type at byte {at}");
        let rec = &types[at..];
        let name_off = u32::from_le_bytes(rec[0..4].try_into().unwrap());
        let info = u32::from_le_bytes(rec[4..8].try_into().unwrap());
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let len = 12 + record_extra(kind, vlen)?;
        ensure!(at + len <= types.len(), "truncated BTF type at byte {at}");
        let name = name_at(name_off);
        let wanted = matches!(kind, KIND_FUNC | KIND_TYPEDEF)
            && std::str::from_utf8(name).is_ok_and(|n| keep.contains(n));
        if wanted {
            out_types.extend_from_slice(&(out_strings.len() as u32).to_le_bytes());
            out_types.extend_from_slice(&rec[4..12]);
            out_strings.extend_from_slice(name);
            out_strings.push(0);
        } else {
            out_types.extend_from_slice(&0u32.to_le_bytes());
            out_types.extend_from_slice(&(KIND_PTR << 24).to_le_bytes());
            out_types.extend_from_slice(&0u32.to_le_bytes());
        }
        at += len;
    }

    let mut out = Vec::with_capacity(HEADER_LEN + out_types.len() + out_strings.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(raw[2]); // version
    out.push(0); // flags
    for v in [
        HEADER_LEN as u32,
        0,
        out_types.len() as u32,
        out_types.len() as u32,
        out_strings.len() as u32,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&out_types);
    out.extend_from_slice(&out_strings);
    Ok(out)
}

/// Bytes that follow a type's 12-byte common part, by kind (see the kernel's btf.rst).
fn record_extra(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO
        6 | 13 => 8 * vlen,
        _ => bail!("unknown BTF kind {kind}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::btf::BtfKind;

    #[test]
    fn kept_names_have_the_ids_of_the_full_btf() {
        let raw = std::fs::read("/sys/kernel/btf/vmlinux").expect("this machine has BTF");
        let names = ["nf_hook_slow", "ip_forward", "btf_trace_kfree_skb"];
        let small = reduced(&raw, &names.iter().map(|n| n.to_string()).collect()).unwrap();
        assert!(small.len() < raw.len() / 2, "{} of {}", small.len(), raw.len());
        let full = Btf::parse(&raw, Endianness::default()).unwrap();
        let reduced = Btf::parse(&small, Endianness::default()).unwrap();
        for (name, kind) in [
            ("nf_hook_slow", BtfKind::Func),
            ("ip_forward", BtfKind::Func),
            ("btf_trace_kfree_skb", BtfKind::Typedef),
        ] {
            assert_eq!(
                reduced.id_by_type_name_kind(name, kind).unwrap(),
                full.id_by_type_name_kind(name, kind).unwrap(),
                "{name}"
            );
        }
        // Anything else is gone, so a typo cannot find a wrong type.
        assert!(reduced
            .id_by_type_name_kind("ip_rcv", BtfKind::Func)
            .is_err());
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(reduced(&[0u8; 8], &HashSet::new()).is_err());
        assert!(reduced(&[0u8; 32], &HashSet::new()).is_err());
    }
}
