//! The custom resources (group `stowage.dev`, version `v1alpha1`) and the
//! parts of their status they share. `crdgen` writes `crds/*.yaml` from these
//! types; a test fails when the committed YAML drifts from them.

pub mod condition;
pub mod index_collection;
pub mod judge;
pub mod schema;
pub mod upload_job;

use kube::CustomResourceExt;

pub use condition::Condition;
pub use index_collection::{IndexCollection, IndexCollectionSpec, IndexCollectionStatus};
pub use judge::{Judged, Raw, judge};
pub use upload_job::{UploadJob, UploadJobSpec, UploadJobStatus};

/// What the controllers watch: resources not judged yet.
pub type RawUploadJob = Raw<UploadJob>;
pub type RawIndexCollection = Raw<IndexCollection>;

pub const GROUP: &str = "stowage.dev";
/// The finalizer both controllers put on their resources.
pub const FINALIZER: &str = "stowage.dev/cleanup";
/// Setting this annotation (to any new value) on an UploadJob replays its
/// dead-lettered files once per value.
pub const REPLAY_ANNOTATION: &str = "stowage.dev/replay";

/// Every CRD as YAML documents, in a stable order: what `crdgen` writes.
pub fn all_yaml() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "uploadjobs.stowage.dev.yaml",
            serde_yaml::to_string(&UploadJob::crd())?,
        ),
        (
            "indexcollections.stowage.dev.yaml",
            serde_yaml::to_string(&IndexCollection::crd())?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::Value;

    fn spec_schema<K: CustomResourceExt>() -> Value {
        let crd = serde_json::to_value(K::crd()).expect("CRD serializes");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    fn rules(schema: &Value) -> Vec<&str> {
        schema["x-kubernetes-validations"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["rule"].as_str()).collect())
            .unwrap_or_default()
    }

    /// What the API server refuses before the operator sees it (no emulator
    /// here evaluates OpenAPI or CEL, so the schema itself is checked).
    #[test]
    fn the_schema_carries_the_limits_and_rules() {
        let uj = spec_schema::<super::UploadJob>();
        let p = &uj["properties"];
        assert_eq!(p["partSizeBytes"]["minimum"], 5_242_880.0);
        assert_eq!(p["partSizeBytes"]["maximum"], 5_368_709_120.0);
        assert_eq!(
            (
                p["concurrency"]["minimum"].clone(),
                p["concurrency"]["maximum"].clone()
            ),
            (1.0.into(), 64.0.into())
        );
        assert_eq!(p["retry"]["properties"]["maxAttempts"]["maximum"], 100.0);
        assert_eq!(rules(&p["source"]), ["has(self.s3) != has(self.http)"]);
        assert!(
            rules(&uj).iter().any(|r| r.contains("oldSelf.source")),
            "source is immutable"
        );
        let required: Vec<&str> = uj["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(required, ["destination", "source"]);
        let ic = spec_schema::<super::IndexCollection>();
        let p = &ic["properties"];
        assert_eq!(rules(&p["chunking"]), ["self.overlap < self.size"]);
        assert!(rules(&p["embedding"])[0].contains("has(self.endpoint)"));
        assert!(p["resyncInterval"]["pattern"].is_string());
    }

    /// The committed CRDs are what the types generate: run
    /// `cargo run -p stowage-operator --bin crdgen` after changing a type.
    #[test]
    fn committed_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for (file, yaml) in super::all_yaml().expect("CRDs serialize") {
            let committed = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("crds/{file}: {e}"));
            assert!(
                committed == yaml,
                "crds/{file} drifted from the Rust types: run `cargo run -p stowage-operator --bin crdgen`"
            );
        }
    }
}
