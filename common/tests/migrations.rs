//! Migrations on the stack's real PostgreSQL: a rolling deploy starts many
//! replicas at once, and the schema must be applied exactly once.

use std::time::Duration;

use stowage_common::db;
use stowage_common::locks::{LockManager, LockMetrics};
use stowage_common::testing::{StackEnv, fresh_database};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replicas_apply_the_schema_once() {
    let url = fresh_database(&StackEnv::load()).await;
    let pg = db::parse_url(&url).expect("url");
    let mut replicas = Vec::new();
    for _ in 0..6 {
        let pg = pg.clone();
        replicas.push(tokio::spawn(async move {
            let pool = db::pool(&pg, 2).expect("pool");
            let locks = LockManager::new(pg, LockMetrics::default(), Duration::from_secs(1));
            db::migrate(&pool, &locks).await
        }));
    }
    for r in replicas {
        r.await
            .expect("join")
            .expect("every replica starts cleanly");
    }
    let pool = db::pool(&pg, 1).expect("pool");
    let client = pool.get().await.expect("db");
    let applied: i64 = client
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .expect("history")
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations dir")
        .count() as i64;
    assert_eq!(applied, files, "each migration recorded once");
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN
             ('upload_jobs', 'upload_items', 'multipart_uploads', 'upload_parts', 'objects')",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 5);
}
