//! Tasks: published with their deterministic id (a re-publish is dropped
//! by the server), pulled by the workers' durable consumer, redelivered
//! after [`backoff_delay`]; the backlog the autoscaler reads.

use super::*;

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

/// What came back from publishing a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// The server had already seen this task id: nothing new was queued.
    pub duplicate: bool,
}

/// Decodes a task message.
pub fn decode_task(msg: &Message) -> Result<Task, QueueError> {
    Task::decode(msg.payload.as_ref()).map_err(|source| QueueError::Decode {
        subject: msg.subject.to_string(),
        kind: "Task",
        source,
    })
}

impl Queue {
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

    /// Drops every queued task whose subject matches `filter` (e.g. all tasks
    /// of one job when it is deleted). Returns how many were dropped.
    pub async fn purge_tasks(&self, filter: &str) -> Result<u64, QueueError> {
        let stream = js!(
            "get stream",
            self.js.get_stream(self.topology.tasks_stream()).await
        )?;
        Ok(js!("purge", stream.purge().filter(filter).await)?.purged)
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
}
