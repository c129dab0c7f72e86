//! Events: progress (core NATS, for prompt reconciles) and object-landed
//! (also kept in the objects stream, for the indexer's durable consumer).

use super::*;

impl Queue {
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

    /// Subscribes to every event subject.
    pub async fn subscribe_events(&self) -> Result<async_nats::Subscriber, QueueError> {
        js!(
            "subscribe",
            self.client.subscribe(self.topology.event_wildcard()).await
        )
    }
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
