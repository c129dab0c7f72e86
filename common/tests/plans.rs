//! The statements run once per file or per document find their row through
//! a key index even on tables PostgreSQL has no statistics for yet, as on a
//! new installation before autovacuum's first ANALYZE. There every index
//! costs the planner the same, and one that matches only the statement's
//! first column would be scanned over the whole bucket or run: O(n²) over a
//! first job or sync.

use stowage_common::db::Pool;
use stowage_common::testing::{StackEnv, fresh_schema};
use tokio_postgres::SimpleQueryMessage;

async fn plan(pool: &Pool, sql: &str) -> String {
    let db = pool.get().await.expect("db");
    let rows = db
        .simple_query(&format!("EXPLAIN {sql}"))
        .await
        .expect("explain");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that `sql` reaches its row through `index`, with every key
/// column an index condition (none left to a filter).
async fn assert_found_by(pool: &Pool, sql: &str, index: &str, key: &str) {
    let plan = plan(pool, sql).await;
    assert!(
        plan.contains(&format!("using {index} ")) && plan.contains(key),
        "{sql}\nexpected an index scan of {index} on {key}:\n{plan}"
    );
    assert!(!plan.contains("Filter: (object_key"), "{sql}\n{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_file_and_per_document_rows_are_found_by_their_key() {
    let (pool, _locks) = fresh_schema(&StackEnv::load()).await;
    // An upload's end: the current object at its key (finish_item, and
    // current_object for the conflict policies).
    for sql in [
        "SELECT version FROM objects WHERE bucket = 'docs' AND object_key = 'a.txt' AND current",
        "UPDATE objects SET current = false WHERE bucket = 'docs' AND object_key = 'a.txt' AND current",
    ] {
        assert_found_by(
            &pool,
            sql,
            "objects_one_current",
            "(object_key = 'a.txt'::text)",
        )
        .await;
    }
    // A document's end in its sync run (collections::finish_document).
    let sql = "UPDATE sync_run_documents SET state = 'indexed'
               WHERE run_id = 1 AND object_key = 'a.txt' AND state = 'pending'";
    let plan = plan(&pool, sql).await;
    assert!(
        plan.contains("Index Cond: ((run_id = 1) AND (object_key = 'a.txt'::text))"),
        "{sql}\n{plan}"
    );
}
