//! The cause catalogue as a Markdown table (`dropscope --causes`), generated from the rule
//! table so docs/causes.md can never drift from what dropscope actually does.
use std::fmt::Write;

use super::{table::OneOrMany, Engine};

/// One row per cause: what it means, the kernel signals that lead to it, and its fixes.
pub fn markdown(engine: &Engine) -> String {
    let mut out =
        String::from("| cause | what it means | kernel signals | fix |\n|---|---|---|---|\n");
    for (id, cause) in engine.causes() {
        let rules: Vec<_> = engine.rules().iter().filter(|r| &r.cause == id).collect();
        let mut signals: Vec<String> = Vec::new();
        for r in &rules {
            let reasons = match &r.reason {
                OneOrMany::Any => "any reason".to_string(),
                other => other.values().join(", "),
            };
            let at = r.at.values();
            let mut s = if at.is_empty() {
                format!("`{reasons}`")
            } else {
                format!("`{reasons}` at `{}`", at.join("`, `"))
            };
            if !r.when.is_empty() {
                let conds: Vec<String> = r.when.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = write!(s, " when {}", conds.join(", "));
            }
            if !signals.contains(&s) {
                signals.push(s);
            }
        }
        let fix = rules
            .first()
            .map(|r| {
                r.fix
                    .replace("{nsexec}", "")
                    .replace('{', "<")
                    .replace('}', ">")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| `{id}` | **{}.** {} | {} | `{}` |",
            cause.title,
            cause.meaning,
            signals.join("; ").replace('|', "\\|"),
            fix.replace('|', "\\|")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_document_every_cause_as_dropscope_knows_it() {
        let generated = markdown(&Engine::builtin());
        let page = include_str!("../../../docs/causes.md");
        assert!(
            page.contains(&generated),
            "docs/causes.md's cause table is stale: regenerate it with `cargo xtask docs` \
             (between the CAUSES markers)"
        );
    }
}
