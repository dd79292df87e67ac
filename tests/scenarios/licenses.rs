//! Licenses: every crate in the dependency graph is under a permissive license, or is named
//! here with the notice its license asks for, so a copyleft crate cannot slip in unnoticed;
//! and what ships (the binary, the image) carries those notices.
use std::{fs, os::unix::fs::MetadataExt, path::Path, process::Command};

use serde_json::Value;

/// Licenses any crate may have: permissive, no obligation beyond keeping notices.
const PERMISSIVE: &[&str] = &[
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "0BSD",
    "BSL-1.0",
    "CC0-1.0",
    "Unlicense",
    "Unicode-3.0",
    "Unicode-DFS-2016",
];

/// Crates allowed under another license, each with the license and why it is fine. Adding one
/// means adding its notice to NOTICE (which the binary prints with --licenses) and its license
/// to the image's label in deploy/Containerfile; the test checks both.
const NAMED: &[(&str, &str, &str)] = &[
    (
        "btf-rs",
        "LGPL-2.1-or-later",
        "reads kernel BTF; used unmodified as a library, relinkable from dropscope's source",
    ),
    (
        "btf-rs-derive",
        "LGPL-2.1-or-later",
        "btf-rs's derive macros (build time only)",
    ),
];

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `cargo metadata` for this machine's platform, from Cargo.lock. Run as the owner of the
/// workspace: `cargo xtask test` started by a normal user runs the tests as root through sudo,
/// and cargo must not leave root's files in that user's cargo home.
fn metadata() -> Value {
    // The cargo running the tests, else the one that built them (in a vm-test guest too).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into());
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut cmd = Command::new(&cargo);
    // Under sudo, PATH is sudo's: cargo finds rustc beside itself.
    if let Some(bin) = Path::new(&cargo).parent().filter(|d| d.is_absolute()) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths).expect("PATH"));
    }
    cmd.current_dir(root()).args([
        "metadata",
        "--format-version",
        "1",
        "--locked",
        "--filter-platform",
        &platform,
    ]);
    let owner = fs::metadata(root().join("Cargo.lock")).expect("Cargo.lock");
    if nix::unistd::geteuid().is_root() && owner.uid() != 0 {
        use std::os::unix::process::CommandExt;
        let user = nix::unistd::User::from_uid(owner.uid().into())
            .ok()
            .flatten()
            .expect("the workspace owner's account");
        cmd.uid(owner.uid()).gid(owner.gid()).env("HOME", user.dir);
    }
    let out = cmd.output().expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

/// Whether an SPDX expression can be satisfied with licenses `ok` accepts: `OR` needs one side,
/// `AND` both, `X WITH exception` what `X` needs; the old `MIT/Apache-2.0` form is an `OR`.
fn satisfiable(expr: &str, ok: &dyn Fn(&str) -> bool) -> Result<bool, String> {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut at = 0;
    let value = or_expr(&tokens, &mut at, ok)?;
    if at != tokens.len() {
        return Err(format!("cannot parse license {expr:?}"));
    }
    Ok(value)
}

fn or_expr(t: &[&str], at: &mut usize, ok: &dyn Fn(&str) -> bool) -> Result<bool, String> {
    let mut value = and_expr(t, at, ok)?;
    while t.get(*at) == Some(&"OR") {
        *at += 1;
        value |= and_expr(t, at, ok)?;
    }
    Ok(value)
}

fn and_expr(t: &[&str], at: &mut usize, ok: &dyn Fn(&str) -> bool) -> Result<bool, String> {
    let mut value = primary(t, at, ok)?;
    while t.get(*at) == Some(&"AND") {
        *at += 1;
        value &= primary(t, at, ok)?;
    }
    Ok(value)
}

fn primary(t: &[&str], at: &mut usize, ok: &dyn Fn(&str) -> bool) -> Result<bool, String> {
    match t.get(*at) {
        Some(&"(") => {
            *at += 1;
            let value = or_expr(t, at, ok)?;
            if t.get(*at) != Some(&")") {
                return Err("unbalanced parentheses".into());
            }
            *at += 1;
            Ok(value)
        }
        Some(id) if !["AND", "OR", "WITH", ")"].contains(id) => {
            *at += 1;
            if t.get(*at) == Some(&"WITH") {
                // An exception only adds permissions.
                *at += 2;
            }
            Ok(ok(id))
        }
        other => Err(format!("unexpected {other:?}")),
    }
}

#[test]
fn license_expressions_are_read_like_spdx() {
    let permissive = |id: &str| PERMISSIVE.contains(&id);
    for (expr, want) in [
        ("MIT OR Apache-2.0", true),
        ("MIT/Apache-2.0", true),
        ("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT", true),
        ("(MIT OR Apache-2.0) AND Unicode-3.0", true),
        ("MIT OR GPL-2.0-only", true),
        ("MIT AND GPL-2.0-only", false),
        ("GPL-3.0-or-later", false),
        ("(LGPL-2.1-or-later OR GPL-2.0) AND MIT", false),
    ] {
        assert_eq!(satisfiable(expr, &permissive), Ok(want), "{expr}");
    }
    assert!(satisfiable("MIT OR", &permissive).is_err());
}

#[test]
fn dependencies_are_permissive_or_named() {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    let mut refused = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap();
        let Some(license) = p["license"].as_str() else {
            refused.push(format!(
                "{name} {}: no SPDX license (license-file {})",
                p["version"], p["license_file"]
            ));
            continue;
        };
        let named = NAMED.iter().find(|(n, ..)| *n == name);
        let ok = |id: &str| {
            PERMISSIVE.contains(&id) || named.is_some_and(|(_, allowed, _)| *allowed == id)
        };
        match satisfiable(license, &ok) {
            Ok(true) => {}
            Ok(false) => refused.push(format!("{name} {}: {license}", p["version"])),
            Err(e) => refused.push(format!("{name}: {e}")),
        }
    }
    assert!(
        refused.is_empty(),
        "crates whose license is neither permissive nor named in tests/scenarios/licenses.rs \
         (name one only with its notice in NOTICE and its license on the image):\n{}",
        refused.join("\n")
    );
    for (name, license, _) in NAMED {
        assert!(
            packages
                .iter()
                .any(|p| p["name"] == *name && p["license"] == *license),
            "{name} ({license}) is no longer a dependency: remove it from NAMED and NOTICE"
        );
    }
}

#[test]
fn the_binary_and_the_image_carry_the_notices() {
    let notice = fs::read_to_string(root().join("NOTICE")).unwrap();
    let containerfile = fs::read_to_string(root().join("deploy/Containerfile")).unwrap();
    let label = containerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("org.opencontainers.image.licenses="))
        .expect("an org.opencontainers.image.licenses label");
    for (name, license, _) in NAMED {
        assert!(notice.contains(name), "NOTICE does not name {name}");
        assert!(notice.contains(license), "NOTICE does not give {license}");
        assert!(
            label.contains(license),
            "the image label {label} does not say {license}"
        );
    }
    assert!(
        containerfile.contains("NOTICE") && containerfile.contains("/usr/share/doc/dropscope"),
        "the image does not ship NOTICE and the license texts"
    );
    for file in [
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "LICENSE-GPL2",
        "licenses/LGPL-2.1.txt",
    ] {
        assert!(root().join(file).is_file(), "{file} missing");
    }
    let out = Command::new(dropscope_tests::observer::binary())
        .arg("--licenses")
        .output()
        .expect("run dropscope --licenses");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("btf-rs") && text.contains("GNU LESSER GENERAL PUBLIC LICENSE"),
        "dropscope --licenses does not carry btf-rs's notice and license"
    );
}
