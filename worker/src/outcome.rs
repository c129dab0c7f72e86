//! What becomes of a task after one run. Every task kind reports one of
//! these; the task loop ([`crate::tasks`]) alone turns it into an ack, a
//! delayed NAK or a dead letter, and bounds the attempts of every kind.

use std::fmt::Display;
use std::time::Duration;

use stowage_common::errors::{Classify, ErrorClass};
use stowage_proto::v1::{DeadLetter, Task};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Ack. `label` is the metrics outcome (`ok`, `skipped`, …).
    Done { label: &'static str },
    /// Not a failure: the task waits for something else — a key another
    /// worker is writing, a sync run still indexing, a worker draining.
    /// NAK, redelivered after `delay`; no attempt is spent.
    Wait { delay: Duration, reason: String },
    /// A failed attempt that another may fix. NAK, redelivered after
    /// `delay`; counts against the task kind's bound on attempts.
    Retry { delay: Duration, error: String },
    /// Dead-letter it and stop redelivery: a permanent failure, or out of
    /// attempts. The dead letter says why.
    Dead {
        error: String,
        class: ErrorClass,
        attempts: u32,
    },
}

impl Outcome {
    /// The outcome of error `e`: another try after `delay` when its class
    /// says one may help, else a dead letter at once.
    pub fn from_error<E: Display + Classify>(e: &E, delay: Duration) -> Outcome {
        match e.class() {
            ErrorClass::Retryable => Outcome::Retry {
                delay,
                error: e.to_string(),
            },
            ErrorClass::Permanent => Outcome::Dead {
                error: e.to_string(),
                class: ErrorClass::Permanent,
                attempts: 1,
            },
        }
    }

    /// A permanent failure with `error`.
    pub fn invalid(error: impl Into<String>) -> Outcome {
        Outcome::Dead {
            error: error.into(),
            class: ErrorClass::Permanent,
            attempts: 1,
        }
    }
}

/// The dead letter of `task` (which came on `subject`) for an
/// [`Outcome::Dead`].
pub fn dead_letter(
    task: &Task,
    subject: &str,
    error: &str,
    class: ErrorClass,
    attempts: u32,
) -> DeadLetter {
    DeadLetter {
        task: Some(task.clone()),
        subject: subject.to_string(),
        error: error.to_string(),
        error_class: class.as_str().into(),
        attempts,
        failed_at: Some(stowage_common::queue::timestamp_now()),
    }
}
