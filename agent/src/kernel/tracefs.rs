//! tracefs: where it is, mounting it when asked, and tracepoint field layouts.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The mounted tracefs, if any.
pub fn find() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// The mounted tracefs, mounting it at /sys/kernel/tracing when it is not.
pub fn find_or_mount() -> Result<PathBuf> {
    if let Some(p) = find() {
        return Ok(p);
    }
    let target = Path::new(CANDIDATES[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "tracefs is not mounted and mounting it failed; run: mount -t tracefs tracefs {}",
            target.display()
        )
    })?;
    match find() {
        Some(p) => Ok(p),
        None => bail!(
            "tracefs mounted at {} but has no events/ directory",
            target.display()
        ),
    }
}

/// A tracepoint field: byte offset and size within the raw record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Field layout of `events/<category>/<name>/format`.
pub fn fields(root: &Path, category: &str, name: &str) -> Result<HashMap<String, Field>> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_format(&text))
}

/// Parses `field:TYPE NAME;    offset:N;    size:N;    signed:N;` lines.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let (mut offset, mut size) = (None, None);
        // Only parts ended by ';': a line cut short must not give a cut number.
        let terminated = line.rsplit_once(';').map_or("", |(parts, _)| parts);
        for part in terminated.split(';').map(str::trim) {
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) {
            // "unsigned char saddr[4]" -> "saddr"
            let name = decl.rsplit(' ').next().unwrap_or(decl);
            let name = name
                .split('[')
                .next()
                .unwrap_or(name)
                .trim_start_matches('*');
            out.insert(name.to_string(), Field { offset, size });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_6_18_kfree_skb_layout() {
        let fmt = "name: kfree_skb\nID: 2310\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:const void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:40;\tsize:4;\tsigned:0;\n";
        let f = parse_format(fmt);
        assert_eq!(f["skbaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["reason"],
            Field {
                offset: 36,
                size: 4
            }
        );
        assert_eq!(
            f["saddr"],
            Field {
                offset: 40,
                size: 4
            }
        );
    }

    #[test]
    fn the_6_1_layout_has_reason_at_28() {
        let fmt = "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n";
        assert_eq!(parse_format(fmt)["reason"].offset, 28);
    }

    #[test]
    fn a_line_cut_inside_a_number_gives_no_field() {
        // Cut from "size:16;": "size:1" is not the size.
        let fmt = "\tfield:char name[16];\toffset:8;\tsize:1";
        assert_eq!(parse_format(fmt).get("name"), None);
        let fmt = "\tfield:char name[16];\toffset:8;\tsize:16;";
        assert_eq!(
            parse_format(fmt)["name"],
            Field {
                offset: 8,
                size: 16
            }
        );
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const KFREE_SKB: &str = include_str!("../../testdata/kfree_skb.format");
        const SETSOCKOPT: &str = include_str!("../../testdata/sys_enter_setsockopt.format");

        /// A format file with the given fields, laid out as tracefs prints them.
        fn format(fields: &[(String, u32, u32)]) -> String {
            let mut text = "name: x\nID: 1\nformat:\n".to_string();
            for (name, offset, size) in fields {
                text.push_str(&format!(
                    "\tfield:unsigned long {name};\toffset:{offset};\tsize:{size};\tsigned:0;\n"
                ));
            }
            text + "\nprint fmt: \"x=%lu\", REC->x\n"
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text()) {
                parse_format(&text);
            }

            #[test]
            fn prop_mutated_real_formats_never_panic(
                a in fuzz::mutated(KFREE_SKB),
                b in fuzz::mutated(SETSOCKOPT),
            ) {
                parse_format(&a);
                parse_format(&b);
            }

            #[test]
            fn prop_fields_read_back_and_a_truncated_file_gives_no_wrong_field(
                fields in prop::collection::btree_map("[a-z_][a-z0-9_]{0,15}", (any::<u32>(), any::<u32>()), 1..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let fields: Vec<(String, u32, u32)> =
                    fields.into_iter().map(|(n, (o, s))| (n, o, s)).collect();
                let text = format(&fields);
                let parsed = parse_format(&text);
                prop_assert_eq!(parsed.len(), fields.len());
                for (name, offset, size) in &fields {
                    prop_assert_eq!(parsed[name], Field { offset: *offset, size: *size });
                }
                // A file cut anywhere: whatever is parsed is right.
                let cut = &text[..cut.index(text.len() + 1)];
                for (name, field) in parse_format(cut) {
                    let want = fields.iter().find(|f| f.0 == name);
                    prop_assert_eq!(want.map(|f| Field { offset: f.1, size: f.2 }), Some(field), "{}", name);
                }
            }
        }
    }
}
