//! No value a resource can carry may crash the operator: arbitrary specs go
//! through what a reconcile does without I/O — judging, status computation
//! and scheduling — and nothing may panic. Pure: needs nothing running.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use stowage_common::state::collections::{RunCounts, RunState, SyncRun};
use stowage_common::state::index::IndexCounts;
use stowage_common::state::uploads::{ItemError, JobCounts, JobRecord};
use stowage_operator::crd::{IndexCollection, Raw, UploadJob, judge};
use stowage_operator::status::{index_collection, upload_job};

/// Any JSON value a hostile resource could hold in one field: extreme and
/// negative numbers, floats, strings with NULs and non-ASCII, containers.
fn any_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(0), Just(-1), Just(1)]
            .prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("18446744073709551615s1s"),
            Just("99999999999999999999d"),
            Just("9223372036s"),
            Just("10s"),
            Just("http://"),
            Just("https://example.com/a b"),
            Just("https://user:pw@example.com"),
            Just("\u{0}"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ]
}

fn any_value() -> impl Strategy<Value = Value> {
    any_leaf().prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A spec that is valid but for `overrides`: each replaces one field (by
/// JSON pointer) with an arbitrary value, so most cases get past the first
/// check and reach the deeper ones.
fn with_overrides(base: Value, fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(fields), any_value()), 0..4).prop_map(
        move |overrides| {
            let mut spec = base.clone();
            for (pointer, v) in overrides {
                if let Some(slot) = spec.pointer_mut(pointer) {
                    *slot = v;
                } else if let Some((parent, key)) = pointer.rsplit_once('/')
                    && let Some(Value::Object(o)) = spec.pointer_mut(parent)
                {
                    o.insert(key.to_string(), v);
                }
            }
            spec
        },
    )
}

fn upload_spec() -> impl Strategy<Value = Value> {
    with_overrides(
        json!({
            "source": {"http": {"urls": ["https://example.com/a.txt"]}},
            "destination": {"bucket": "docs", "keyPrefix": "in/", "endpoint": "https://s3.example.com"},
            "partSizeBytes": 5242880, "concurrency": 4,
            "retry": {"maxAttempts": 3, "backoff": {"baseMillis": 100, "maxMillis": 1000}},
            "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 30,
        }),
        &[
            "/source",
            "/source/http/urls",
            "/source/http/urls/0",
            "/destination/bucket",
            "/destination/keyPrefix",
            "/destination/endpoint",
            "/destination/region",
            "/partSizeBytes",
            "/concurrency",
            "/retry/maxAttempts",
            "/retry/backoff/baseMillis",
            "/retry/backoff/maxMillis",
            "/activeDeadlineSeconds",
            "/ttlSecondsAfterFinished",
            "/suspend",
            "/conflictPolicy",
            "/extra",
        ],
    )
}

fn collection_spec() -> impl Strategy<Value = Value> {
    with_overrides(
        json!({
            "source": {"bucket": "docs", "prefix": "kb/", "include": ["**/*.md"]},
            "resyncInterval": "10m",
            "chunking": {"size": 1000, "overlap": 100},
            "embedding": {"provider": "builtin"},
        }),
        &[
            "/source/bucket",
            "/source/include",
            "/source/include/0",
            "/source/endpoint",
            "/resyncInterval",
            "/chunking/size",
            "/chunking/overlap",
            "/chunking/strategy",
            "/embedding/provider",
            "/embedding/dimensions",
            "/embedding/endpoint",
            "/suspend",
            "/watchUploads",
        ],
    )
}

fn raw<K>(kind: &str, spec: Value, status: Value) -> Raw<K> {
    serde_json::from_value(json!({
        "apiVersion": "stowage.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "team-a", "uid": "u", "generation": 1,
                     "annotations": {"stowage.dev/replay": "1"}},
        "spec": spec,
        "status": status,
    }))
    .expect("any spec and status fit a raw resource")
}

/// Instants anywhere chrono can represent, and the edges.
fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        (-8_000_000_000_000i64..8_000_000_000_000i64)
            .prop_map(|s| DateTime::from_timestamp(s, 0).unwrap_or_default()),
    ]
}

fn any_status() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any_value(),
        any_time()
            .prop_map(|t| json!({"completionTime": t, "nextSyncTime": t, "phase": "Succeeded"})),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn upload_jobs_never_panic(
        spec in upload_spec(),
        status in any_status(),
        created in any_time(),
        now in any_time(),
        counts in any::<[i64; 8]>(),
        state in prop::sample::select(&["pending", "running", "suspended", "succeeded", "failed", "cancelled", "??"][..]),
        resync in any::<u64>(),
    ) {
        let raw = raw::<UploadJob>("UploadJob", spec, status);
        let Ok(uj) = judge::<UploadJob>(&raw) else { return Ok(()) };
        // A state no version wrote is refused where the row is read.
        let Ok(state) = stowage_common::state::uploads::JobState::parse(state) else {
            prop_assert_eq!(state, "??");
            return Ok(());
        };
        let job = JobRecord {
            id: uuid::Uuid::nil(),
            namespace: "team-a".into(),
            name: "x".into(),
            spec: uj.spec.upload.clone(),
            state,
            planned: true,
            created_at: created,
            started_at: Some(created),
            finished_at: Some(now),
            last_error: Some("the job ran longer than activeDeadlineSeconds (1 s)".into()),
            failure: Some(stowage_common::state::uploads::JobFailure::DeadlineExceeded),
        };
        let c = JobCounts {
            total: counts[0], succeeded: counts[1], skipped_duplicate: counts[2],
            skipped_exists: counts[3], failed: counts[4], dead_lettered: counts[5],
            bytes_total: counts[6], bytes_done: counts[7], ..JobCounts::default()
        };
        let errors = [ItemError { dest_key: "k".into(), error: "e".into(), attempts: i32::MAX, dead_lettered: true }];
        let s = upload_job::compute(&uj, &upload_job::Snapshot { job: &job, counts: &c, errors: &errors });
        let _ = upload_job::deadline(&uj, &job);
        let _ = upload_job::expiry(&uj, &s);
        let _ = upload_job::replay_request(&uj);
        let _ = upload_job::next_action(&uj, &job, &s, now, std::time::Duration::from_millis(resync));
        let _ = upload_job::until(now, created);
    }

    #[test]
    fn index_collections_never_panic(
        spec in collection_spec(),
        status in any_status(),
        now in any_time(),
        generation in any::<Option<i64>>(),
        counts in any::<[i64; 6]>(),
        state in prop::sample::select(&[RunState::InProgress, RunState::Completed, RunState::Failed, RunState::Abandoned][..]),
    ) {
        let raw = raw::<IndexCollection>("IndexCollection", spec, status);
        let Ok(ic) = judge::<IndexCollection>(&raw) else { return Ok(()) };
        let interval = index_collection::parse_interval(&ic.spec.resync_interval).expect("judged");
        let _ = index_collection::next_sync_after(now, interval);
        let _ = index_collection::sync_due(&ic, generation, now);
        let run = SyncRun {
            id: counts[0], collection_id: uuid::Uuid::nil(), state, trigger: "schedule".into(),
            generation: counts[1], started_at: now, finished_at: Some(now),
            counts: RunCounts { seen: counts[2], new: counts[3], failed: counts[4], ..RunCounts::default() },
            error: Some("e".into()),
        };
        let _ = index_collection::compute(&ic, &index_collection::Snapshot {
            collection_id: uuid::Uuid::nil(),
            latest_run: Some(&run),
            next_sync_time: Some(now),
            index: IndexCounts { generation, indexed: counts[5], skipped: counts[2], failed: counts[3], chunks: counts[4], bytes: counts[1] },
            run_pending: counts[0],
        });
    }

    #[test]
    fn durations_never_panic(s in "[0-9]{0,25}(ms|s|m|h|d|x)?([0-9]{0,25}(ms|s|m|h|d))?") {
        let _ = stowage_common::config::parse_duration(&s);
        let _ = index_collection::parse_interval(&s);
    }
}
