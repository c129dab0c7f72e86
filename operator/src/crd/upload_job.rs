//! `UploadJob`: copy a set of files into a bucket.

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stowage_common::spec;

use super::Condition;

/// Longest `activeDeadlineSeconds` / `ttlSecondsAfterFinished`: ten years.
pub const MAX_SECONDS: i64 = 10 * 365 * 86_400;

/// Copy the files of an S3 prefix or a list of URLs into a bucket, verified
/// by checksum and resumable across worker restarts.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "UploadJob",
    namespaced,
    status = "UploadJobStatus",
    shortname = "uj",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.files.failed","priority":1}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.bytes.done","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.source == oldSelf.source && self.destination == oldSelf.destination", "message": "source and destination are immutable: create a new UploadJob"}
]))]
#[serde(rename_all = "camelCase")]
pub struct UploadJobSpec {
    /// What to upload, where, and how: the part the workers act on.
    #[serde(flatten)]
    pub upload: spec::UploadJobSpec,
    /// Stop handing out files (in-flight files finish); clear it to resume.
    #[serde(default)]
    pub suspend: bool,
    /// Fail the job when it has run longer than this (counted from its start;
    /// at most ten years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SECONDS))]
    pub active_deadline_seconds: Option<i64>,
    /// Delete the UploadJob this long after it finished (succeeded or
    /// failed; at most ten years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SECONDS))]
    pub ttl_seconds_after_finished: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Suspended,
}

impl Phase {
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `done/total` files, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default)]
    pub files: FileCounts,
    #[serde(default)]
    pub bytes: ByteCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The most recent file errors (at most ten).
    #[serde(default)]
    pub last_errors: Vec<FileError>,
    /// The job's id in Stowage's database (`stowctl status <id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The last value of the `stowage.dev/replay` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileCounts {
    pub total: i64,
    pub uploaded: i64,
    /// Skipped because the same content was already stored (dedup).
    pub skipped_duplicate: i64,
    /// Skipped because the key existed (conflict policy `skip`).
    pub skipped_exists: i64,
    pub failed: i64,
    pub dead_lettered: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ByteCounts {
    pub total: i64,
    pub done: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileError {
    pub key: String,
    pub error: String,
    pub attempts: i32,
    pub dead_lettered: bool,
}
