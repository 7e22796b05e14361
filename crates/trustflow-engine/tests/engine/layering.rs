//! The engine's layers, checked: a module refers only to modules of lower layers (or
//! its own), so there are no import circles and the runtime does not know the Parquet
//! source or sink. docs/architecture.md draws the same map.

use trustflow_testutil::{find_cycle, module_graph, repo_root};

/// The engine's modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["columns", "digest", "fields", "stats", "storage"],
    &["models"],
    &["stages", "quarantine"],
    &["spec"],
    &["runtime"],
    &["source", "sink"],
    &["plan"],
    &["run", "inspect"],
    &["report"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS"))
}

#[test]
fn modules_only_use_lower_layers() {
    let graph = module_graph(&repo_root().join("crates/trustflow-engine/src"));
    assert!(graph.len() >= 12, "found only {:?}", graph.keys());
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        for used in uses {
            if layer_of(used) >= layer_of(module) {
                wrong.push(format!("{module} -> {used}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "references against the layering: {wrong:?}"
    );
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn the_checker_sees_references_and_cycles() {
    // The check itself must be able to fail: a circle planted in a scratch crate.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("runtime")).unwrap();
    std::fs::write(
        dir.path().join("runtime/mod.rs"),
        "// crate::plan in a comment is not a use\nuse crate::{source::Plan, error};\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("source.rs"), "use super::runtime::X;\n").unwrap();
    std::fs::write(dir.path().join("error.rs"), "").unwrap();
    let graph = module_graph(dir.path());
    assert_eq!(
        graph["runtime"].iter().collect::<Vec<_>>(),
        ["error", "source"]
    );
    assert_eq!(graph["source"].iter().collect::<Vec<_>>(), ["runtime"]);
    let cycle = find_cycle(&graph).expect("a cycle");
    assert!(cycle.contains(&"runtime".to_string()) && cycle.contains(&"source".to_string()));
}
