//! The layers of `src/` (docs/design.md, "Layout"), checked on the source:
//! a module uses only modules of lower layers, and the parts of a module
//! (`supervisor/slot`, `db/jobs`, …) never import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer; a module imports only lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("contract", 0),
    ("files", 0),
    ("listen", 0),
    ("stderr", 0),
    ("vocab", 1),
    ("procs", 1),
    ("logs", 1),
    ("config", 2),
    ("lock", 2),
    ("db", 3),
    ("cli", 3),
    ("api", 4),
    ("worker", 4),
    ("executor", 5),
    ("status", 6),
    ("takeover", 6),
    ("supervisor", 7),
    ("commands", 8),
    ("layering", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's module path below `src/`: `supervisor/slot/io.rs` →
/// `["supervisor", "slot", "io"]`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The module paths a file names: `crate::a::b` and `super::x` (resolved
/// against the file's own module).
fn imports(module: &[String], text: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(s.len());
        s[..end]
            .split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty() && p.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
            .collect()
    };
    let mut out = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        out.push(ident(&text[at + "crate::".len()..]));
    }
    for (at, _) in text.match_indices("super::") {
        // `super::super::x` counts once, from its first `super`.
        if text[..at].ends_with("super::") {
            continue;
        }
        let mut rest = &text[at..];
        let mut base: Vec<String> = module.to_vec();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        base.extend(ident(rest));
        out.push(base);
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The part a module path belongs to: its first two names when the first
/// is a folder (`supervisor/slot`), else its first.
fn part(src: &Path, path: &[String]) -> String {
    if path.len() >= 2 && src.join(&path[0]).is_dir() {
        let second = src.join(&path[0]).join(&path[1]);
        if second.is_dir() || second.with_extension("rs").is_file() {
            return format!("{}/{}", path[0], path[1]);
        }
    }
    path[0].clone()
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in files {
        let module = module_of(&src, &file);
        if module.is_empty() || ["main", "lib"].contains(&module[0].as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // An inline test module (at a file's end) has its own `super`.
        let text = match text.find("#[cfg(test)]\nmod tests {") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        let from = part(&src, &module);
        for target in imports(&module, text) {
            let (Some(a), Some(b)) = (layer(&module[0]), layer(&target[0])) else {
                continue;
            };
            if module[0] != target[0] && b >= a {
                upward.push(format!("{} uses crate::{}", file.display(), target.join("::")));
            }
            let to = part(&src, &target);
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    (edges, upward)
}

/// A circle in the graph, if any.
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut c = path[at..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_a_higher_layer() {
    let (_, upward) = graph();
    assert!(upward.is_empty(), "imports that go up a layer:\n{}", upward.join("\n"));
}

#[test]
fn the_parts_of_src_import_each_other_in_no_circle() {
    let (edges, _) = graph();
    assert!(
        edges.contains_key("supervisor/slot") && edges.contains_key("db/jobs"),
        "the graph was read: {edges:?}"
    );
    if let Some(c) = circle(&edges) {
        panic!("an import circle: {}", c.join(" → "));
    }
}

#[test]
fn the_checks_see_circles_and_upward_imports() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    assert_eq!(circle(&edges), None);
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        circle(&edges),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let module = vec!["supervisor".to_string(), "slot".to_string(), "io".to_string()];
    assert_eq!(
        imports(&module, "use super::super::fleet::Fleet; use crate::db::jobs;"),
        vec![
            vec!["db".to_string(), "jobs".to_string()],
            vec!["supervisor".to_string(), "fleet".to_string()],
        ]
    );
}
