//! The one question every failure answers: is it worth trying again?

/// How the task runner treats an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, 5xx, throttling, a busy lock: try again after a backoff.
    Retryable,
    /// 404 source, access denied, invalid input: retrying cannot help.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Implemented by every error that can end a task.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}
