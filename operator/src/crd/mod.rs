//! The custom resources (group `stowage.dev`, version `v1alpha1`) and the
//! parts of their status they share. `crdgen` writes `crds/*.yaml` from these
//! types; a test fails when the committed YAML drifts from them.

pub mod condition;
pub mod index_collection;
pub mod upload_job;

use kube::CustomResourceExt;

pub use condition::Condition;
pub use index_collection::{IndexCollection, IndexCollectionSpec, IndexCollectionStatus};
pub use upload_job::{UploadJob, UploadJobSpec, UploadJobStatus};

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
