//! What the index benchmarks share: one sync run of an in-process worker,
//! timed from the task's publication to the run's end, and the process's
//! peak resident set.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser as _;
use futures::StreamExt;
use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::IndexSpec;
use stowage_common::state::collections::{self, NewCollection, SyncRun};
use stowage_common::testing::{StackEnv, unique};
use stowage_proto::v1::{CollectionProgress, SyncCollection, Task, task};
use stowage_worker::Worker;

/// An in-process worker on the local stack for one benchmark: loopback
/// servers allowed, no gRPC auth, `capacity` documents at once, and `extra`
/// flags (the model's).
pub async fn start_worker(
    env: &StackEnv,
    database_url: &str,
    prefix: &str,
    credentials_dir: &Path,
    capacity: usize,
    extra: &[String],
) -> anyhow::Result<Worker> {
    let args = [
        "stowage-worker".to_string(),
        format!("--database-url={database_url}"),
        format!("--nats-url={}", env.nats_url()),
        format!("--queue-prefix={prefix}"),
        format!("--credentials-dir={}", credentials_dir.display()),
        "--grpc-addr=127.0.0.1:0".into(),
        "--auth-mode=none".into(),
        "--allow-private-networks=true".into(),
        "--metrics-addr=127.0.0.1:0".into(),
        format!("--capacity={capacity}"),
    ]
    .into_iter()
    .chain(extra.iter().cloned());
    stowage_worker::start(stowage_worker::config::WorkerArgs::parse_from(args), None).await
}

/// Registers collection `namespace/name` with `spec`, resets the peak RSS,
/// runs one sync (the worker's own task) and waits for its end. Returns the
/// run as recorded (with the collection's id) and its wall seconds.
pub async fn sync_once(
    worker: &Worker,
    namespace: &str,
    name: &str,
    spec: IndexSpec,
) -> anyhow::Result<(SyncRun, f64)> {
    let id = {
        let db = worker.context.db.get().await?;
        collections::register(
            &db,
            &NewCollection {
                namespace: namespace.into(),
                name: name.into(),
                source_uid: unique("uid"),
                generation: 1,
                spec,
            },
        )
        .await?
    };
    let queue = &worker.context.queue;
    let mut events = queue
        .client()
        .subscribe(queue.topology().progress_wildcard())
        .await?;
    reset_peak_rss();
    let t0 = Instant::now();
    queue
        .publish_task(
            &queue
                .topology()
                .task_subject(TaskKind::IndexSync, namespace, name),
            &Task {
                task_id: format!("index-sync/{id}/bench"),
                kind: Some(task::Kind::SyncCollection(SyncCollection {
                    collection_id: id.to_string(),
                    trigger: "manual".into(),
                })),
            },
        )
        .await?;
    while let Some(msg) = events.next().await {
        if let Ok(p) = CollectionProgress::decode(msg.payload.as_ref())
            && p.run_state != "in_progress"
        {
            break;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let db = worker.context.db.get().await?;
    let run = collections::latest_run(&db, id).await?.context("a run")?;
    Ok((run, seconds))
}

/// The process's peak resident set (VmHWM) in MiB, since the last
/// [`reset_peak_rss`].
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Starts counting the peak resident set afresh (Linux: clear_refs 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
