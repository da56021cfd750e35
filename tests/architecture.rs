//! The code is built as `docs/architecture.md` says: each module under
//! `src/` uses only the modules its row of "Who may use whom" lists, every
//! module has a row, and the allowed graph has no cycle. Read from the
//! source files themselves (`crate::…` and `super::…` paths), so a new
//! import that crosses a line fails here with the file that made it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The rows of the table under `## Who may use whom`.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let section = doc.split("## Who may use whom").nth(1).expect("docs/architecture.md has the section");
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, module, uses, _] = cells.as_slice() else { continue };
        let Some(module) = module.strip_prefix('`').and_then(|m| m.strip_suffix('`')) else { continue };
        let uses = uses.split(',').map(|u| u.trim().trim_matches('`').to_string()).filter(|u| !u.is_empty());
        rows.insert(module.to_string(), uses.collect());
    }
    rows
}

/// `src/a/b.rs` → `["a", "b"]`; `src/a/mod.rs` → `["a"]`.
fn module_path(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let mut parts: Vec<String> =
        rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file's code names (comments aside), with the
/// line that names each.
fn uses(file: &Path) -> Vec<(String, String)> {
    let path = module_path(file);
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (i, _) in code.match_indices("crate::") {
            if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String =
                code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            out.push((name, line.trim().to_string()));
        }
        // `super::` at file level (unindented: inline modules such as
        // `mod tests` shift their own `super`) that climbs past the file's
        // top-level module names another top-level module.
        if let Some(rest) = line.strip_prefix("use ").or_else(|| line.strip_prefix("pub use ")) {
            let mut rest = rest;
            let mut up = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                up += 1;
                rest = r;
            }
            if up > 0 && up >= path.len() {
                let name: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.push((name, line.trim().to_string()));
            }
        }
    }
    out
}

#[test]
fn modules_use_only_what_docs_architecture_allows() {
    let allowed = allowed();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut wrong = Vec::new();
    let mut modules = BTreeSet::new();
    for file in &files {
        let path = module_path(file);
        let top = path[0].clone();
        if top == "lib" || top == "main" {
            continue;
        }
        modules.insert(top.clone());
        let Some(may) = allowed.get(&top) else {
            wrong.push(format!("module {top} has no row in docs/architecture.md"));
            continue;
        };
        for (used, line) in uses(file) {
            if used != top && !may.contains(&used) {
                wrong.push(format!("{} uses {used}: {line}", file.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    for row in allowed.keys() {
        if !modules.contains(row) {
            wrong.push(format!("docs/architecture.md has a row for {row}, which is not a module"));
        }
    }
    assert!(wrong.is_empty(), "the code and docs/architecture.md disagree:\n{}", wrong.join("\n"));
}

#[test]
fn the_allowed_module_graph_has_no_cycle() {
    let allowed = allowed();
    // Kahn: repeatedly remove modules that use nothing left.
    let mut left: BTreeMap<String, BTreeSet<String>> = allowed.clone();
    while let Some(free) =
        left.iter().find(|(_, uses)| uses.iter().all(|u| !left.contains_key(u))).map(|(m, _)| m.clone())
    {
        left.remove(&free);
    }
    assert!(
        left.is_empty(),
        "these modules use each other in a circle: {:?}",
        left.keys().collect::<Vec<_>>()
    );
    for (m, uses) in &allowed {
        for u in uses {
            assert!(allowed.contains_key(u), "{m} may use {u}, which has no row");
        }
    }
}
