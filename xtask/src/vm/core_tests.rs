//! The core set of `vm-test --core`: the integration tests worth a kernel matrix under TCG (one
//! per core cause, the context probes with their forced fallbacks, a clean detach, no false
//! alarms on a healthy network).
//!
//! A test joins the core set where it is defined, in `tests/scenarios/*.rs`:
//!
//! ```text
//! #[test]
//! // vm-test: core
//! fn fwd4_off_is_forwarding_disabled() {
//! ```
//!
//! (the marker anywhere among the attributes and comments right above the `fn`), and a whole
//! scenario file joins with `//! vm-test: core` among its first doc lines. Renaming a test keeps
//! it in the set. A marker that is not attached to a `#[test]` function, a misspelt marker, and a
//! marked test the test executable does not list are errors, so the set cannot shrink silently.
//!
//! Kernels without drop reasons (before 5.17) run another set, marked `// vm-test: no-reasons`
//! (single tests only): the tests whose assertions state the answer such a kernel allows. The
//! guest picks the set from the booted kernel's BTF.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

/// The marker, after `//` (one test) or `//!` (the whole file).
pub const MARKER: &str = "vm-test: core";

/// The marker of the set run on kernels without drop reasons, after `//` (one test).
pub const NO_REASONS_MARKER: &str = "vm-test: no-reasons";

/// What the markers select: whole scenario modules, and single tests as `module::function`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CoreSet {
    pub modules: BTreeSet<String>,
    pub tests: BTreeSet<String>,
    /// The set for kernels without drop reasons, as `module::function`.
    pub no_reasons: BTreeSet<String>,
}

/// Reads the markers of every scenario module declared in `scenarios/main.rs`.
pub fn discover(scenarios: &Path) -> Result<CoreSet> {
    let main = read(&scenarios.join("main.rs"))?;
    let mut set = CoreSet::default();
    for module in declared_modules(&main) {
        let path = scenarios.join(format!("{module}.rs"));
        let text = read(&path)?;
        scan(&module, &text, &mut set).with_context(|| format!("{}", path.display()))?;
    }
    ensure!(
        !set.modules.is_empty() || !set.tests.is_empty(),
        "no test in {} is marked `// {MARKER}`",
        scenarios.display()
    );
    Ok(set)
}

/// The exact names of the core tests among those `exe --list` reports; fails for a marked test
/// it does not list and for a marked module without tests.
pub fn select(set: &CoreSet, exe: &Path) -> Result<Vec<String>> {
    resolve(set, &listed(exe)?)
}

/// The exact names of the tests marked for kernels without drop reasons; fails for a marked
/// test the executable does not list, and when none is marked.
pub fn select_no_reasons(set: &CoreSet, exe: &Path) -> Result<Vec<String>> {
    resolve_no_reasons(set, &listed(exe)?)
}

fn resolve_no_reasons(set: &CoreSet, listed: &[String]) -> Result<Vec<String>> {
    ensure!(
        !set.no_reasons.is_empty(),
        "no test is marked `// {NO_REASONS_MARKER}`"
    );
    for test in &set.no_reasons {
        ensure!(
            listed.contains(test),
            "`{test}` is marked `// {NO_REASONS_MARKER}` but the test executable has no such test"
        );
    }
    Ok(set.no_reasons.iter().cloned().collect())
}

/// The tests `exe --list` reports.
fn listed(exe: &Path) -> Result<Vec<String>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("running {} --list", exe.display()))?;
    ensure!(
        out.status.success(),
        "{} --list failed ({})",
        exe.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// `select` on a given list of test names.
fn resolve(set: &CoreSet, listed: &[String]) -> Result<Vec<String>> {
    let mut names = BTreeSet::new();
    for test in &set.tests {
        ensure!(
            listed.contains(test),
            "`{test}` is marked `// {MARKER}` but the test executable has no such test"
        );
        names.insert(test.clone());
    }
    for module in &set.modules {
        let prefix = format!("{module}::");
        let before = names.len();
        names.extend(listed.iter().filter(|t| t.starts_with(&prefix)).cloned());
        ensure!(
            names.len() > before,
            "module `{module}` is marked `//! {MARKER}` but the test executable lists no test in it"
        );
    }
    Ok(names.into_iter().collect())
}

fn read(path: &PathBuf) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `mod NAME;` lines of the test crate's root.
fn declared_modules(main: &str) -> Vec<String> {
    main.lines()
        .filter_map(|l| l.trim().strip_prefix("mod "))
        .filter_map(|l| l.strip_suffix(';'))
        .map(|m| m.trim().to_string())
        .collect()
}

/// What a comment line says after its `//`, `///` or `//!`, if it is a comment.
fn comment(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    for opener in ["//!", "///", "//"] {
        if let Some(rest) = line.strip_prefix(opener) {
            return Some((opener, rest.trim()));
        }
    }
    None
}

/// Adds the markers of one scenario file to `set`.
fn scan(module: &str, text: &str, set: &mut CoreSet) -> Result<()> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some((opener, said)) = comment(line) else {
            continue;
        };
        let normalized: String = said.split_whitespace().collect::<Vec<_>>().join(" ");
        let looks_like = normalized
            .to_lowercase()
            .replace(": ", ":")
            .starts_with("vm-test:");
        if said == NO_REASONS_MARKER {
            ensure!(
                opener == "//",
                "line {}: the marker is `// {NO_REASONS_MARKER}` on one test",
                i + 1
            );
            let name = marked_test(&lines, i)
                .with_context(|| format!("line {}: `// {NO_REASONS_MARKER}`", i + 1))?;
            set.no_reasons.insert(format!("{module}::{name}"));
            continue;
        }
        if said != MARKER {
            ensure!(
                !looks_like,
                "line {}: `{}` is not a marker; write `// {MARKER}`, `//! {MARKER}` or `// {NO_REASONS_MARKER}`",
                i + 1,
                line.trim()
            );
            continue;
        }
        match opener {
            "//!" => {
                let in_header = lines[..i].iter().all(|l| l.trim().starts_with("//!"));
                ensure!(
                    in_header,
                    "line {}: `//! {MARKER}` belongs among the file's first doc lines",
                    i + 1
                );
                set.modules.insert(module.to_string());
            }
            "//" => {
                let name = marked_test(&lines, i)
                    .with_context(|| format!("line {}: `// {MARKER}`", i + 1))?;
                set.tests.insert(format!("{module}::{name}"));
            }
            _ => bail!(
                "line {}: the marker is `// {MARKER}`, not a doc comment",
                i + 1
            ),
        }
    }
    Ok(())
}

/// The test function the marker on line `at` belongs to: the `fn` after the attributes and
/// comments around the marker, which must include `#[test]`.
fn marked_test(lines: &[&str], at: usize) -> Result<String> {
    let is_preamble = |l: &str| {
        let l = l.trim();
        l.starts_with("#[") || l.starts_with("//")
    };
    let start = (0..at)
        .rev()
        .take_while(|&j| is_preamble(lines[j]))
        .last()
        .unwrap_or(at);
    let Some(fn_at) = (at + 1..lines.len()).find(|&j| !is_preamble(lines[j])) else {
        bail!("no function follows");
    };
    let has_test = lines[start..fn_at].iter().any(|l| l.trim() == "#[test]");
    let signature = lines[fn_at].trim();
    let name = signature
        .strip_prefix("fn ")
        .or_else(|| signature.strip_prefix("pub fn "))
        .and_then(|s| s.split(['(', '<']).next())
        .map(str::trim)
        .filter(|n| !n.is_empty());
    match (name, has_test) {
        (Some(name), true) => Ok(name.to_string()),
        (Some(name), false) => bail!("`{name}` is not a #[test] function"),
        (None, _) => bail!("followed by `{signature}`, not by a test function"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(text: &str) -> Result<CoreSet> {
        let mut set = CoreSet::default();
        scan("m", text, &mut set)?;
        Ok(set)
    }

    #[test]
    fn markers_before_or_after_the_test_attribute_select_the_function() {
        let set = scanned(
            "use x;\n\n#[test]\n// vm-test: core\nfn one() {}\n\n\
             // vm-test: core\n/// Doc.\n#[test]\n#[ignore = \"slow\"]\nfn two() {}\n\n#[test]\nfn three() {}\n",
        )
        .unwrap();
        assert_eq!(
            set.tests.into_iter().collect::<Vec<_>>(),
            ["m::one", "m::two"]
        );
        assert!(set.modules.is_empty());
    }

    #[test]
    fn a_file_marker_selects_the_module() {
        let set = scanned("//! Tests.\n//! vm-test: core\nuse x;\n#[test]\nfn a() {}\n").unwrap();
        assert_eq!(set.modules.into_iter().collect::<Vec<_>>(), ["m"]);
        let late = scanned("//! Tests.\nuse x;\n//! vm-test: core\n");
        assert!(late.is_err());
    }

    #[test]
    fn misplaced_or_misspelt_markers_are_errors() {
        for text in [
            "// vm-test: core\nfn helper() {}\n",
            "#[test]\nfn a() {}\n// vm-test: core\n",
            "// vm-test: core\n\n#[test]\nfn a() {}\n",
            "#[test]\n// vm-test:core\nfn a() {}\n",
            "#[test]\n// VM-test: Core\nfn a() {}\n",
            "#[test]\n/// vm-test: core\nfn a() {}\n",
            "#[test]\n// vm-test: no-reason\nfn a() {}\n",
            "//! vm-test: no-reasons\n#[test]\nfn a() {}\n",
            "// vm-test: no-reasons\nfn helper() {}\n",
        ] {
            assert!(scanned(text).is_err(), "accepted: {text:?}");
        }
        // Prose that mentions the command is not a marker.
        assert!(scanned("// cargo xtask vm-test runs these\n").is_ok());
    }

    #[test]
    fn the_no_reasons_marker_selects_a_separate_set() {
        let set = scanned(
            "#[test]\n// vm-test: core\n// vm-test: no-reasons\nfn both() {}\n\n\
             #[test]\n// vm-test: no-reasons\nfn old_only() {}\n\n#[test]\n// vm-test: core\nfn new_only() {}\n",
        )
        .unwrap();
        assert_eq!(
            set.tests.iter().collect::<Vec<_>>(),
            ["m::both", "m::new_only"]
        );
        assert_eq!(
            set.no_reasons.iter().collect::<Vec<_>>(),
            ["m::both", "m::old_only"]
        );
        let listed = vec!["m::both".to_string()];
        assert!(resolve_no_reasons(&set, &listed).is_err());
        assert!(resolve_no_reasons(&CoreSet::default(), &listed).is_err());
    }

    #[test]
    fn a_marked_test_the_executable_does_not_list_is_an_error() {
        let mut set = CoreSet::default();
        set.tests.insert("forwarding::renamed_away".into());
        let listed = vec!["forwarding::fwd4_off_is_forwarding_disabled".to_string()];
        assert!(resolve(&set, &listed).is_err());
        let mut set = CoreSet::default();
        set.modules.insert("context".into());
        assert!(resolve(&set, &listed).is_err());
        set.modules.insert("forwarding".into());
        set.modules.remove("context");
        assert_eq!(resolve(&set, &listed).unwrap(), listed);
    }

    /// The real markers: every one is attached to a test of a declared scenario module.
    #[test]
    fn the_scenarios_mark_the_core_set() {
        let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let set = discover(&scenarios).unwrap();
        assert!(
            set.tests.len() + set.modules.len() >= 10,
            "the core set shrank: {set:?}"
        );
        assert!(set.modules.contains("context"), "{set:?}");
        assert!(
            set.no_reasons.len() >= 4,
            "the no-reasons set shrank: {set:?}"
        );
    }
}
