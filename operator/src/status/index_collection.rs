//! IndexCollection status from its sync runs, and the resync schedule.

use chrono::{DateTime, Duration, Utc};
use stowage_common::state::collections::{RunState, SyncRun};
use stowage_common::state::index::IndexCounts;

use super::{FAILED, INVALID_SPEC, PROGRESSING, READY, SUSPENDED};
use crate::crd::condition::{self, Condition};
use crate::crd::index_collection::{
    DocumentCounts, IndexCollection, IndexCollectionStatus, Phase, SyncRunStatus,
};

/// Longest resync interval: a year.
pub const MAX_INTERVAL_SECS: u64 = 365 * 86_400;

/// Parses a resync interval such as `90s`, `10m` or `1h30m` (the CRD schema
/// admits the same pattern); from ten seconds to a year.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = stowage_common::config::parse_duration(s)?;
    if d < std::time::Duration::from_secs(10) {
        return Err(format!("{s:?} is shorter than the 10s minimum"));
    }
    if d > std::time::Duration::from_secs(MAX_INTERVAL_SECS) {
        return Err(format!("{s:?} is longer than the 365d maximum"));
    }
    Duration::from_std(d).map_err(|_| format!("{s:?} is too long"))
}

/// Why a sync run is due now, if one is.
pub fn sync_due(
    ic: &IndexCollection,
    registered_generation: Option<i64>,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    if ic.spec.suspend {
        return None;
    }
    let generation = ic.metadata.generation.unwrap_or(1);
    match registered_generation {
        None => return Some("spec-change"),
        Some(g) if g < generation => return Some("spec-change"),
        _ => {}
    }
    let next = ic.status.as_ref().and_then(|s| s.next_sync_time);
    match next {
        Some(t) if t > now => None,
        _ => Some("schedule"),
    }
}

pub struct Snapshot<'a> {
    pub collection_id: uuid::Uuid,
    pub latest_run: Option<&'a SyncRun>,
    pub next_sync_time: Option<DateTime<Utc>>,
    /// What the active generation holds.
    pub index: IndexCounts,
    /// Documents the run in progress has yet to index.
    pub run_pending: i64,
}

pub fn compute(ic: &IndexCollection, snap: &Snapshot<'_>) -> IndexCollectionStatus {
    let prev = ic.status.clone().unwrap_or_default();
    let run = snap.latest_run;
    let phase = if ic.spec.suspend {
        Phase::Suspended
    } else {
        match run.map(|r| r.state) {
            None | Some(RunState::Abandoned) => Phase::Pending,
            Some(RunState::InProgress) => Phase::Syncing,
            Some(RunState::Completed) | Some(RunState::CompletedWithErrors) => Phase::Ready,
            Some(RunState::Failed) => Phase::Failed,
        }
    };
    let run_message = |r: &SyncRun| {
        let c = &r.counts;
        let mut m = format!(
            "run {} ({}): {} seen, {} new, {} changed, {} deleted, {} failed",
            r.id, r.trigger, c.seen, c.new, c.changed, c.deleted, c.failed
        );
        if let Some(e) = &r.error {
            m.push_str(": ");
            m.push_str(e);
        }
        m
    };
    // Ready follows what search can answer from: the active generation
    // keeps serving while a new run builds, and after a failed one.
    let serving = snap.index.generation.map(|g| {
        format!(
            "generation {g} serves {} documents, {} chunks",
            snap.index.indexed, snap.index.chunks
        )
    });
    let ready = match (&serving, run) {
        (Some(serves), Some(r)) if r.state == RunState::Failed => Condition::new(
            READY,
            true,
            "ServingPreviousIndex",
            format!("{serves}; the last sync failed: {}", run_message(r)),
        ),
        (Some(serves), _) => Condition::new(READY, true, "Indexed", serves.clone()),
        (None, Some(r)) if r.state == RunState::Failed => {
            Condition::new(READY, false, "SyncFailed", run_message(r))
        }
        (None, _) => Condition::new(
            READY,
            false,
            "NotIndexedYet",
            "no sync run has completed yet",
        ),
    };
    let mut conditions = vec![
        ready,
        match run {
            Some(r) if r.state == RunState::InProgress => {
                Condition::new(PROGRESSING, true, "Syncing", run_message(r))
            }
            _ => Condition::new(PROGRESSING, false, "Idle", ""),
        },
        match run {
            Some(r) if r.state == RunState::Failed => {
                Condition::new(FAILED, true, "SyncFailed", run_message(r))
            }
            _ => Condition::new(FAILED, false, "NoFailure", ""),
        },
        suspended(ic.spec.suspend),
    ];
    condition::carry_over(&prev.conditions, &mut conditions, ic.metadata.generation);
    let last = run.map(|r| SyncRunStatus {
        id: r.id,
        state: run_state_name(r.state).into(),
        started: r.started_at,
        finished: r.finished_at,
        seen: r.counts.seen,
        new: r.counts.new,
        changed: r.counts.changed,
        deleted: r.counts.deleted,
        failed: r.counts.failed,
        skipped: r.counts.skipped,
        chunks_written: r.counts.chunks_written,
        error: r.error.clone(),
    });
    IndexCollectionStatus {
        observed_generation: ic.metadata.generation,
        phase: Some(phase),
        progress: Some(format!(
            "{}/{}",
            snap.index.indexed,
            snap.index
                .indexed
                .saturating_add(snap.index.skipped)
                .saturating_add(snap.index.failed)
        )),
        documents: DocumentCounts {
            indexed: snap.index.indexed,
            pending: snap.run_pending,
            skipped: snap.index.skipped,
            failed: snap.index.failed,
        },
        chunks: snap.index.chunks,
        index_bytes: snap.index.bytes,
        index_size: snap.index.generation.map(|_| human_bytes(snap.index.bytes)),
        last_sync_run: last,
        active_generation: snap.index.generation,
        next_sync_time: if ic.spec.suspend {
            None
        } else {
            snap.next_sync_time
        },
        conditions,
        collection_id: Some(snap.collection_id.to_string()),
    }
}

/// `bytes` in binary units with one decimal: `980 B`, `12.3 MiB`.
fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{} B", bytes.max(0));
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The status of a spec the operator refuses (`prev`: the status so far).
pub fn invalid(
    prev: Option<&IndexCollectionStatus>,
    generation: Option<i64>,
    suspend: bool,
    message: &str,
) -> IndexCollectionStatus {
    let prev = prev.cloned().unwrap_or_default();
    let mut conditions = vec![
        Condition::new(READY, false, INVALID_SPEC, message),
        Condition::new(PROGRESSING, false, INVALID_SPEC, ""),
        Condition::new(FAILED, true, INVALID_SPEC, message),
        suspended(suspend),
    ];
    condition::carry_over(&prev.conditions, &mut conditions, generation);
    IndexCollectionStatus {
        observed_generation: generation,
        phase: Some(Phase::Failed),
        conditions,
        ..prev
    }
}

/// The Suspended condition: its reason always says what its status says.
fn suspended(suspend: bool) -> Condition {
    if suspend {
        Condition::new(
            SUSPENDED,
            true,
            "SuspendedBySpec",
            "sync runs are not scheduled",
        )
    } else {
        Condition::new(SUSPENDED, false, "NotSuspended", "")
    }
}

/// When the next scheduled sync is due after one requested at `now`.
pub fn next_sync_after(now: DateTime<Utc>, interval: Duration) -> Option<DateTime<Utc>> {
    now.checked_add_signed(interval)
}

fn run_state_name(s: RunState) -> &'static str {
    match s {
        RunState::InProgress => "InProgress",
        RunState::Completed => "Completed",
        RunState::CompletedWithErrors => "CompletedWithErrors",
        RunState::Failed => "Failed",
        RunState::Abandoned => "Abandoned",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the controller would read: `latest_run`, with `run_pending`
    /// documents left if it is in progress, and an empty index.
    fn snapshot(latest_run: Option<&SyncRun>, run_pending: i64) -> Snapshot<'_> {
        Snapshot {
            collection_id: uuid::Uuid::nil(),
            latest_run,
            next_sync_time: None,
            index: IndexCounts::default(),
            run_pending,
        }
    }
    use stowage_common::state::collections::RunCounts;

    fn resource(status: Option<serde_json::Value>, suspend: bool) -> IndexCollection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "IndexCollection",
            "metadata": {"name": "kb", "namespace": "team-a", "uid": "u2", "generation": 2},
            "spec": {"source": {"bucket": "docs"}, "resyncInterval": "5m", "suspend": suspend},
            "status": status,
        }))
        .expect("fixture parses")
    }

    fn run(state: RunState, error: Option<&str>) -> SyncRun {
        SyncRun {
            id: 4,
            collection_id: uuid::Uuid::nil(),
            state,
            trigger: "schedule".into(),
            generation: 2,
            started_at: DateTime::from_timestamp(1_000, 0).expect("valid"),
            finished_at: None,
            counts: RunCounts::default(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn intervals_parse_like_kubernetes_durations() {
        assert_eq!(parse_interval("10m"), Ok(Duration::minutes(10)));
        assert_eq!(parse_interval("1h30m"), Ok(Duration::minutes(90)));
        assert!(
            parse_interval("5s")
                .expect_err("too short")
                .contains("10s minimum")
        );
        assert!(
            parse_interval("10x")
                .expect_err("unit")
                .contains("unknown unit")
        );
        assert!(parse_interval("m").is_err());
        assert!(
            parse_interval("18446744073709551615s1s")
                .expect_err("overflow")
                .contains("too long")
        );
        assert!(
            parse_interval("366d")
                .expect_err("long")
                .contains("365d maximum")
        );
    }

    #[test]
    fn sync_is_due_on_new_generations_and_on_schedule() {
        let now = DateTime::from_timestamp(10_000, 0).expect("valid");
        let ic = resource(None, false);
        assert_eq!(sync_due(&ic, None, now), Some("spec-change"));
        assert_eq!(sync_due(&ic, Some(1), now), Some("spec-change"));
        assert_eq!(sync_due(&ic, Some(2), now), Some("schedule"));
        let later = resource(
            Some(serde_json::json!({"nextSyncTime": "1970-01-01T03:00:00Z"})),
            false,
        );
        assert_eq!(sync_due(&later, Some(2), now), None);
        let due = resource(
            Some(serde_json::json!({"nextSyncTime": "1970-01-01T02:00:00Z"})),
            false,
        );
        assert_eq!(sync_due(&due, Some(2), now), Some("schedule"));
        assert_eq!(sync_due(&resource(None, true), None, now), None);
    }

    #[test]
    fn a_failed_run_is_reported_with_its_reason() {
        let ic = resource(None, false);
        let r = run(RunState::Failed, Some("indexing not available yet"));
        let s = compute(&ic, &snapshot(Some(&r), 0));
        assert_eq!(s.phase, Some(Phase::Failed));
        let ready = condition::find(&s.conditions, READY).expect("ready");
        assert!(!ready.is_true());
        assert_eq!(ready.reason, "SyncFailed");
        assert!(ready.message.contains("indexing not available yet"));
        assert_eq!(
            s.last_sync_run.as_ref().map(|r| r.state.as_str()),
            Some("Failed")
        );
        let done = run(RunState::Completed, None);
        let s = compute(&ic, &snapshot(Some(&done), 0));
        assert_eq!(s.phase, Some(Phase::Ready));
        let s = compute(&resource(None, true), &snapshot(None, 0));
        assert_eq!(s.phase, Some(Phase::Suspended));
    }

    /// Search keeps answering from the active generation while a resync
    /// runs and after one fails: Ready must say so, not flap to False.
    #[test]
    fn ready_stays_true_while_an_active_generation_serves() {
        let ic = resource(None, false);
        let serving = IndexCounts {
            generation: Some(2),
            indexed: 5,
            chunks: 40,
            ..IndexCounts::default()
        };
        let with_index = |run: Option<&SyncRun>| {
            compute(
                &ic,
                &Snapshot {
                    index: serving,
                    ..snapshot(run, 1)
                },
            )
        };
        let syncing = run(RunState::InProgress, None);
        let s = with_index(Some(&syncing));
        let ready = condition::find(&s.conditions, READY).expect("ready");
        assert!(ready.is_true(), "{ready:?}");
        assert_eq!(ready.reason, "Indexed");
        assert!(ready.message.contains("generation 2 serves 5 documents"));
        assert!(
            condition::find(&s.conditions, PROGRESSING)
                .expect("p")
                .is_true()
        );
        let failed = run(RunState::Failed, Some("listing the bucket: access denied"));
        let s = with_index(Some(&failed));
        let ready = condition::find(&s.conditions, READY).expect("ready");
        assert!(ready.is_true());
        assert_eq!(ready.reason, "ServingPreviousIndex");
        assert!(ready.message.contains("access denied"));
        assert!(condition::find(&s.conditions, FAILED).expect("f").is_true());
        let abandoned = run(RunState::Abandoned, None);
        assert!(
            condition::find(&with_index(Some(&abandoned)).conditions, READY)
                .expect("ready")
                .is_true()
        );
    }

    #[test]
    fn the_suspended_reason_matches_its_status() {
        for suspend in [false, true] {
            let ic = resource(None, suspend);
            for s in [
                compute(&ic, &snapshot(None, 0)),
                invalid(None, Some(1), suspend, "spec.x: bad"),
            ] {
                let c = condition::find(&s.conditions, SUSPENDED).expect("suspended");
                assert_eq!(c.is_true(), suspend);
                assert_eq!(
                    c.reason,
                    if suspend {
                        "SuspendedBySpec"
                    } else {
                        "NotSuspended"
                    }
                );
            }
        }
    }

    #[test]
    fn the_index_size_is_reported_in_bytes_and_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(12_897_485), "12.3 MiB");
        assert_eq!(human_bytes(i64::MAX), "8192.0 PiB");
        let ic = resource(None, false);
        let s = compute(&ic, &snapshot(None, 0));
        assert_eq!((s.index_bytes, s.index_size), (0, None), "no index yet");
        let serving = IndexCounts {
            generation: Some(3),
            bytes: 5 * 1024 * 1024,
            ..IndexCounts::default()
        };
        let s = compute(
            &ic,
            &Snapshot {
                index: serving,
                ..snapshot(None, 0)
            },
        );
        assert_eq!(s.index_bytes, 5 * 1024 * 1024);
        assert_eq!(s.index_size.as_deref(), Some("5.0 MiB"));
    }

    #[test]
    fn a_run_in_progress_shows_its_pending_documents() {
        let ic = resource(None, false);
        let r = run(RunState::InProgress, None);
        let s = compute(&ic, &snapshot(Some(&r), 3));
        assert_eq!(s.phase, Some(Phase::Syncing));
        assert_eq!(s.documents.pending, 3);
        let progressing = condition::find(&s.conditions, PROGRESSING).expect("progressing");
        assert!(progressing.is_true());
    }
}
