//! `IndexCollection`: keep a searchable index of a bucket/prefix.

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stowage_common::spec::index::IndexSpec;

use super::Condition;

/// Keep a searchable (vector + keyword) index of the objects under a bucket
/// prefix, following new, changed and deleted objects.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "IndexCollection",
    namespaced,
    status = "IndexCollectionStatus",
    shortname = "ic",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Chunks","type":"integer","jsonPath":".status.chunks","priority":1}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.indexSize","priority":1}"#,
    printcolumn = r#"{"name":"Last Sync","type":"string","jsonPath":".status.lastSyncRun.state","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IndexCollectionSpec {
    #[serde(flatten)]
    pub index: IndexSpec,
    /// How often to list the bucket and index what changed, as a duration
    /// (`30s`, `10m`, `1h`).
    #[serde(default = "default_resync")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub resync_interval: String,
    /// Stop scheduling sync runs; the index keeps answering queries.
    #[serde(default)]
    pub suspend: bool,
}

fn default_resync() -> String {
    "10m".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Pending,
    Syncing,
    Ready,
    Failed,
    Suspended,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexCollectionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `indexed/known` documents, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default)]
    pub documents: DocumentCounts,
    #[serde(default)]
    pub chunks: i64,
    /// Bytes the active generation occupies in PostgreSQL: its chunk rows
    /// (text, vector, keyword terms) as of the last sync run, and its vector
    /// index.
    #[serde(default)]
    pub index_bytes: i64,
    /// `index_bytes` for people (`12.3 MiB`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_run: Option<SyncRunStatus>,
    /// The embedding generation search answers from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The collection's id in Stowage's database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DocumentCounts {
    pub indexed: i64,
    /// Listed but not processed yet (during a run).
    pub pending: i64,
    /// Not indexed by design: unsupported type, too large, no text.
    #[serde(default)]
    pub skipped: i64,
    /// Malformed or failed to embed; the reason is in the documents table.
    pub failed: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncRunStatus {
    pub id: i64,
    /// InProgress, Completed, CompletedWithErrors, Failed or Abandoned.
    pub state: String,
    pub started: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<DateTime<Utc>>,
    pub seen: i64,
    pub new: i64,
    pub changed: i64,
    pub deleted: i64,
    pub failed: i64,
    pub skipped: i64,
    pub chunks_written: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
