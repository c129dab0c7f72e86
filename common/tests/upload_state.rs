//! A job's state follows its items on the stack's real PostgreSQL: it ends
//! exactly when its last item does, however many finish at once, and a
//! replayed item opens it again; a suspended job waits for its resumption.

use stowage_common::db::Pool;
use stowage_common::spec::UploadJobSpec;
use stowage_common::state::uploads::{self, ItemRecord, ItemState, NewItem, NewJob};
use stowage_common::testing::{StackEnv, fresh_schema, unique};
use uuid::Uuid;

async fn job(pool: &Pool, files: usize, suspended: bool) -> (Uuid, Vec<ItemRecord>) {
    let spec: UploadJobSpec = serde_json::from_value(serde_json::json!({
        "source": {"http": {"urls": ["http://127.0.0.1:1/a"]}},
        "destination": {"bucket": "b", "keyPrefix": "p/", "endpoint": "http://127.0.0.1:1"},
    }))
    .expect("spec");
    let db = pool.get().await.expect("db");
    let id = uploads::register_job(
        &db,
        &NewJob {
            namespace: "default".into(),
            name: "counts".into(),
            source_uid: unique("uid-"),
            generation: 1,
            spec,
            suspended,
        },
    )
    .await
    .expect("register");
    let items: Vec<NewItem> = (0..files)
        .map(|i| NewItem {
            source_ref: format!("http://127.0.0.1:1/{i}"),
            dest_key: format!("p/{i}"),
            size_bytes: None,
            invalid: None,
        })
        .collect();
    let items = uploads::add_items(&db, id, &items).await.expect("items");
    (id, items)
}

async fn unfinished(pool: &Pool, id: Uuid) -> i64 {
    let db = pool.get().await.expect("db");
    db.query_one(
        "SELECT unfinished_items FROM upload_jobs WHERE id = $1",
        &[&id],
    )
    .await
    .expect("job")
    .get(0)
}

async fn state(pool: &Pool, id: Uuid) -> String {
    let db = pool.get().await.expect("db");
    uploads::get_job(&db, id)
        .await
        .expect("job")
        .state
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ends_when_its_last_item_does_and_a_replay_reopens_it() {
    let (pool, _locks) = fresh_schema(&StackEnv::load()).await;
    let (id, items) = job(&pool, 120, false).await;
    assert_eq!(unfinished(&pool, id).await, 120, "inserted items counted");
    uploads::mark_planned(&pool.get().await.expect("db"), id)
        .await
        .expect("planned");
    assert_eq!(state(&pool, id).await, "pending");

    // Eight at a time, as workers would: start, then succeed (or, for
    // every 40th, fail for good); one item is left for later.
    let (last, rest) = items.split_last().expect("items");
    let fails = |item: &ItemRecord| item.id % 40 == 0;
    let failing: Vec<&ItemRecord> = rest.iter().filter(|i| fails(i)).collect();
    assert!(!failing.is_empty(), "some ids are multiples of 40");
    let mut running = tokio::task::JoinSet::new();
    for chunk in rest.chunks(rest.len().div_ceil(8)) {
        let pool = pool.clone();
        let chunk = chunk.to_vec();
        running.spawn(async move {
            let db = pool.get().await.expect("db");
            for item in &chunk {
                uploads::start_item(&db, item).await.expect("start");
                if fails(item) {
                    uploads::fail_item(&db, item, "gone", "permanent", true)
                        .await
                        .expect("fail");
                } else {
                    uploads::finish_item(&db, item, ItemState::Succeeded, "00", 1, None)
                        .await
                        .expect("finish");
                }
            }
        });
    }
    while let Some(r) = running.join_next().await {
        r.expect("join");
    }
    assert_eq!(unfinished(&pool, id).await, 1);
    assert_eq!(state(&pool, id).await, "running", "one item still to go");

    let db = pool.get().await.expect("db");
    uploads::start_item(&db, last).await.expect("start");
    assert_eq!(unfinished(&pool, id).await, 1, "running is unfinished");
    uploads::finish_item(&db, last, ItemState::SkippedExists, "00", 1, None)
        .await
        .expect("finish");
    assert_eq!(unfinished(&pool, id).await, 0);
    assert_eq!(
        state(&pool, id).await,
        "failed",
        "{} items failed",
        failing.len()
    );

    // Replaying the failed items reopens the job; finishing them ends it
    // again, succeeded this time.
    // A batch's replay names its succeeded files too: they stay done.
    let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
    uploads::reset_for_replay(&db, &ids).await.expect("replay");
    assert_eq!(unfinished(&pool, id).await, failing.len() as i64);
    assert_eq!(state(&pool, id).await, "running");
    for item in &failing {
        uploads::finish_item(&db, item, ItemState::Succeeded, "00", 1, None)
            .await
            .expect("finish");
    }
    assert_eq!(state(&pool, id).await, "succeeded");
    let job = uploads::get_job(&db, id).await.expect("job");
    assert!(job.finished_at.is_some() && job.started_at.is_some());
    assert_eq!(
        uploads::job_counts(&db, id)
            .await
            .expect("counts")
            .succeeded,
        120 - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_items_finished_before_planning_ends_when_planned() {
    let (pool, _locks) = fresh_schema(&StackEnv::load()).await;
    let (id, items) = job(&pool, 3, false).await;
    let db = pool.get().await.expect("db");
    for item in &items {
        uploads::finish_item(&db, item, ItemState::Succeeded, "00", 1, None)
            .await
            .expect("finish");
    }
    assert_eq!(unfinished(&pool, id).await, 0);
    assert_eq!(state(&pool, id).await, "pending", "not planned yet");
    uploads::mark_planned(&db, id).await.expect("planned");
    assert_eq!(state(&pool, id).await, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_job_ends_only_when_resumed() {
    let (pool, _locks) = fresh_schema(&StackEnv::load()).await;
    // Registered suspended: it is so from its first row, before any
    // operator could look at it again.
    let (id, items) = job(&pool, 2, true).await;
    assert_eq!(state(&pool, id).await, "suspended");
    let db = pool.get().await.expect("db");
    uploads::mark_planned(&db, id).await.expect("planned");
    assert_eq!(state(&pool, id).await, "suspended");
    // Files already in flight finish while it is suspended; the job does not.
    for item in &items {
        uploads::finish_item(&db, item, ItemState::Succeeded, "00", 1, None)
            .await
            .expect("finish");
    }
    assert_eq!(unfinished(&pool, id).await, 0);
    assert_eq!(state(&pool, id).await, "suspended");
    // Resuming with nothing left to do ends it.
    assert!(
        uploads::set_suspended(&db, id, false)
            .await
            .expect("resume")
    );
    assert_eq!(state(&pool, id).await, "succeeded");
    assert!(
        !uploads::set_suspended(&db, id, true)
            .await
            .expect("suspend")
    );
}
