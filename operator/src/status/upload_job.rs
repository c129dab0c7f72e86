//! UploadJob status from the job's state in PostgreSQL.

use chrono::{DateTime, Duration, Utc};
use stowage_common::state::uploads::{ItemError, JobCounts, JobFailure, JobRecord, JobState};

use super::{COMPLETE, FAILED, INVALID_SPEC, PROGRESSING, READY, SUSPENDED};
use crate::crd::condition::{self, Condition};
use crate::crd::upload_job::{
    ByteCounts, FileCounts, FileError, Phase, UploadJob, UploadJobStatus,
};

/// At most this many recent file errors are kept in the status.
pub const MAX_ERRORS: usize = 10;

/// What PostgreSQL says about the job.
pub struct Snapshot<'a> {
    pub job: &'a JobRecord,
    pub counts: &'a JobCounts,
    pub errors: &'a [ItemError],
}

/// The status of a job the operator accepted.
pub fn compute(uj: &UploadJob, snap: &Snapshot<'_>) -> UploadJobStatus {
    let prev = uj.status.clone().unwrap_or_default();
    let c = snap.counts;
    let phase = match snap.job.state {
        JobState::Pending => Phase::Pending,
        JobState::Running => Phase::Running,
        JobState::Suspended => Phase::Suspended,
        JobState::Succeeded => Phase::Succeeded,
        JobState::Failed | JobState::Cancelled => Phase::Failed,
    };
    // Counts come from PostgreSQL sums; saturating, whatever they hold.
    let skipped = c.skipped_duplicate.saturating_add(c.skipped_exists);
    let done = c.succeeded.saturating_add(skipped);
    let summary = format!(
        "{} of {} files uploaded, {skipped} skipped, {} failed ({} dead-lettered)",
        c.succeeded, c.total, c.failed, c.dead_lettered
    );
    let failed_message = match &snap.job.last_error {
        Some(e) => e.clone(),
        None => match snap.errors.first() {
            Some(e) => format!("{summary}; last error on {}: {}", e.dest_key, e.error),
            None => summary.clone(),
        },
    };
    let failed_reason = match (snap.job.failure, &snap.job.last_error) {
        (Some(JobFailure::DeadlineExceeded), _) => "DeadlineExceeded",
        (Some(JobFailure::PlanningFailed), _) | (None, Some(_)) => "JobFailed",
        (None, None) => "FilesFailed",
    };
    let mut conditions = vec![
        Condition::new(
            READY,
            true,
            "Accepted",
            "the job is registered and planned by the workers",
        ),
        match phase {
            Phase::Pending => Condition::new(
                PROGRESSING,
                true,
                "Planning",
                "waiting for a worker to list the source",
            ),
            Phase::Running => Condition::new(PROGRESSING, true, "Uploading", summary.clone()),
            Phase::Suspended => Condition::new(PROGRESSING, false, "Suspended", summary.clone()),
            Phase::Succeeded | Phase::Failed => {
                Condition::new(PROGRESSING, false, "Finished", summary.clone())
            }
        },
        if phase == Phase::Succeeded {
            Condition::new(COMPLETE, true, "AllFilesDone", summary.clone())
        } else {
            Condition::new(COMPLETE, false, "NotFinished", "")
        },
        if phase == Phase::Failed {
            Condition::new(FAILED, true, failed_reason, failed_message)
        } else {
            Condition::new(FAILED, false, "NoFailure", "")
        },
        Condition::new(
            SUSPENDED,
            phase == Phase::Suspended,
            if phase == Phase::Suspended {
                "SuspendedBySpec"
            } else {
                "NotSuspended"
            },
            "",
        ),
    ];
    condition::carry_over(&prev.conditions, &mut conditions, uj.metadata.generation);
    UploadJobStatus {
        observed_generation: uj.metadata.generation,
        phase: Some(phase),
        progress: Some(format!("{done}/{}", c.total)),
        files: FileCounts {
            total: c.total,
            uploaded: c.succeeded,
            skipped_duplicate: c.skipped_duplicate,
            skipped_exists: c.skipped_exists,
            failed: c.failed,
            dead_lettered: c.dead_lettered,
        },
        bytes: ByteCounts {
            total: c.bytes_total,
            done: c.bytes_done,
        },
        start_time: Some(snap.job.created_at),
        completion_time: if phase.is_finished() {
            snap.job.finished_at
        } else {
            None
        },
        conditions,
        last_errors: snap
            .errors
            .iter()
            .take(MAX_ERRORS)
            .map(|e| FileError {
                key: e.dest_key.clone(),
                error: e.error.clone(),
                attempts: e.attempts,
                dead_lettered: e.dead_lettered,
            })
            .collect(),
        job_id: Some(snap.job.id.to_string()),
        replayed: prev.replayed,
    }
}

/// The status of a spec the operator refuses: `Ready=False, reason=InvalidSpec`
/// with the message, and `Failed` so `kubectl wait --for=condition=Failed`
/// sees it too. `prev` is the status so far (counts are kept).
pub fn invalid(
    prev: Option<&UploadJobStatus>,
    generation: Option<i64>,
    message: &str,
) -> UploadJobStatus {
    let prev = prev.cloned().unwrap_or_default();
    let mut conditions = vec![
        Condition::new(READY, false, INVALID_SPEC, message),
        Condition::new(PROGRESSING, false, INVALID_SPEC, ""),
        Condition::new(COMPLETE, false, INVALID_SPEC, ""),
        Condition::new(FAILED, true, INVALID_SPEC, message),
        Condition::new(SUSPENDED, false, "NotSuspended", ""),
    ];
    condition::carry_over(&prev.conditions, &mut conditions, generation);
    UploadJobStatus {
        observed_generation: generation,
        phase: Some(Phase::Failed),
        conditions,
        ..prev
    }
}

/// When the job's `activeDeadlineSeconds` runs out, if it has one (a value
/// out of range — the schema bounds it — means none).
pub fn deadline(uj: &UploadJob, job: &JobRecord) -> Option<DateTime<Utc>> {
    let secs = uj.spec.active_deadline_seconds.filter(|s| *s > 0)?;
    job.created_at
        .checked_add_signed(Duration::try_seconds(secs)?)
}

/// When a finished job is to be deleted (`ttlSecondsAfterFinished`).
pub fn expiry(uj: &UploadJob, status: &UploadJobStatus) -> Option<DateTime<Utc>> {
    let secs = uj.spec.ttl_seconds_after_finished.filter(|s| *s >= 0)?;
    let finished = status.completion_time?;
    finished.checked_add_signed(Duration::try_seconds(secs)?)
}

/// What the controller does after a reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// `ttlSecondsAfterFinished` passed: delete the resource.
    Delete,
    /// Look again after this long.
    Requeue(std::time::Duration),
    /// Nothing to do until the resource changes.
    AwaitChange,
}

/// The next action, from the status just computed: delete a finished job
/// whose TTL passed, wake up for its TTL or deadline, else resync while it
/// is unfinished.
pub fn next_action(
    uj: &UploadJob,
    job: &JobRecord,
    status: &UploadJobStatus,
    now: DateTime<Utc>,
    resync: std::time::Duration,
) -> Next {
    if let Some(expires) = expiry(uj, status) {
        if now >= expires {
            return Next::Delete;
        }
        return Next::Requeue(until(now, expires));
    }
    if status.phase.is_some_and(Phase::is_finished) {
        return Next::AwaitChange;
    }
    let mut next = resync.max(std::time::Duration::from_secs(1));
    if let Some(deadline) = deadline(uj, job) {
        next = next.min(until(now, deadline));
    }
    Next::Requeue(next)
}

/// Time from `now` until `t` (zero if passed), at least a second.
pub fn until(now: DateTime<Utc>, t: DateTime<Utc>) -> std::time::Duration {
    t.signed_duration_since(now)
        .to_std()
        .unwrap_or_default()
        .max(std::time::Duration::from_secs(1))
}

/// A replay request: the annotation's value when it differs from the last
/// one acted on.
pub fn replay_request(uj: &UploadJob) -> Option<&str> {
    let value = uj
        .metadata
        .annotations
        .as_ref()?
        .get(crate::crd::REPLAY_ANNOTATION)?;
    let done = uj.status.as_ref().and_then(|s| s.replayed.as_deref());
    (Some(value.as_str()) != done && !value.is_empty()).then_some(value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn resource(extra: serde_json::Value) -> UploadJob {
        let mut v = serde_json::json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "UploadJob",
            "metadata": {"name": "docs", "namespace": "team-a", "uid": "u1", "generation": 3},
            "spec": {
                "source": {"http": {"urls": ["https://example.com/a.txt"]}},
                "destination": {"bucket": "docs"},
            },
        });
        merge(&mut v, extra);
        serde_json::from_value(v).expect("fixture parses")
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn job(state: JobState, last_error: Option<&str>) -> JobRecord {
        let uj = resource(serde_json::json!({}));
        JobRecord {
            id: Uuid::nil(),
            namespace: "team-a".into(),
            name: "docs".into(),
            spec: uj.spec.upload,
            state,
            planned: true,
            created_at: DateTime::from_timestamp(1_000_000, 0).expect("valid"),
            started_at: None,
            finished_at: Some(DateTime::from_timestamp(1_000_100, 0).expect("valid")),
            last_error: last_error.map(str::to_string),
            failure: last_error
                .filter(|e| e.starts_with("DeadlineExceeded"))
                .map(|_| JobFailure::DeadlineExceeded),
        }
    }

    fn counts() -> JobCounts {
        JobCounts {
            total: 10,
            succeeded: 6,
            skipped_duplicate: 1,
            skipped_exists: 1,
            failed: 2,
            dead_lettered: 1,
            bytes_total: 1000,
            bytes_done: 800,
            ..JobCounts::default()
        }
    }

    fn cond<'a>(s: &'a UploadJobStatus, t: &str) -> &'a Condition {
        condition::find(&s.conditions, t).expect("condition present")
    }

    #[test]
    fn a_succeeded_job_is_complete_with_counts() {
        let uj = resource(serde_json::json!({}));
        let mut c = counts();
        c.failed = 0;
        c.dead_lettered = 0;
        c.succeeded = 8;
        let j = job(JobState::Succeeded, None);
        let s = compute(
            &uj,
            &Snapshot {
                job: &j,
                counts: &c,
                errors: &[],
            },
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(s.progress.as_deref(), Some("10/10"));
        assert_eq!(s.files.uploaded, 8);
        assert_eq!(s.bytes.done, 800);
        assert!(cond(&s, COMPLETE).is_true());
        assert!(!cond(&s, FAILED).is_true());
        assert!(!cond(&s, PROGRESSING).is_true());
        assert_eq!(s.completion_time, j.finished_at);
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn failed_files_fail_the_job_with_the_last_error() {
        let uj = resource(serde_json::json!({}));
        let errors: Vec<ItemError> = (0..15)
            .map(|i| ItemError {
                dest_key: format!("k{i}"),
                error: "source answered HTTP 503".into(),
                attempts: 3,
                dead_lettered: true,
            })
            .collect();
        let j = job(JobState::Failed, None);
        let s = compute(
            &uj,
            &Snapshot {
                job: &j,
                counts: &counts(),
                errors: &errors,
            },
        );
        assert_eq!(s.phase, Some(Phase::Failed));
        let f = cond(&s, FAILED);
        assert!(f.is_true());
        assert_eq!(f.reason, "FilesFailed");
        assert!(
            f.message
                .contains("last error on k0: source answered HTTP 503"),
            "{}",
            f.message
        );
        assert_eq!(s.last_errors.len(), MAX_ERRORS);
        assert_eq!(s.files.dead_lettered, 1);
    }

    #[test]
    fn deadline_and_suspension_have_their_own_reasons() {
        let uj = resource(serde_json::json!({"spec": {"activeDeadlineSeconds": 60}}));
        let j = job(
            JobState::Failed,
            Some("DeadlineExceeded: ran longer than 60 s"),
        );
        let s = compute(
            &uj,
            &Snapshot {
                job: &j,
                counts: &counts(),
                errors: &[],
            },
        );
        assert_eq!(cond(&s, FAILED).reason, "DeadlineExceeded");
        assert_eq!(
            deadline(&uj, &j),
            Some(j.created_at + Duration::seconds(60))
        );
        let j = job(JobState::Suspended, None);
        let s = compute(
            &uj,
            &Snapshot {
                job: &j,
                counts: &counts(),
                errors: &[],
            },
        );
        assert_eq!(s.phase, Some(Phase::Suspended));
        assert!(cond(&s, SUSPENDED).is_true());
        assert_eq!(s.completion_time, None);
    }

    #[test]
    fn invalid_spec_keeps_counts_and_says_why() {
        let uj = resource(serde_json::json!({}));
        let s = invalid(
            uj.status.as_ref(),
            uj.metadata.generation,
            "partSizeBytes: 1024 is outside S3's part size limits",
        );
        let r = cond(&s, READY);
        assert!(!r.is_true());
        assert_eq!(r.reason, INVALID_SPEC);
        assert!(r.message.starts_with("partSizeBytes:"));
        assert_eq!(s.phase, Some(Phase::Failed));
    }

    #[test]
    fn ttl_counts_from_completion_and_replay_fires_once_per_value() {
        let mut uj = resource(serde_json::json!({
            "spec": {"ttlSecondsAfterFinished": 30},
            "metadata": {"annotations": {"stowage.dev/replay": "1"}},
        }));
        let status = UploadJobStatus {
            completion_time: DateTime::from_timestamp(2_000, 0),
            ..Default::default()
        };
        assert_eq!(expiry(&uj, &status), DateTime::from_timestamp(2_030, 0));
        assert_eq!(expiry(&uj, &UploadJobStatus::default()), None);
        assert_eq!(replay_request(&uj), Some("1"));
        uj.status = Some(UploadJobStatus {
            replayed: Some("1".into()),
            ..Default::default()
        });
        assert_eq!(replay_request(&uj), None);
    }
}
