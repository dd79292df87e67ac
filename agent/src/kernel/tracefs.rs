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
}
