//! The code's layout, checked on every test run so that it cannot rot:
//! no import circles between the library's top-level modules, no long
//! functions in the pipeline, every relative doc link resolves. Reads
//! files only: no services, well under a second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use proc_macro2::{Ident, Spacing, Span, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// The longest a function of the pipeline may be, `fn` to closing brace.
const MAX_PIPELINE_FN_LINES: usize = 100;

#[test]
fn no_module_import_circles() {
    let graph = module_graph(&rust_files(&root().join("src")));
    println!("{}", graph_lines(&graph));
    let circles = circles(&graph);
    assert!(circles.is_empty(), "{}", circle_report(&graph, &circles));
}

#[test]
fn pipeline_functions_are_short() {
    let files: Vec<_> = rust_files(&root().join("src"))
        .into_iter()
        .filter(|(file, _)| file == "src/pipeline.rs" || file.starts_with("src/pipeline/"))
        .collect();
    // Renaming the pipeline must not turn this check into a silent pass.
    assert!(
        !files.is_empty(),
        "no src/pipeline.rs or src/pipeline/: point this test at what wires the parts"
    );
    let long: Vec<String> = files
        .iter()
        .flat_map(|(file, text)| long_fns(file, text, MAX_PIPELINE_FN_LINES))
        .collect();
    assert!(
        long.is_empty(),
        "functions in the pipeline longer than {MAX_PIPELINE_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn every_doc_link_resolves() {
    let out = Command::new(root().join("scripts/check-links"))
        .output()
        .expect("running scripts/check-links");
    assert!(
        out.status.success(),
        "scripts/check-links failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn circle_finder_reports_a_two_module_circle_with_the_line_of_each_edge() {
    let graph = module_graph(&[
        ("src/lib.rs".into(), "pub mod a;\npub mod b;\n".into()),
        (
            "src/a.rs".into(),
            "use std::fmt;\nuse crate::b::Thing;\n".into(),
        ),
        // Inside a macro's tokens, which syn does not parse.
        ("src/b/mod.rs".into(), "mod inner;\n".into()),
        (
            "src/b/inner.rs".into(),
            "fn f() {\n    metrics::counter!(crate::a::EVENTS).increment(1);\n}\n".into(),
        ),
    ]);
    let circles = circles(&graph);
    assert_eq!(circles, [["a", "b"]]);
    let report = circle_report(&graph, &circles);
    assert!(report.contains("a -> b  src/a.rs:2"), "{report}");
    assert!(report.contains("b -> a  src/b/inner.rs:2"), "{report}");
}

#[test]
fn circle_finder_passes_a_three_module_chain() {
    let graph = module_graph(&[
        // Nested braces.
        (
            "src/a.rs".into(),
            "use crate::{b::{self, Thing}, a::Own};\n".into(),
        ),
        // A type path, and `super` as far up as the crate root.
        (
            "src/b/mod.rs".into(),
            "mod x;\nfn f(_: crate::c::T) {}\n".into(),
        ),
        (
            "src/b/x.rs".into(),
            "mod tests {\n    use super::super::super::c::T;\n}\n".into(),
        ),
        (
            "src/c.rs".into(),
            "use std::fmt;\nuse super::Local;\n".into(),
        ),
    ]);
    assert_eq!(graph_lines(&graph), "a -> b\nb -> c\nc -> (nothing)");
    assert_eq!(graph["b"]["c"], "src/b/mod.rs:2");
    assert!(circles(&graph).is_empty());
}

#[test]
fn length_check_catches_101_lines_and_passes_100() {
    let text = format!(
        "impl S {{\n{}{}}}\n#[cfg(test)]\nmod tests {{\n{}}}\nfn outer() {{\n{}}}\n",
        fn_of_lines("long", 101),
        fn_of_lines("fits", 100),
        fn_of_lines("test_code", 300),
        fn_of_lines("nested", 101),
    );
    let long = long_fns("src/pipeline.rs", &text, 100);
    assert_eq!(
        long,
        [
            "src/pipeline.rs:2: S::long is 101 lines",
            "src/pipeline.rs:507: outer is 103 lines",
            "src/pipeline.rs:508: nested is 101 lines"
        ]
    );
}

/// A function of exactly `lines` lines, `fn` to closing brace.
fn fn_of_lines(name: &str, lines: usize) -> String {
    format!(
        "fn {name}() {{\n{}}}\n",
        "    let _ = 1;\n".repeat(lines - 2)
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, as (path from the repository root, text),
/// sorted by path.
fn rust_files(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(root())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// `src/sink/publisher.rs` → `sink::publisher`, `src/sink/mod.rs` →
/// `sink`; none for the crate root (`lib.rs`, `main.rs`).
fn module_path(file: &str) -> Option<Vec<String>> {
    let rel = file.strip_prefix("src/")?.strip_suffix(".rs")?;
    let mut path: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if path.len() > 1 && path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    (path != ["lib"] && path != ["main"]).then_some(path)
}

/// Top-level module → the top-level modules it refers to → the first place
/// that does, as `file:line`.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn module_graph(files: &[(String, String)]) -> Graph {
    let mut graph = Graph::new();
    for (file, _) in files {
        if let Some(path) = module_path(file) {
            graph.entry(path[0].clone()).or_default();
        }
    }
    for (file, text) in files {
        let Some(path) = module_path(file) else {
            continue;
        };
        let ast = syn::parse_file(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut refs = Refs {
            module: path.clone(),
            found: Vec::new(),
        };
        refs.visit_file(&ast);
        refs.found.sort_by_key(|(_, line)| *line);
        for (dep, line) in refs.found {
            if dep != path[0] && graph.contains_key(&dep) {
                let deps = graph.entry(path[0].clone()).or_default();
                deps.entry(dep).or_insert_with(|| format!("{file}:{line}"));
            }
        }
    }
    graph
}

/// `module -> dep, dep` lines, for a reviewer to see the layering.
fn graph_lines(graph: &Graph) -> String {
    let line = |(module, deps): (&String, &BTreeMap<String, String>)| {
        let deps: Vec<&str> = deps.keys().map(String::as_str).collect();
        let deps = if deps.is_empty() {
            "(nothing)".to_owned()
        } else {
            deps.join(", ")
        };
        format!("{module} -> {deps}")
    };
    graph.iter().map(line).collect::<Vec<_>>().join("\n")
}

/// The top-level modules one file names, each with the line of the name.
struct Refs {
    /// Where the visitor is: the file's module path, then any inline `mod`.
    module: Vec<String>,
    found: Vec<(String, usize)>,
}

impl Refs {
    /// Records the top-level module that a path names when it goes through
    /// the crate root: `crate::m::..`, or `super::..::m::..` with as many
    /// `super`s as the current module is deep.
    fn note(&mut self, segments: &[Ident]) {
        let supers = segments.iter().take_while(|s| *s == "super").count();
        let named = match segments.first() {
            Some(first) if first == "crate" => segments.get(1),
            _ if supers > 0 && supers == self.module.len() => segments.get(supers),
            _ => None,
        };
        if let Some(module) = named {
            self.found
                .push((module.to_string(), module.span().start().line));
        }
    }

    /// Every full path of a `use` tree: `use crate::{a, b::{c}}` is
    /// `crate::a` and `crate::b::c`.
    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<Ident>) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.clone());
                self.use_tree(&p.tree, prefix);
                prefix.pop();
            }
            syn::UseTree::Name(syn::UseName { ident })
            | syn::UseTree::Rename(syn::UseRename { ident, .. }) => {
                prefix.push(ident.clone());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.note(prefix),
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(tree, prefix);
                }
            }
        }
    }

    /// The paths in a macro's tokens, which syn leaves unparsed:
    /// `metrics::counter!(crate::metrics::EVENTS_PUBLISHED)`.
    fn tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(group) => {
                    self.tokens(group.stream());
                    i += 1;
                }
                TokenTree::Ident(_) => {
                    let (segments, next) = path_at(&tokens, i);
                    self.note(&segments);
                    i = next;
                }
                _ => i += 1,
            }
        }
    }
}

/// The path `a :: b :: c` that starts with the identifier at `tokens[i]`,
/// and the index after it.
fn path_at(tokens: &[TokenTree], mut i: usize) -> (Vec<Ident>, usize) {
    let mut segments = Vec::new();
    while let Some(TokenTree::Ident(ident)) = tokens.get(i) {
        segments.push(ident.clone());
        let colons = match (tokens.get(i + 1), tokens.get(i + 2)) {
            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) => {
                a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
            }
            _ => false,
        };
        if !colons {
            return (segments, i + 1);
        }
        i += 3;
    }
    (segments, i)
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.module.push(m.ident.to_string());
        visit::visit_item_mod(self, m);
        self.module.pop();
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.leading_colon.is_none() {
            let segments: Vec<Ident> = path.segments.iter().map(|s| s.ident.clone()).collect();
            self.note(&segments);
        }
        visit::visit_path(self, path);
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if item.leading_colon.is_none() {
            self.use_tree(&item.tree, &mut Vec::new());
        }
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        visit::visit_macro(self, mac);
    }
}

/// The sets of modules that import one another in a circle (strongly
/// connected components of more than one module), sorted.
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    let reach: BTreeMap<&String, BTreeSet<&String>> = graph
        .keys()
        .map(|module| (module, reachable(graph, module)))
        .collect();
    let mut circles = BTreeSet::new();
    for (module, reached) in &reach {
        let circle: Vec<String> = reached
            .iter()
            .filter(|other| reach[*other].contains(module))
            .map(|m| (*m).clone())
            .collect();
        if circle.len() > 1 {
            circles.insert(circle);
        }
    }
    circles.into_iter().collect()
}

/// The modules that `from` refers to, directly or through others.
fn reachable<'g>(graph: &'g Graph, from: &String) -> BTreeSet<&'g String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from];
    while let Some(module) = todo.pop() {
        for dep in graph.get(module).into_iter().flat_map(BTreeMap::keys) {
            if seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    seen
}

/// Each circle with every edge inside it (each lies on a circle) and one
/// place that makes the edge.
fn circle_report(graph: &Graph, circles: &[Vec<String>]) -> String {
    let mut report = String::new();
    for circle in circles {
        report += &format!("import circle between {}:\n", circle.join(", "));
        for module in circle {
            for (dep, site) in graph[module].iter().filter(|(dep, _)| circle.contains(dep)) {
                report += &format!("  {module} -> {dep}  {site}\n");
            }
        }
    }
    report
}

/// `file:line: name is N lines` for each function of `text` longer than
/// `max` lines, `fn` to closing brace; `#[cfg(test)]` modules are skipped.
fn long_fns(file: &str, text: &str, max: usize) -> Vec<String> {
    let ast = syn::parse_file(text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut lengths = Lengths {
        file,
        max,
        owner: None,
        long: Vec::new(),
    };
    lengths.visit_file(&ast);
    lengths.long
}

struct Lengths<'a> {
    file: &'a str,
    max: usize,
    /// The type of the `impl` block the visitor is in, if any.
    owner: Option<String>,
    long: Vec<String>,
}

impl Lengths<'_> {
    fn check(&mut self, name: String, fn_token: Span, body: &syn::Block) {
        let first = fn_token.start().line;
        let lines = body.brace_token.span.close().end().line - first + 1;
        if lines > self.max {
            self.long
                .push(format!("{}:{first}: {name} is {lines} lines", self.file));
        }
    }
}

impl<'ast> Visit<'ast> for Lengths<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_cfg_test(&m.attrs) {
            visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        let owner = match &*item.self_ty {
            syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
            _ => None,
        };
        let outer = std::mem::replace(&mut self.owner, owner);
        visit::visit_item_impl(self, item);
        self.owner = outer;
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check(f.sig.ident.to_string(), f.sig.fn_token.span, &f.block);
        visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        let name = match &self.owner {
            Some(owner) => format!("{owner}::{}", f.sig.ident),
            None => f.sig.ident.to_string(),
        };
        self.check(name, f.sig.fn_token.span, &f.block);
        visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(body) = &f.default {
            self.check(f.sig.ident.to_string(), f.sig.fn_token.span, body);
        }
        visit::visit_trait_item_fn(self, f);
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .meta
                .require_list()
                .is_ok_and(|list| list.tokens.to_string() == "test")
    })
}
