//! The module structure stays layered (README, "Architecture"): a module of `src/` imports
//! only from its own layer and the layers below, the module graph has no loops, imports are
//! grouped (std, external crates, crate), and no file is longer than `MAX_LINES`.
//!
//! It reads the source as text: every `crate::NAME` path (in `use` lines and inline) is an
//! arrow from the file's top-level module to `NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. The README's architecture table says the same, one line each.
const LAYERS: &[&[&str]] = &[
    &[
        "protocol",
        "config",
        "metrics",
        "tls",
        "auth",
        "shutdown",
        "sql",
        "unix_socket",
    ],
    &["backend"],
    &["pool", "cancel", "lookup", "budget"],
    &["state"],
    &["frontend", "admin", "console"],
    &["server"],
    &["main"],
];

/// Longest file allowed under `src/` (the README says why any exception exists; none does).
const MAX_LINES: usize = 900;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut v);
    v.sort();
    v
}

/// `src/frontend/relay/mod.rs` → `frontend`; `src/main.rs` → `main`.
fn module_of(path: &Path) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = path.strip_prefix(&src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::NAME` in `text`, outside comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `some_crate::`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn every_module_is_in_a_layer() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(m) = line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")) {
            let m = m.trim_end_matches(';');
            assert!(
                layer_of(m).is_some(),
                "module `{m}` is in no layer: add it to LAYERS here and to the README's table"
            );
        }
    }
}

#[test]
fn no_module_imports_from_above() {
    let mut violations = Vec::new();
    for f in src_files() {
        let from = module_of(&f);
        if from == "lib" {
            continue;
        }
        let Some(from_layer) = layer_of(&from) else {
            violations.push(format!("{}: module `{from}` is in no layer", f.display()));
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for to in crate_refs(&text) {
            if to == from {
                continue;
            }
            match layer_of(&to) {
                Some(l) if l <= from_layer => {}
                Some(l) => violations.push(format!(
                    "{}: `{from}` (layer {from_layer}) uses crate::{to} (layer {l}, above it)",
                    f.display()
                )),
                None => violations.push(format!("{}: crate::{to} is in no layer", f.display())),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_module_graph_has_no_loops() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in src_files() {
        let from = module_of(&f);
        let text = std::fs::read_to_string(&f).unwrap();
        let e = graph.entry(from.clone()).or_default();
        for to in crate_refs(&text) {
            if to != from {
                e.insert(to);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(1) => {
                let i = path.iter().position(|p| p == n).unwrap();
                let mut cycle = path[i..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut state, &mut Vec::new()) {
            panic!("import loop: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn imports_are_grouped_std_external_crate() {
    let mut bad = Vec::new();
    for f in src_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // (last line of the previous top-level `use`, its group)
        let mut prev: Option<(usize, u8)> = None;
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            let Some(path) = l
                .strip_prefix("use ")
                .or_else(|| l.strip_prefix("pub use "))
            else {
                i += 1;
                continue;
            };
            let start = i;
            while !lines[i].trim_end().ends_with(';') && i + 1 < lines.len() {
                i += 1;
            }
            let root: String = path
                .trim_start_matches("::")
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let group = match root.as_str() {
                "std" | "core" | "alloc" => 0,
                "crate" | "super" | "self" => 2,
                _ => 1,
            };
            if let Some((end, g)) = prev {
                if group < g {
                    bad.push(format!(
                        "{}:{}: `{root}` import after a later group",
                        f.display(),
                        start + 1
                    ));
                } else if group != g && end + 1 == start {
                    bad.push(format!(
                        "{}:{}: no blank line between import groups",
                        f.display(),
                        start + 1
                    ));
                }
            }
            prev = Some((i, group));
            i += 1;
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn no_source_file_is_too_long() {
    let long: Vec<String> = src_files()
        .into_iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split them by concern):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_scanner_sees_arrows() {
    let refs = crate_refs(
        "use crate::pool::Pool;\n// crate::server\nlet x = crate::state::f(); my_crate::y",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        vec!["pool".to_string(), "state".to_string()]
    );
}
