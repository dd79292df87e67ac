//! Shipping kernel modules into the initramfs: each module decompressed, with everything it
//! depends on, soft dependencies included (busybox `modprobe` does not follow them, so /init
//! loads them first), and a `depmod` over the result.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context, Result};

use super::{kernels::Kernel, walk};

/// Copies modules (decompressed) with their dependencies into the initramfs staging tree, and
/// records pre-soft-dependencies for /init to load first.
pub(super) struct ModuleShipper<'a> {
    kernel: &'a Kernel,
    target: PathBuf,
    stage: &'a Path,
    /// Module name (dashes as underscores) -> file, for every module of the kernel.
    index: HashMap<String, PathBuf>,
    /// Aliases declared by crypto and arch modules (lazily built) -> module names.
    aliases: Option<HashMap<String, Vec<String>>>,
    seen: HashSet<String>,
    preload: Vec<String>,
}

impl<'a> ModuleShipper<'a> {
    pub(super) fn new(kernel: &'a Kernel, stage: &'a Path) -> Result<Self> {
        let target = stage.join("lib/modules").join(&kernel.release);
        fs::create_dir_all(&target)?;
        let mut index = HashMap::new();
        for path in walk(&kernel.moddir.join("kernel"))? {
            if let Some(name) = module_name(&path) {
                index.entry(name).or_insert(path);
            }
        }
        Ok(ModuleShipper {
            kernel,
            target,
            stage,
            index,
            aliases: None,
            seen: HashSet::new(),
            preload: Vec::new(),
        })
    }

    /// Ships `name` and, recursively, what it depends on. Unknown names (built in, or not in
    /// this kernel) are skipped.
    pub(super) fn add(&mut self, name: &str) -> Result<()> {
        let name = name.replace('-', "_");
        if !self.seen.insert(name.clone()) {
            return Ok(());
        }
        let Some(src) = self.index.get(&name).cloned() else {
            return Ok(());
        };
        let rel = strip_compression(src.strip_prefix(&self.kernel.moddir)?);
        let dest = self.target.join(rel);
        fs::create_dir_all(dest.parent().context("module path has a parent")?)?;
        fs::write(&dest, decompress(&src)?)
            .with_context(|| format!("writing {}", dest.display()))?;

        let info = modinfo(&dest, self.stage)?;
        for dep in info.depends {
            self.add(&dep)?;
        }
        for alias in info.softdeps_pre {
            for provider in self.providers_of(&alias)? {
                self.add(&provider)?;
                if !self.preload.contains(&provider) {
                    self.preload.push(provider);
                }
            }
        }
        Ok(())
    }

    /// Crypto and arch modules declaring `alias` (e.g. crc32c_generic, crc32c_intel for crc32c).
    fn providers_of(&mut self, alias: &str) -> Result<Vec<String>> {
        if self.aliases.is_none() {
            let mut map: HashMap<String, Vec<String>> = HashMap::new();
            for sub in ["kernel/crypto", "kernel/arch"] {
                let dir = self.kernel.moddir.join(sub);
                if !dir.is_dir() {
                    continue;
                }
                for path in walk(&dir)? {
                    let Some(name) = module_name(&path) else {
                        continue;
                    };
                    for a in declared_aliases(&decompress(&path)?) {
                        map.entry(a).or_default().push(name.clone());
                    }
                }
            }
            self.aliases = Some(map);
        }
        Ok(self
            .aliases
            .as_ref()
            .and_then(|m| m.get(alias))
            .cloned()
            .unwrap_or_default())
    }

    /// Copies the kernel's built-in module lists, records the preload list and runs depmod.
    pub(super) fn finish(self) -> Result<()> {
        for entry in fs::read_dir(&self.kernel.moddir)?.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("modules.builtin") || name == "modules.order" {
                fs::copy(entry.path(), self.target.join(&name))?;
            }
        }
        if !self.preload.is_empty() {
            fs::write(
                self.stage.join("etc/preload-modules"),
                self.preload.join("\n") + "\n",
            )?;
        }
        crate::status(
            Command::new("/bin/busybox")
                .arg("depmod")
                .arg("-b")
                .arg(self.stage)
                .arg(&self.kernel.release),
        )
    }
}

/// Module name of a `*.ko[.xz|.zst|.gz]` file, dashes as underscores.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = ["", ".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(&format!(".ko{ext}")))?;
    Some(stem.replace('-', "_"))
}

/// `rel` without a compression suffix (the guest gets plain .ko files).
fn strip_compression(rel: &Path) -> PathBuf {
    let s = rel.to_string_lossy();
    let plain = [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| s.strip_suffix(ext))
        .unwrap_or(&s);
    PathBuf::from(plain)
}

/// The module file's contents, decompressed with xz, zstd or gzip as its name says.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool: &[&str] = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => &["xz", "-dc"],
        Some("zst") => &["zstd", "-qdc"],
        Some("gz") => &["gzip", "-dc"],
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .output()
        .with_context(|| format!("running {}", tool[0]))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({})",
        tool.join(" "),
        path.display(),
        out.status
    );
    Ok(out.stdout)
}

/// What a module's .modinfo says it needs.
struct ModInfo {
    depends: Vec<String>,
    softdeps_pre: Vec<String>,
}

/// Reads the .modinfo section of the (uncompressed) module `ko` with objcopy.
fn modinfo(ko: &Path, scratch: &Path) -> Result<ModInfo> {
    let tmp = scratch.join(".modinfo");
    let st = Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.modinfo"])
        .arg(ko)
        .arg(&tmp)
        .status()
        .context("running objcopy")?;
    ensure!(
        st.success(),
        "objcopy --only-section=.modinfo {} failed ({st})",
        ko.display()
    );
    let raw = fs::read(&tmp)?;
    fs::remove_file(&tmp)?;
    let mut info = ModInfo {
        depends: Vec::new(),
        softdeps_pre: Vec::new(),
    };
    for field in raw.split(|&b| b == 0).map(String::from_utf8_lossy) {
        if let Some(deps) = field.strip_prefix("depends=") {
            info.depends.extend(
                deps.split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        } else if let Some(soft) = field.strip_prefix("softdep=") {
            info.softdeps_pre.extend(pre_softdeps(soft));
        }
    }
    Ok(info)
}

/// The names after `pre:` in a softdep value such as `pre: crc32c post: foo`.
fn pre_softdeps(value: &str) -> Vec<String> {
    let mut in_pre = false;
    let mut out = Vec::new();
    for word in value.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            w if in_pre => out.push(w.to_string()),
            _ => {}
        }
    }
    out
}

/// `alias=` entries of a module image (NUL-separated modinfo strings).
fn declared_aliases(image: &[u8]) -> Vec<String> {
    image
        .split(|&b| b == 0)
        .filter_map(|s| s.strip_prefix(b"alias="))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softdeps() {
        assert_eq!(pre_softdeps("pre: crc32c"), ["crc32c"]);
        assert_eq!(pre_softdeps("pre: a b post: c"), ["a", "b"]);
        assert!(pre_softdeps("post: c").is_empty());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name(Path::new("x/nf-tables.ko.xz")).as_deref(),
            Some("nf_tables")
        );
        assert_eq!(module_name(Path::new("x/veth.ko")).as_deref(), Some("veth"));
        assert_eq!(module_name(Path::new("x/modules.dep")), None);
        assert_eq!(
            strip_compression(Path::new("kernel/a.ko.zst")),
            PathBuf::from("kernel/a.ko")
        );
    }

    #[test]
    fn aliases() {
        assert_eq!(
            declared_aliases(b"license=GPL\0alias=crc32c\0alias=crypto-crc32c\0"),
            ["crc32c", "crypto-crc32c"]
        );
    }
}
