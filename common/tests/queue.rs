//! The JetStream topology against the stack's real NATS server.

use std::time::Duration;

use stowage_common::queue::{ConsumerSettings, NatsSettings, Queue, TaskKind};
use stowage_common::testing::{StackEnv, unique};
use stowage_proto::v1::{DeadLetter, PlanUpload, Task, task};

fn plan_task(id: &str) -> Task {
    Task {
        task_id: id.into(),
        kind: Some(task::Kind::PlanUpload(PlanUpload { job_id: "j".into() })),
    }
}

#[tokio::test]
async fn setup_is_idempotent_and_publishing_deduplicates() {
    let q = Queue::connect(&NatsSettings::new(StackEnv::load().nats_url(), unique("q")))
        .await
        .expect("connect");
    q.ensure(&ConsumerSettings::default())
        .await
        .expect("first setup");
    q.ensure(&ConsumerSettings::default())
        .await
        .expect("second setup changes nothing");
    let subject = q.topology().task_subject(TaskKind::UploadPlan, "ns", "job");
    let first = q
        .publish_task(&subject, &plan_task("upload-plan/1"))
        .await
        .expect("publish");
    let again = q
        .publish_task(&subject, &plan_task("upload-plan/1"))
        .await
        .expect("publish");
    assert!(!first.duplicate);
    assert!(again.duplicate, "same task id within the window is dropped");
    assert_eq!(q.backlog().await.expect("backlog"), 1);

    let consumer = q.worker_consumer().await.expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let msg = futures::StreamExt::next(&mut batch)
        .await
        .expect("one")
        .expect("ok");
    let task = stowage_common::queue::decode_task(&msg).expect("decode");
    assert_eq!(task.task_id, "upload-plan/1");
    msg.ack().await.expect("ack");
    assert!(
        futures::StreamExt::next(&mut batch).await.is_none(),
        "only one was queued"
    );
}

#[tokio::test]
async fn dead_letters_are_kept_and_replayed() {
    let q = Queue::connect(&NatsSettings::new(StackEnv::load().nats_url(), unique("q")))
        .await
        .expect("connect");
    q.ensure(&ConsumerSettings::default()).await.expect("setup");
    let subject = q.topology().task_subject(TaskKind::UploadPlan, "ns", "job");
    let seq = q
        .dead_letter(&DeadLetter {
            task: Some(plan_task("upload-plan/9")),
            subject: subject.clone(),
            error: "source answered HTTP 503".into(),
            error_class: "retryable".into(),
            attempts: 5,
            failed_at: None,
        })
        .await
        .expect("dead letter");
    let letters = q.dead_letters().await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, seq);
    assert_eq!(letters[0].1.error, "source answered HTTP 503");
    let replayed = q.replay_dead_letter(seq).await.expect("replay");
    assert_eq!(replayed.task_id, format!("upload-plan/9/replay-{seq}"));
    assert!(q.dead_letters().await.expect("list").is_empty());
    assert_eq!(
        q.backlog().await.expect("backlog"),
        1,
        "the task is queued again"
    );
}
