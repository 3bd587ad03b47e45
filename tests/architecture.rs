//! The shape of `src/` that ARCHITECTURE.md promises, checked on every test run:
//! - no import cycle between the library's modules;
//! - no file over 600 lines without a one-line reason at its top;
//! - HTTP handlers of at most 30 lines (a handler parses, authorises, calls one function and maps
//!   the error; more than that belongs in the owning module).
//!
//! A module is a file of the library, or a folder one level below `src/` (`peeks::outbound` is one
//! module whether it is a file or a folder of files). An edge is any `crate::`, `super::` or
//! child-module path that names another module, in code (comments are ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_HANDLER_LINES: usize = 30;
/// The phrase a long file's first lines must contain, followed by the reason.
const LONG_FILE_MARKER: &str = "over 600 lines:";

/// One file of the library: its module path (`["peeks", "outbound", "claims"]`) and its text.
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Removes `//` comments (doc comments included) and the contents of string literals, so that
/// neither a doc link nor a message text counts as an import.
fn strip_comments_and_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let bytes: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                    out.push('"');
                }
                i += 1;
                continue;
            }
            if c == '/' && bytes.get(i + 1) == Some(&'/') {
                break;
            }
            // A char literal such as '"' must not open a string.
            if c == '\'' && bytes.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
                continue;
            }
            if c == '"' {
                in_string = true;
            }
            out.push(c);
            i += 1;
        }
        out.push('\n');
    }
    out
}

/// `mod name;` declarations of a file (inline `mod tests { ... }` blocks are not files).
fn declared_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("pub mod ").or_else(|| line.strip_prefix("mod "))?;
            let rest = rest.strip_prefix("pub(crate) ").unwrap_or(rest);
            rest.strip_suffix(';').map(|name| name.trim().to_owned())
        })
        .collect()
}

/// Every file of the library, found by following `mod` declarations from `lib.rs` (so the
/// binary's own modules, such as `bench`, are not part of the graph).
fn library_files() -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut pending = vec![(src_dir().join("lib.rs"), Vec::<String>::new())];
    while let Some((path, module)) = pending.pop() {
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Unit tests (a `#[cfg(test)]` module at the end of a file) are not the module's
        // dependencies, and their `super::` means the file itself.
        let production = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code = strip_comments_and_strings(production);
        let dir = if module.is_empty() || path.file_name().is_some_and(|n| n == "mod.rs") {
            path.parent().unwrap().to_path_buf()
        } else {
            path.with_extension("")
        };
        for child in declared_modules(&code) {
            let as_file = dir.join(format!("{child}.rs"));
            let child_path = if as_file.exists() { as_file } else { dir.join(&child).join("mod.rs") };
            let mut child_module = module.clone();
            child_module.push(child);
            pending.push((child_path, child_module));
        }
        files.push(SourceFile { path, module, code });
    }
    files
}

/// The graph node of a module path: its first two segments where the first is a folder, else
/// its first segment. The crate root is no node.
fn node_of(module: &[String], folders: &BTreeSet<String>) -> Option<String> {
    match module {
        [] => None,
        [first] => Some(first.clone()),
        [first, second, ..] if folders.contains(first) => Some(format!("{first}::{second}")),
        [first, ..] => Some(first.clone()),
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The path segments after `start` in `code` (`a::b::{c, d::e}` gives `a::b::c` and `a::b::d::e`,
/// reduced to the first segments that can name a module).
fn paths_after(code: &str, start: usize) -> Vec<Vec<String>> {
    let rest = &code[start..];
    let mut segments = Vec::new();
    let mut chars = rest.char_indices().peekable();
    let mut current = String::new();
    while let Some(&(i, c)) = chars.peek() {
        if is_ident_char(c) {
            current.push(c);
            chars.next();
        } else if rest[i..].starts_with("::") {
            segments.push(std::mem::take(&mut current));
            chars.next();
            chars.next();
        } else if c == '{' && current.is_empty() {
            // A use tree: expand each top-level item.
            let close = matching_brace(rest, i);
            let inner = &rest[i + 1..close];
            let mut out = Vec::new();
            for item in split_top_level(inner) {
                let offset = item.as_ptr() as usize - inner.as_ptr() as usize;
                let item_start = start + i + 1 + offset + (item.len() - item.trim_start().len());
                for tail in paths_after(code, item_start) {
                    let mut full = segments.clone();
                    full.extend(tail);
                    out.push(full);
                }
            }
            return out;
        } else {
            break;
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    vec![segments]
}

fn matching_brace(text: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in a use tree")
}

fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut from) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[from..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// Positions where `word::` starts as a whole path root (not `x_word::` or `a::word::`).
fn path_roots(code: &str, word: &str) -> Vec<usize> {
    let needle = format!("{word}::");
    code.match_indices(&needle)
        .map(|(i, _)| i)
        .filter(|&i| {
            let before = code[..i].chars().next_back();
            let after_colons = code[..i].ends_with("::");
            !after_colons && !before.is_some_and(is_ident_char)
        })
        .collect()
}

/// The module paths a file refers to, absolute (from the crate root).
fn referenced_modules(file: &SourceFile) -> Vec<Vec<String>> {
    let code = &file.code;
    let mut found = Vec::new();
    for i in path_roots(code, "crate") {
        found.extend(paths_after(code, i + "crate::".len()));
    }
    // `super::` is relative to the parent of the file's module.
    for i in path_roots(code, "super") {
        let mut base: Vec<String> = file.module[..file.module.len().saturating_sub(1)].to_vec();
        let mut at = i + "super::".len();
        while code[at..].starts_with("super::") {
            base.pop();
            at += "super::".len();
        }
        for tail in paths_after(code, at) {
            let mut full = base.clone();
            full.extend(tail);
            found.push(full);
        }
    }
    // Child modules named directly (`pub use remote::RemoteKeys`, `inbound::f()`), and `self::`.
    let children = declared_modules(code);
    for child in children.iter().map(String::as_str).chain(["self"]) {
        for i in path_roots(code, child) {
            let start = if child == "self" { i + "self::".len() } else { i };
            for tail in paths_after(code, start) {
                let mut full = file.module.clone();
                full.extend(tail);
                found.push(full);
            }
        }
    }
    found
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = library_files();
    let folders: BTreeSet<String> = files
        .iter()
        .filter(|f| f.module.len() == 1 && f.path.file_name().is_some_and(|n| n == "mod.rs"))
        .map(|f| f.module[0].clone())
        .collect();
    let nodes: BTreeSet<String> = files.iter().filter_map(|f| node_of(&f.module, &folders)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = nodes.iter().map(|n| (n.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = node_of(&file.module, &folders) else { continue };
        for path in referenced_modules(file) {
            // The longest prefix of the path that is a node.
            let to = (1..=path.len().min(2))
                .rev()
                .filter_map(|n| node_of(&path[..n], &folders))
                .find(|candidate| nodes.contains(candidate));
            if let Some(to) = to.filter(|to| *to != from) {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

/// Every cycle's strongly connected component (Tarjan's algorithm), with more than one node.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, node: &'g str) {
            let next = self.index.len();
            self.index.insert(node, next);
            self.low.insert(node, next);
            self.stack.push(node);
            self.on_stack.insert(node);
            for to in &self.graph[node] {
                let to = to.as_str();
                if !self.index.contains_key(to) {
                    self.visit(to);
                    let low = self.low[node].min(self.low[to]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(to) {
                    let low = self.low[node].min(self.index[to]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !tarjan.index.contains_key(node.as_str()) {
            tarjan.visit(node);
        }
    }
    tarjan.found
}

/// For one component, the edges that keep it a cycle (to say where to cut).
fn describe(component: &[String], graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    let members: BTreeSet<&String> = component.iter().collect();
    let edges: Vec<String> = component
        .iter()
        .flat_map(|from| graph[from].iter().filter(|to| members.contains(to)).map(move |to| format!("{from} -> {to}")))
        .collect();
    format!("{{{}}}: {}", component.join(", "), edges.join("; "))
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = module_graph();
    assert!(graph.len() > 20, "the module walk found only {} modules", graph.len());
    let found = cycles(&graph);
    let report: Vec<String> = found.iter().map(|c| describe(c, &graph)).collect();
    assert!(found.is_empty(), "import cycles:\n{}", report.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_planted_cycle() {
    // The checker itself must be able to fail: a two-module cycle and a three-module one.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "a"), ("c", "d"), ("d", "e"), ("e", "c"), ("e", "f")] {
        graph.entry(from.into()).or_default().insert(to.into());
        graph.entry(to.into()).or_default();
    }
    let found = cycles(&graph);
    assert_eq!(found, vec![vec!["a".to_owned(), "b".to_owned()], vec!["c".into(), "d".into(), "e".into()]]);
}

#[test]
fn use_trees_and_relative_paths_are_resolved() {
    let code = strip_comments_and_strings(
        "use crate::{db::{self, schema::events}, keys::SigningKey};\n// use crate::sender;\nlet s = \"crate::sync\";\n",
    );
    let file = SourceFile { path: PathBuf::from("x.rs"), module: vec!["peeks".into(), "inbound".into()], code };
    let found = referenced_modules(&file);
    let firsts: BTreeSet<String> = found.iter().map(|p| p.join("::")).collect();
    assert!(firsts.contains("db::self"), "{firsts:?}");
    assert!(firsts.contains("db::schema::events"), "{firsts:?}");
    assert!(firsts.contains("keys::SigningKey"), "{firsts:?}");
    assert!(!firsts.iter().any(|p| p.starts_with("sender") || p.starts_with("sync")), "{firsts:?}");
}

#[test]
fn long_files_say_why_at_their_top() {
    let mut offenders = Vec::new();
    for file in library_files() {
        let text = fs::read_to_string(&file.path).unwrap();
        let lines = text.lines().count();
        let explained = text.lines().take(5).any(|l| l.to_lowercase().contains(LONG_FILE_MARKER));
        if lines > MAX_FILE_LINES && !explained {
            offenders.push(format!("{} ({lines} lines)", file.path.display()));
        }
    }
    assert!(
        offenders.is_empty(),
        "files over {MAX_FILE_LINES} lines without `{LONG_FILE_MARKER} <reason>`: {offenders:?}"
    );
}

/// The HTTP edge: every function whose signature answers with an actix response.
fn handler_lengths() -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for file in library_files() {
        let text = fs::read_to_string(&file.path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            let is_fn = line.trim_start().starts_with("pub async fn ") || line.trim_start().starts_with("async fn ");
            if !is_fn {
                i += 1;
                continue;
            }
            // The signature runs to the line that opens the body.
            let mut end_of_signature = i;
            while !lines[end_of_signature].trim_end().ends_with('{') {
                end_of_signature += 1;
            }
            let signature = lines[i..=end_of_signature].join(" ");
            let indent = line.len() - line.trim_start().len();
            let close = (end_of_signature + 1..lines.len())
                .find(|&j| lines[j].len() - lines[j].trim_start().len() == indent && lines[j].trim() == "}")
                .unwrap_or(lines.len() - 1);
            if signature.contains("HttpResponse") || signature.contains("impl Responder") {
                let name = line.trim_start().trim_start_matches("pub ").trim_start_matches("async fn ");
                let name = name.split('(').next().unwrap_or(name);
                found.push((format!("{}::{name}", file.module.join("::")), close - i + 1));
            }
            i = close + 1;
        }
    }
    found
}

#[test]
fn http_handlers_are_at_most_thirty_lines() {
    let handlers = handler_lengths();
    assert!(handlers.len() > 20, "found only {} handlers", handlers.len());
    let long: Vec<String> = handlers
        .iter()
        .filter(|(_, lines)| *lines > MAX_HANDLER_LINES)
        .map(|(name, lines)| format!("{name}: {lines} lines"))
        .collect();
    assert!(long.is_empty(), "handlers over {MAX_HANDLER_LINES} lines: {long:?}");
}

/// Every edge of the graph points at a module of the graph (a reference the resolver
/// mapped wrongly would otherwise vanish from the cycle check). With `--nocapture`, prints the
/// graph: `cargo test --test architecture module_graph -- --nocapture`.
#[test]
fn module_graph_edges_point_at_modules() {
    let graph = module_graph();
    for (from, to) in &graph {
        println!("{from} -> {}", to.iter().cloned().collect::<Vec<_>>().join(", "));
        for target in to {
            assert!(graph.contains_key(target), "{from} -> {target}: not a module");
        }
    }
    assert!(graph["app"].contains("rooms"), "the wiring module is seen to use rooms");
}

#[test]
fn architecture_md_maps_exactly_the_modules() {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_owned()))
        .collect();
    let actual: BTreeSet<String> = module_graph().into_keys().collect();
    let missing: Vec<&String> = actual.difference(&listed).collect();
    let gone: Vec<&String> = listed.difference(&actual).collect();
    assert!(missing.is_empty() && gone.is_empty(), "ARCHITECTURE.md misses {missing:?} and lists gone {gone:?}");
}
