//! The Helm chart as the end-to-end tests need it: rendered with the real
//! helm binary of the local stack and parsed (through PyYAML, in the
//! charttools venv) into JSON values.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use stowage_common::testing::StackEnv;

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/stowage")
}

fn tool(env: &StackEnv, key: &str) -> PathBuf {
    match env.try_get(key) {
        Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
        _ => panic!(
            "{key} is not installed: run `scripts/stack up` (or `scripts/stack install charttools`)"
        ),
    }
}

/// `helm template <release> charts/stowage --namespace <ns>` with `values`
/// (JSON is YAML), as JSON documents (empty ones dropped).
pub fn render(release: &str, namespace: &str, values: &Value) -> Vec<Value> {
    let env = StackEnv::load();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values.to_string()).expect("write values");
    let out = Command::new(tool(&env, "STOWAGE_HELM"))
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace, "--values"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = dir.path().join("rendered.yaml");
    std::fs::write(&yaml, &out.stdout).expect("write rendered");
    let parsed = Command::new(tool(&env, "STOWAGE_CHARTTOOLS_PYTHON"))
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        )
        .arg(&yaml)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        parsed.status.success(),
        "YAML parse: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    match serde_json::from_slice(&parsed.stdout).expect("JSON from PyYAML") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}
