//! The dependency rule between the workspace's crates, checked against what
//! the manifests declare (`cargo metadata`, no network):
//!
//! ```text
//! stratus-proto, stratus-pki ← stratus-core ← pdisk, agent, stratus-probe ← testkit ← stratus-bench
//! ```
//!
//! A crate may depend only on crates of lower layers, so the two daemons
//! never depend on each other (the agent reaches pdisk over gRPC only) and
//! the core depends on neither. The one exception: a daemon's tests may use
//! `testkit` (a dev-dependency), which is on top because it drives the real
//! daemons as processes.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The layer of every workspace crate; a new crate must be placed here (and
/// in ARCHITECTURE.md's workspace table) before the workspace passes.
const LAYERS: [(&str, u8); 8] = [
    ("stratus-proto", 0),
    ("stratus-pki", 0),
    ("stratus-core", 1),
    ("pdisk", 2),
    ("agent", 2),
    // Speaks to both daemons over gRPC only, like their CLIs; its tests use
    // testkit like the daemons'.
    ("stratus-probe", 2),
    ("testkit", 3),
    ("stratus-bench", 4),
];

/// How one crate depends on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    Build,
    Dev,
}

/// Workspace crate → (workspace crate it depends on, how).
type Graph = BTreeMap<String, BTreeSet<(String, Kind)>>;

/// The dependencies between workspace members, as the manifests declare them.
fn workspace_graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("package name").to_owned())
        .collect();
    let mut graph = Graph::new();
    for p in packages {
        let deps = graph
            .entry(p["name"].as_str().unwrap().to_owned())
            .or_default();
        for d in p["dependencies"].as_array().expect("dependencies") {
            let name = d["name"].as_str().expect("dependency name");
            if !members.contains(name) {
                continue;
            }
            let kind = match d["kind"].as_str() {
                None => Kind::Normal,
                Some("build") => Kind::Build,
                Some("dev") => Kind::Dev,
                Some(other) => panic!("dependency kind {other:?}"),
            };
            deps.insert((name.to_owned(), kind));
        }
    }
    graph
}

/// Every crate `from` reaches through normal and build dependencies (what
/// it links), transitively.
fn reaches(graph: &Graph, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(c) = todo.pop() {
        for (d, kind) in graph.get(&c).into_iter().flatten() {
            if *kind != Kind::Dev && seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

/// The violations of the rule in `graph`, one line each.
fn violations(graph: &Graph) -> Vec<String> {
    let layers: BTreeMap<&str, u8> = LAYERS.into_iter().collect();
    let mut found = Vec::new();
    for (krate, deps) in graph {
        let Some(&layer) = layers.get(krate.as_str()) else {
            found.push(format!(
                "{krate} has no layer: place it in LAYERS (core/tests/layering.rs) and ARCHITECTURE.md"
            ));
            continue;
        };
        for (dep, kind) in deps {
            let Some(&dep_layer) = layers.get(dep.as_str()) else {
                continue; // reported as a crate of its own
            };
            let tests_on_top = *kind == Kind::Dev && dep == "testkit" && layer == 2;
            if dep_layer >= layer && !tests_on_top {
                found.push(format!(
                    "{krate} (layer {layer}) depends on {dep} (layer {dep_layer}, {kind:?})"
                ));
            }
        }
    }
    // Stated on their own as well: the two rules the layers exist for.
    if reaches(graph, "agent").contains("pdisk") {
        found.push("agent links pdisk (directly or through another crate)".into());
    }
    for daemon in ["pdisk", "agent"] {
        if reaches(graph, "stratus-core").contains(daemon) {
            found.push(format!("stratus-core links {daemon}"));
        }
    }
    found
}

#[test]
fn the_workspace_keeps_the_dependency_rule() {
    let graph = workspace_graph();
    // The graph is the real one: each daemon is there and uses the core.
    for daemon in ["pdisk", "agent"] {
        assert!(
            graph[daemon].contains(&("stratus-core".to_owned(), Kind::Normal)),
            "{daemon} should depend on stratus-core: {graph:?}"
        );
    }
    let found = violations(&graph);
    assert!(
        found.is_empty(),
        "dependency rule broken:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_each_kind_of_break() {
    let edge = |d: &str, k| (d.to_owned(), k);
    let mut graph = workspace_graph();
    assert!(violations(&graph).is_empty());

    // The agent reaching pdisk through a crate of its own layer or above.
    let mut g = graph.clone();
    g.get_mut("agent")
        .unwrap()
        .insert(edge("testkit", Kind::Normal));
    g.get_mut("testkit")
        .unwrap()
        .insert(edge("pdisk", Kind::Normal));
    let found = violations(&g);
    assert!(found
        .iter()
        .any(|v| v.starts_with("agent (layer 2) depends on testkit")));
    assert!(
        found.iter().any(|v| v.starts_with("agent links pdisk")),
        "{found:?}"
    );

    // A daemon depending on the other, even only for its tests.
    let mut g = graph.clone();
    g.get_mut("pdisk").unwrap().insert(edge("agent", Kind::Dev));
    assert_eq!(
        violations(&g),
        vec!["pdisk (layer 2) depends on agent (layer 2, Dev)"]
    );

    // The core depending on a daemon.
    let mut g = graph.clone();
    g.get_mut("stratus-core")
        .unwrap()
        .insert(edge("pdisk", Kind::Build));
    let found = violations(&g);
    assert!(
        found.contains(&"stratus-core links pdisk".to_owned()),
        "{found:?}"
    );

    // A crate nobody placed.
    graph.insert("stratus-new".into(), BTreeSet::new());
    assert!(violations(&graph)[0].starts_with("stratus-new has no layer"));
}
