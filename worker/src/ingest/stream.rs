//! A client's `data` messages as a transfer's source: exactly the bytes the
//! header announced (from its offset to its size), each message waited for
//! at most the idle timeout. How a stream ended early is kept aside
//! ([`Ended`]), so the call can answer with the status that fits it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use stowage_proto::v1::UploadRequest;
use stowage_proto::v1::upload_request::Message;

use crate::upload::UploadError;
use crate::upload::source::SourceBody;

/// Why a stream did not deliver the bytes it announced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    #[error("the stream ended after {received} of the {expected} bytes announced")]
    Short { received: u64, expected: u64 },
    #[error("the stream carries more than the {expected} bytes announced")]
    Long { expected: u64 },
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("a second header in the stream (one call uploads one object)")]
    SecondHeader,
    #[error("the stream failed: {0}")]
    Broken(String),
}

/// Where the stream's end is told.
#[derive(Clone, Default)]
pub struct EndSlot(Arc<Mutex<Option<Ended>>>);

impl EndSlot {
    pub fn get(&self) -> Option<Ended> {
        self.0.lock().ok().and_then(|e| e.clone())
    }

    fn set(&self, e: Ended) -> UploadError {
        let message = e.to_string();
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(e);
        }
        UploadError::SourceRead {
            source_ref: "ingest stream".into(),
            message,
        }
    }
}

/// The messages a call receives (tonic's `Streaming`, or any stream in tests).
pub type Messages = futures::stream::BoxStream<'static, Result<UploadRequest, tonic::Status>>;

struct Reading {
    messages: Messages,
    received: u64,
    expected: u64,
    idle: Duration,
    end: EndSlot,
    finished: bool,
}

/// `expected` bytes from `messages` (those after the header).
pub fn body(messages: Messages, expected: u64, idle: Duration, end: EndSlot) -> SourceBody {
    let reading = Reading {
        messages,
        received: 0,
        expected,
        idle,
        end,
        finished: false,
    };
    let stream = futures::stream::unfold(reading, |mut r| async move {
        if r.finished {
            return None;
        }
        loop {
            let next = match tokio::time::timeout(r.idle, r.messages.next()).await {
                Err(_) => Err(r.end.set(Ended::Idle(r.idle))),
                Ok(None) if r.received == r.expected => return None,
                Ok(None) => Err(r.end.set(Ended::Short {
                    received: r.received,
                    expected: r.expected,
                })),
                Ok(Some(Err(status))) => Err(r.end.set(Ended::Broken(status.message().into()))),
                Ok(Some(Ok(UploadRequest { message }))) => match message {
                    Some(Message::Data(data)) if data.is_empty() => continue,
                    Some(Message::Data(data)) => {
                        let len = data.len() as u64;
                        match r.received.checked_add(len).filter(|n| *n <= r.expected) {
                            Some(n) => {
                                r.received = n;
                                Ok(Bytes::from(data))
                            }
                            None => Err(r.end.set(Ended::Long {
                                expected: r.expected,
                            })),
                        }
                    }
                    Some(Message::Header(_)) => Err(r.end.set(Ended::SecondHeader)),
                    None => continue,
                },
            };
            if next.is_err() {
                r.finished = true;
            }
            return Some((next, r));
        }
    });
    SourceBody {
        size: Some(expected),
        validator: None,
        stream: stream.boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(bytes: &[u8]) -> Result<UploadRequest, tonic::Status> {
        Ok(UploadRequest {
            message: Some(Message::Data(bytes.to_vec())),
        })
    }

    async fn read(
        messages: Vec<Result<UploadRequest, tonic::Status>>,
        expected: u64,
    ) -> (Vec<u8>, Option<Ended>) {
        let end = EndSlot::default();
        let mut b = body(
            futures::stream::iter(messages).boxed(),
            expected,
            Duration::from_secs(5),
            end.clone(),
        );
        let mut out = Vec::new();
        while let Some(chunk) = b.stream.next().await {
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => break,
            }
        }
        (out, end.get())
    }

    #[tokio::test]
    async fn exactly_the_announced_bytes() {
        let (out, end) = read(vec![data(b"abc"), data(b""), data(b"de")], 5).await;
        assert_eq!(out, b"abcde");
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn short_long_and_second_header_are_told_apart() {
        let (_, end) = read(vec![data(b"abc")], 5).await;
        assert_eq!(
            end,
            Some(Ended::Short {
                received: 3,
                expected: 5
            })
        );
        let (out, end) = read(vec![data(b"abc"), data(b"def")], 5).await;
        assert_eq!(out, b"abc");
        assert_eq!(end, Some(Ended::Long { expected: 5 }));
        let header = Ok(UploadRequest {
            message: Some(Message::Header(Default::default())),
        });
        let (_, end) = read(vec![data(b"a"), header], 5).await;
        assert_eq!(end, Some(Ended::SecondHeader));
        let (_, end) = read(vec![Err(tonic::Status::cancelled("gone"))], 5).await;
        assert_eq!(end, Some(Ended::Broken("gone".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_times_out() {
        let end = EndSlot::default();
        let silent = futures::stream::pending().boxed();
        let mut b = body(silent, 5, Duration::from_secs(60), end.clone());
        assert!(b.stream.next().await.is_some_and(|r| r.is_err()));
        assert_eq!(end.get(), Some(Ended::Idle(Duration::from_secs(60))));
    }
}
