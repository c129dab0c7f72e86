//! Dead letters: what failed for good, kept until a person replays it.

use super::*;

fn decode_dead_letter(
    raw: &async_nats::jetstream::message::StreamMessage,
) -> Result<DeadLetter, QueueError> {
    DeadLetter::decode(raw.payload.as_ref()).map_err(|source| QueueError::Decode {
        subject: raw.subject.to_string(),
        kind: "DeadLetter",
        source,
    })
}

impl Queue {
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
}
