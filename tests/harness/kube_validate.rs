//! Where kubernetes-validate (from PyPI) lives: it checks Kubernetes manifests against the
//! OpenAPI schemas it bundles, so validating needs no cluster and no network. `cargo xtask`
//! installs it into its own virtualenv here; the deployment tests run it from there.
use std::path::PathBuf;

/// The pinned release; its schemas cover Kubernetes 1.25 to 1.37.
pub const VERSION: &str = "1.37.0";

/// The virtualenv: `$XDG_CACHE_HOME/dropscope/kubernetes-validate-VERSION` (`~/.cache` when
/// XDG_CACHE_HOME is unset), kept across `cargo clean`.
pub fn venv() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache
        .join("dropscope")
        .join(format!("kubernetes-validate-{VERSION}"))
}

/// The validator's command.
pub fn executable() -> PathBuf {
    venv().join("bin").join("kubernetes-validate")
}
