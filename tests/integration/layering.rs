//! The trainer's and the tools' module graphs have no import circles (the engine's
//! layers are checked in its own tests).

use trustflow_testutil::{find_cycle, module_graph, repo_root};

#[test]
fn trainer_and_tools_have_no_import_circles() {
    for src in ["crates/trustflow-train/src", "src"] {
        let graph = module_graph(&repo_root().join(src));
        assert!(!graph.is_empty(), "{src}: no modules found");
        assert_eq!(find_cycle(&graph), None, "{src}: {graph:?}");
    }
}
