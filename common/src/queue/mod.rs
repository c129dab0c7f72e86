//! The task queue on NATS JetStream.
//!
//! - Stream `<P>_TASKS` (work-queue retention, file storage) on subjects
//!   `<p>.task.<kind>.<namespace>.<name>`; every message is a protobuf
//!   [`Task`] published with `Nats-Msg-Id` = its deterministic task id, so a
//!   re-publish within the duplicate window is dropped by the server.
//! - Durable pull consumer `workers`, explicit acks; the worker sends progress
//!   acks on long work and NAKs with [`backoff_delay`] on retryable errors.
//! - Stream `<P>_DEAD` (limits retention) on `<p>.dead.<kind>.<namespace>.<name>`
//!   keeps [`DeadLetter`]s until a person replays or discards them.
//! - Subjects `<p>.event.>` carry object-landed and progress events; the
//!   object-landed ones are also kept in stream `<P>_OBJECTS` (one day), read
//!   by the operator's durable consumer `indexer`, so that a restart or a
//!   leader change loses none of them.
//!
//! `<p>` is the configurable prefix (`stowage` by default), `<P>` its upper case.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message as _;
use rand::Rng;
use stowage_proto::v1::{DeadLetter, ObjectLanded, Task};
use tracing::info;

mod connect;

pub use connect::NatsSettings;

pub use async_nats::jetstream::AckKind;
pub use async_nats::jetstream::Message;

/// Name of the durable consumer every worker pulls from.
pub const WORKER_CONSUMER: &str = "workers";
/// Name of the durable consumer of object-landed events (the operator's).
pub const INDEXER_CONSUMER: &str = "indexer";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot connect to NATS at {}: {}",
        crate::redact::url(url),
        crate::redact::text(&crate::errors::chain(source))
    )]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot connect to NATS at {}: {message}", crate::redact::url(url))]
    Tls { url: String, message: String },
    #[error("NATS settings: {0}")]
    Settings(String),
    #[error("JetStream {what} failed: {message}")]
    JetStream { what: &'static str, message: String },
    #[error("message on {subject} is not a valid {kind}: {source}")]
    Decode {
        subject: String,
        kind: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("no dead letter with sequence {0}")]
    NoSuchDeadLetter(u64),
}

fn js_err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> QueueError {
    move |e| QueueError::JetStream {
        what,
        message: e.to_string(),
    }
}

macro_rules! js {
    ($what:literal, $e:expr) => {
        $e.map_err(|e| js_err($what)(&e))
    };
}

/// The kinds of task, as they appear in subjects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    UploadPlan,
    Upload,
    IndexSync,
    IndexDocument,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::UploadPlan => "upload-plan",
            TaskKind::Upload => "upload",
            TaskKind::IndexSync => "index-sync",
            TaskKind::IndexDocument => "index-doc",
        }
    }
}

/// Whose progress an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressKind {
    Upload,
    Index,
}

impl ProgressKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressKind::Upload => "upload",
            ProgressKind::Index => "index",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upload" => Some(ProgressKind::Upload),
            "index" => Some(ProgressKind::Index),
            _ => None,
        }
    }
}

/// Names of streams and subjects for one prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: subject_token(&prefix.into()),
        }
    }

    pub fn tasks_stream(&self) -> String {
        format!("{}_TASKS", self.prefix.to_uppercase().replace('-', "_"))
    }

    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.prefix.to_uppercase().replace('-', "_"))
    }

    pub fn objects_stream(&self) -> String {
        format!("{}_OBJECTS", self.prefix.to_uppercase().replace('-', "_"))
    }

    pub fn object_wildcard(&self) -> String {
        format!("{}.event.object.>", self.prefix)
    }

    pub fn task_subject(&self, kind: TaskKind, namespace: &str, name: &str) -> String {
        format!(
            "{}.task.{}.{}.{}",
            self.prefix,
            kind.as_str(),
            subject_token(namespace),
            subject_token(name)
        )
    }

    /// The dead-letter subject for a task subject: `.task.` becomes `.dead.`.
    pub fn dead_subject(&self, task_subject: &str) -> String {
        let rest = task_subject
            .strip_prefix(&format!("{}.task.", self.prefix))
            .unwrap_or(task_subject);
        format!("{}.dead.{rest}", self.prefix)
    }

    /// Progress of the resource `kind` (`upload` or `index`) `namespace/name`.
    pub fn progress_subject(&self, kind: ProgressKind, namespace: &str, name: &str) -> String {
        format!(
            "{}.event.progress.{}.{}.{}",
            self.prefix,
            kind.as_str(),
            subject_token(namespace),
            subject_token(name)
        )
    }

    pub fn object_subject(&self, bucket: &str) -> String {
        format!("{}.event.object.{}", self.prefix, subject_token(bucket))
    }

    pub fn progress_wildcard(&self) -> String {
        format!("{}.event.progress.>", self.prefix)
    }

    /// The kind token of a progress subject.
    pub fn progress_kind(&self, subject: &str) -> Option<ProgressKind> {
        let rest = subject.strip_prefix(&format!("{}.event.progress.", self.prefix))?;
        ProgressKind::parse(rest.split('.').next()?)
    }

    /// Where worker `id` says what it is doing ([`stowage_proto::v1::WorkerHeartbeat`]).
    pub fn worker_subject(&self, id: &str) -> String {
        format!("{}.event.worker.{}", self.prefix, subject_token(id))
    }

    pub fn worker_wildcard(&self) -> String {
        format!("{}.event.worker.>", self.prefix)
    }

    pub fn event_wildcard(&self) -> String {
        format!("{}.event.>", self.prefix)
    }
}

/// Makes `s` a single subject token: `.`, wildcards and whitespace become `_`.
pub fn subject_token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// Delay before retry `attempt` (1-based): a uniformly random time in
/// `[base/2, min(max, base·2^(attempt-1))]` — exponential with jitter, so a
/// burst of failures does not come back as a burst.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(max).max(base / 2);
    let floor = base / 2;
    let millis = rand::rng().random_range(floor.as_millis()..=ceiling.as_millis());
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// How the worker consumer behaves.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Redelivery after this long without an ack or progress ack.
    pub ack_wait: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            ack_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct Queue {
    client: async_nats::Client,
    js: jetstream::Context,
    topology: Topology,
}

/// What came back from publishing a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// The server had already seen this task id: nothing new was queued.
    pub duplicate: bool,
}

impl Queue {
    /// Connects as `settings` say (TLS, credentials); waits up to 10 s for
    /// a server that is still starting, not for one that refuses us.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, QueueError> {
        let client = connect::client(settings).await?;
        Ok(Queue {
            js: jetstream::new(client.clone()),
            client,
            topology: Topology::new(&settings.prefix),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates or updates the streams and the worker consumer. Safe to call
    /// from every process at start-up.
    pub async fn ensure(&self, settings: &ConsumerSettings) -> Result<(), QueueError> {
        self.ensure_streams().await?;
        let t = &self.topology;
        let stream = js!("get stream", self.js.get_stream(t.tasks_stream()).await)?;
        js!(
            "create consumer",
            stream
                .get_or_create_consumer(
                    WORKER_CONSUMER,
                    consumer::pull::Config {
                        durable_name: Some(WORKER_CONSUMER.into()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: settings.ack_wait,
                        filter_subject: format!("{}.task.>", t.prefix),
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                )
                .await
        )?;
        Ok(())
    }

    /// Creates or updates the task and dead-letter streams (what publishers
    /// such as the operator need).
    pub async fn ensure_streams(&self) -> Result<(), QueueError> {
        let t = &self.topology;
        let tasks = stream::Config {
            name: t.tasks_stream(),
            subjects: vec![format!("{}.task.>", t.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(300),
            ..Default::default()
        };
        let dead = stream::Config {
            name: t.dead_stream(),
            subjects: vec![format!("{}.dead.>", t.prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        };
        let objects = stream::Config {
            name: t.objects_stream(),
            subjects: vec![t.object_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(24 * 3600),
            ..Default::default()
        };
        for config in [tasks, dead, objects] {
            let name = config.name.clone();
            match self.js.get_stream(&name).await {
                Ok(_) => {
                    js!("update stream", self.js.update_stream(&config).await)?;
                }
                Err(_) => {
                    js!("create stream", self.js.create_stream(config).await)?;
                    info!(stream = name, "created JetStream stream");
                }
            }
        }
        Ok(())
    }

    /// The worker consumer (after [`Queue::ensure`]).
    pub async fn worker_consumer(&self) -> Result<consumer::PullConsumer, QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.tasks_stream()).await
        )?;
        js!("get consumer", stream.get_consumer(WORKER_CONSUMER).await)
    }

    /// Publishes `task` with `Nats-Msg-Id` = its task id.
    pub async fn publish_task(&self, subject: &str, task: &Task) -> Result<Published, QueueError> {
        let ack = self.send_task(subject, task).await?;
        let ack = js!("publish ack", ack.await)?;
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Sends `task` with `Nats-Msg-Id` = its task id; the returned future
    /// resolves to the server's ack.
    async fn send_task(
        &self,
        subject: &str,
        task: &Task,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, QueueError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", task.task_id.as_str());
        js!(
            "publish",
            self.js
                .publish_with_headers(
                    subject.to_string(),
                    headers,
                    Bytes::from(task.encode_to_vec())
                )
                .await
        )
    }

    /// Publishes many tasks on one subject, keeping up to 256 acks in
    /// flight instead of waiting for each (planning a job of 10,000 files).
    pub async fn publish_tasks(&self, subject: &str, tasks: &[Task]) -> Result<(), QueueError> {
        for window in tasks.chunks(256) {
            let mut acks = Vec::with_capacity(window.len());
            for task in window {
                acks.push(self.send_task(subject, task).await?);
            }
            for ack in acks {
                js!("publish ack", ack.await)?;
            }
        }
        Ok(())
    }

    /// Moves a failed task to the dead-letter stream.
    /// Its `Nats-Msg-Id` is `dead/<task id>`: dead-lettering the same task
    /// twice (a retried settle) stores one letter; a replay runs under a new
    /// task id, so its own failure gets its own letter.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<u64, QueueError> {
        let subject = self.topology.dead_subject(&letter.subject);
        let mut headers = HeaderMap::new();
        if let Some(task) = &letter.task {
            headers.insert("Nats-Msg-Id", format!("dead/{}", task.task_id).as_str());
        }
        let ack = js!(
            "publish dead letter",
            self.js
                .publish_with_headers(subject, headers, Bytes::from(letter.encode_to_vec()))
                .await
        )?;
        Ok(js!("dead letter ack", ack.await)?.sequence)
    }

    /// Every dead letter still stored, oldest first, with its sequence.
    pub async fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, QueueError> {
        let mut stream = js!(
            "get stream",
            self.js.get_stream(self.topology.dead_stream()).await
        )?;
        let info = js!("stream info", stream.info().await)?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        for seq in first..=last {
            let Ok(raw) = stream.get_raw_message(seq).await else {
                continue; // deleted (replayed or discarded)
            };
            let letter = decode_dead_letter(&raw)?;
            out.push((seq, letter));
        }
        Ok(out)
    }

    /// Re-publishes the task of dead letter `seq` under a fresh task id and
    /// removes the dead letter. Returns the re-published task.
    pub async fn replay_dead_letter(&self, seq: u64) -> Result<Task, QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.dead_stream()).await
        )?;
        let raw = stream
            .get_raw_message(seq)
            .await
            .map_err(|_| QueueError::NoSuchDeadLetter(seq))?;
        let letter = decode_dead_letter(&raw)?;
        let mut task = letter.task.unwrap_or_default();
        task.task_id = format!("{}/replay-{seq}", task.task_id);
        self.publish_task(&letter.subject, &task).await?;
        js!("delete dead letter", stream.delete_message(seq).await)?;
        Ok(task)
    }

    /// Drops every queued task whose subject matches `filter` (e.g. all tasks
    /// of one job when it is deleted). Returns how many were dropped.
    pub async fn purge_tasks(&self, filter: &str) -> Result<u64, QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.tasks_stream()).await
        )?;
        Ok(js!("purge", stream.purge().filter(filter).await)?.purged)
    }

    /// Fire-and-forget event on core NATS.
    pub async fn publish_event(&self, subject: String, payload: Vec<u8>) -> Result<(), QueueError> {
        js!(
            "publish event",
            self.client.publish(subject, payload.into()).await
        )
    }

    /// Publishes an object-landed event into the objects stream
    /// (`Nats-Msg-Id` = endpoint/bucket/key/version: a retried publish is
    /// dropped), waiting for the server's ack.
    pub async fn publish_object_landed(&self, event: &ObjectLanded) -> Result<(), QueueError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!(
                "{}/{}/{}/{}",
                event.endpoint, event.bucket, event.key, event.version
            )
            .as_str(),
        );
        let ack = js!(
            "publish object event",
            self.js
                .publish_with_headers(
                    self.topology.object_subject(&event.bucket),
                    headers,
                    Bytes::from(event.encode_to_vec()),
                )
                .await
        )?;
        js!("object event ack", ack.await)?;
        Ok(())
    }

    /// The durable consumer of object-landed events (created if missing).
    /// Messages stay un-acked while their key's debounce runs: `ack_wait`
    /// must be longer than the longest debounce.
    pub async fn object_consumer(
        &self,
        ack_wait: Duration,
    ) -> Result<consumer::PullConsumer, QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.objects_stream()).await
        )?;
        let config = consumer::pull::Config {
            durable_name: Some(INDEXER_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 10_000,
            ..Default::default()
        };
        js!(
            "create consumer",
            stream
                .get_or_create_consumer(INDEXER_CONSUMER, config)
                .await
        )
    }

    /// Deletes the worker consumer (tests of what happens when the backlog
    /// cannot be read; [`Queue::ensure`] creates it again).
    pub async fn delete_worker_consumer(&self) -> Result<(), QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.tasks_stream()).await
        )?;
        js!(
            "delete consumer",
            stream.delete_consumer(WORKER_CONSUMER).await
        )?;
        Ok(())
    }

    /// Pending + un-acked tasks, the backlog the fleet has to work off.
    pub async fn backlog(&self) -> Result<u64, QueueError> {
        let mut consumer = self.worker_consumer().await?;
        let info = js!("consumer info", consumer.info().await)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Subscribes to every event subject.
    pub async fn subscribe_events(&self) -> Result<async_nats::Subscriber, QueueError> {
        js!(
            "subscribe",
            self.client.subscribe(self.topology.event_wildcard()).await
        )
    }

    /// Waits until everything published on this connection reached the server.
    pub async fn flush(&self) -> Result<(), QueueError> {
        js!("flush", self.client.flush().await)
    }
}

fn decode_dead_letter(
    raw: &async_nats::jetstream::message::StreamMessage,
) -> Result<DeadLetter, QueueError> {
    DeadLetter::decode(raw.payload.as_ref()).map_err(|source| QueueError::Decode {
        subject: raw.subject.to_string(),
        kind: "DeadLetter",
        source,
    })
}

/// Now, as a protobuf timestamp (a dead letter's `failed_at`).
pub fn timestamp_now() -> stowage_proto::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    stowage_proto::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Decodes a task message.
pub fn decode_task(msg: &Message) -> Result<Task, QueueError> {
    Task::decode(msg.payload.as_ref()).map_err(|source| QueueError::Decode {
        subject: msg.subject.to_string(),
        kind: "Task",
        source,
    })
}

/// Drains a subscriber until `pred` matches or `timeout` passes (tests, CLI).
pub async fn wait_for_message(
    sub: &mut async_nats::Subscriber,
    timeout: Duration,
    mut pred: impl FnMut(&async_nats::Message) -> bool,
) -> Option<async_nats::Message> {
    tokio::time::timeout(timeout, async {
        while let Some(m) = sub.next().await {
            if pred(&m) {
                return Some(m);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_single_tokens() {
        let t = Topology::new("stowage");
        assert_eq!(t.tasks_stream(), "STOWAGE_TASKS");
        assert_eq!(
            t.task_subject(TaskKind::Upload, "team-a", "nightly.docs"),
            "stowage.task.upload.team-a.nightly_docs"
        );
        assert_eq!(
            t.dead_subject("stowage.task.upload.team-a.x"),
            "stowage.dead.upload.team-a.x"
        );
        assert_eq!(subject_token("a b>*"), "a_b__");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        for attempt in 1..30 {
            let d = backoff_delay(attempt, base, max);
            assert!(d >= base / 2 && d <= max, "attempt {attempt}: {d:?}");
        }
        // The ceiling of attempt 1 is the base itself.
        assert!((0..50).all(|_| backoff_delay(1, base, max) <= base));
        // Late attempts spread over the whole range up to the cap.
        let late: Vec<_> = (0..200).map(|_| backoff_delay(10, base, max)).collect();
        assert!(late.iter().any(|d| *d > Duration::from_millis(600)));
    }
}
