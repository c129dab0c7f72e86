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

mod connect;
mod dead_letters;
mod events;
mod tasks;
mod topology;

pub use connect::NatsSettings;
pub use events::wait_for_message;
pub use tasks::{Published, backoff_delay, decode_task};
pub use topology::{ProgressKind, TaskKind, Topology, subject_token};

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

    /// Waits until everything published on this connection reached the server.
    pub async fn flush(&self) -> Result<(), QueueError> {
        js!("flush", self.client.flush().await)
    }
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
