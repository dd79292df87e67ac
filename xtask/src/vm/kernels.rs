//! Kernels: which Debian packages make up a kernel, downloading them with apt (into a cache
//! that outlives the run) and unpacking them into a tree with the image and its modules.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::walk;

/// Keyring that signs every Debian suite, used for the extra suites' isolated apt config.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A kernel to boot.
#[derive(Debug)]
pub(super) enum KernelSpec {
    /// Debian packages (all unpacked into one tree), from the host's suites or an extra `suite`.
    Packages {
        packages: Vec<String>,
        suite: Option<String>,
    },
    /// A local .deb.
    Deb(PathBuf),
}

impl KernelSpec {
    /// Resolves an alias (5.10, 6.1, 6.12, 7.2), a package name, or a path to a .deb.
    pub(super) fn parse(spec: &str) -> Result<Self> {
        let packages = |names: &[&str], suite: Option<&str>| KernelSpec::Packages {
            packages: names.iter().map(|s| s.to_string()).collect(),
            suite: suite.map(str::to_string),
        };
        Ok(match spec {
            // A kernel without drop reasons (they arrived in 5.17). bullseye's last point
            // release (11.11) is frozen, so this package stays where it is; bullseye-security
            // carries newer 5.10 ABIs but drops the old ones as it moves.
            "5.10" => packages(&["linux-image-5.10.0-32-amd64-unsigned"], Some("bullseye")),
            "6.1" => packages(&["linux-image-6.1.0-56-amd64-unsigned"], None),
            "6.12" => packages(&["linux-image-6.12.117+deb12-amd64-unsigned"], None),
            "7.2" => KernelSpec::split_packages("7.2.13+deb14-amd64", Some("sid")),
            _ if spec.ends_with(".deb") => {
                let path = fs::canonicalize(spec).with_context(|| format!("no such .deb: {spec}"))?;
                KernelSpec::Deb(path)
            }
            _ if spec.starts_with("linux-binary-") => {
                KernelSpec::split_packages(spec.trim_start_matches("linux-binary-"), None)
            }
            _ if spec.starts_with("linux-") => packages(&[spec], None),
            _ => bail!("unknown kernel {spec:?}: use 5.10, 6.1, 6.12, 7.2, a Debian package name or a path to a .deb"),
        })
    }

    /// Since about 6.19 Debian splits a kernel into binary, modules and base (config) packages.
    fn split_packages(version: &str, suite: Option<&str>) -> Self {
        KernelSpec::Packages {
            packages: ["binary", "modules", "base"]
                .iter()
                .map(|p| format!("linux-{p}-{version}"))
                .collect(),
            suite: suite.map(str::to_string),
        }
    }

    /// Name of the cache directory the kernel is unpacked into.
    fn cache_name(&self) -> String {
        match self {
            KernelSpec::Packages { packages, .. } => packages[0].clone(),
            KernelSpec::Deb(path) => path
                .file_stem()
                .map_or_else(|| "kernel".into(), |s| s.to_string_lossy().into_owned()),
        }
    }
}

/// An unpacked kernel: its image and its module tree.
#[derive(Debug)]
pub(super) struct Kernel {
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) moddir: PathBuf,
}

/// The download and extraction cache, `~/.cache/dropscope-vm`.
pub(super) struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub(super) fn open() -> Result<Self> {
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
        };
        let dir = base.join("dropscope-vm");
        for sub in ["debs", "kernels"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        Ok(Cache { dir })
    }

    fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// Unpacks the kernel (downloading its packages first if needed) unless already done.
    pub(super) fn kernel(&self, spec: &KernelSpec) -> Result<Kernel> {
        let root = self.dir.join("kernels").join(spec.cache_name());
        let done = root.join(".done");
        if !done.exists() {
            let debs = match spec {
                KernelSpec::Deb(path) => vec![path.clone()],
                KernelSpec::Packages { packages, suite } => {
                    self.download(packages, suite.as_deref())?
                }
            };
            extract(&debs, &root)?;
            fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
        }
        locate_kernel(&root)
    }

    /// The cached .deb of each package, downloading the ones missing.
    fn download(&self, packages: &[String], suite: Option<&str>) -> Result<Vec<PathBuf>> {
        let missing: Vec<&String> = packages
            .iter()
            .filter(|p| self.cached_deb(p).is_none())
            .collect();
        if !missing.is_empty() {
            let apt = AptConfig::new(self, suite)?;
            eprintln!(
                "=== vm-test: downloading {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if apt.download(&self.debs(), &missing, true).is_err() {
                eprintln!("=== vm-test: not found in the package lists; running apt-get update");
                apt.update()?;
                apt.download(&self.debs(), &missing, false)?;
            }
        }
        packages
            .iter()
            .map(|p| {
                self.cached_deb(p)
                    .with_context(|| format!("apt-get download left no .deb for {p}"))
            })
            .collect()
    }

    /// The newest downloaded .deb of `package`, if any.
    fn cached_deb(&self, package: &str) -> Option<PathBuf> {
        let prefix = format!("{package}_");
        fs::read_dir(self.debs())
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(&prefix) && name.ends_with(".deb")
            })
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    }
}

/// apt, either as configured on the host or with an isolated config for one extra suite (its own
/// sources, lists and cache under the cache directory, so the host's apt state is left alone).
struct AptConfig {
    options: Vec<String>,
    state: Option<PathBuf>,
}

impl AptConfig {
    fn new(cache: &Cache, suite: Option<&str>) -> Result<Self> {
        let Some(suite) = suite else {
            return Ok(AptConfig {
                options: Vec::new(),
                state: None,
            });
        };
        let state = cache.dir.join(format!("apt-{suite}"));
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(state.join(sub))
                .with_context(|| format!("creating {}", state.join(sub).display()))?;
        }
        let sources = match std::env::var("VM_APT_SOURCES") {
            Ok(s) if !s.trim().is_empty() => s,
            _ => format!(
                "deb [signed-by={DEBIAN_KEYRING}] {} {suite} main\n",
                host_debian_mirror()?
            ),
        };
        let list = state.join("sources.list");
        fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
        let options = [
            format!("Dir::Etc::sourcelist={}", list.display()),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", state.join("lists").display()),
            format!("Dir::Cache={}", state.join("cache").display()),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        let apt = AptConfig {
            options,
            state: Some(state.clone()),
        };
        if !state.join(".updated").exists() {
            apt.update()?;
        }
        Ok(apt)
    }

    fn apt_get(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        if crate::nix_is_root() {
            // The cache lives in root's home, which apt's unprivileged download user cannot write.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.args(&self.options);
        cmd
    }

    fn update(&self) -> Result<()> {
        crate::status(self.apt_get().args(["update", "-qq"]))?;
        if let Some(state) = &self.state {
            fs::write(state.join(".updated"), "")?;
        }
        Ok(())
    }

    /// `apt-get download` into `dir`; `quiet` hides apt's complaints (a retry follows).
    fn download(&self, dir: &Path, packages: &[&String], quiet: bool) -> Result<()> {
        let mut cmd = self.apt_get();
        cmd.current_dir(dir).arg("download").args(packages);
        if quiet {
            cmd.stderr(Stdio::null());
        }
        crate::status(&mut cmd)
    }
}

/// URI of the host's main Debian archive, from its apt sources (one-line or deb822 format).
fn host_debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|e| e == "list" || e == "sources")
            {
                texts.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| is_archive(u)) {
                return Ok(uri.to_string());
            }
        }
    }
    bail!("found no Debian archive in the host's apt sources; set VM_APT_SOURCES to a sources.list line")
}

/// Unpacks `debs` into a fresh `root`.
fn extract(debs: &[PathBuf], root: &Path) -> Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    for deb in debs {
        eprintln!("=== vm-test: unpacking {}", deb.display());
        crate::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    Ok(())
}

/// Finds the module tree (`{,usr/}lib/modules/<release>`) and the kernel image in an unpacked kernel.
fn locate_kernel(root: &Path) -> Result<Kernel> {
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/<release> in {}", root.display()))?;
    let release = moddir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let vmlinuz = walk(root)?
        .into_iter()
        .find(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .with_context(|| format!("no vmlinuz in {}", root.display()))?;
    Ok(Kernel {
        release,
        vmlinuz,
        moddir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_specs() {
        assert!(matches!(
            KernelSpec::parse("6.1").unwrap(),
            KernelSpec::Packages { suite: None, .. }
        ));
        match KernelSpec::parse("7.2").unwrap() {
            KernelSpec::Packages { packages, suite } => {
                assert_eq!(packages.len(), 3);
                assert_eq!(suite.as_deref(), Some("sid"));
            }
            other => panic!("{other:?}"),
        }
        match KernelSpec::parse("5.10").unwrap() {
            KernelSpec::Packages { packages, suite } => {
                assert_eq!(packages, ["linux-image-5.10.0-32-amd64-unsigned"]);
                assert_eq!(suite.as_deref(), Some("bullseye"));
            }
            other => panic!("{other:?}"),
        }
        assert!(KernelSpec::parse("5.4").is_err());
    }
}
