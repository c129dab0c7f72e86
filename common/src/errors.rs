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

/// An error and its causes as one line, `outer: cause: root cause`, each
/// cause once: many errors repeat their source's text in their own, and
/// some (`tokio_postgres::Error` of a server error, say) say only "db error"
/// while the detail is in the source. Never a `Debug` dump.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if out == "db error" || out.is_empty() {
                out = text;
            } else {
                out.push_str(": ");
                out.push_str(&text);
            }
        }
        cause = c.source();
    }
    out
}

/// The text of a caught panic (what `panic!` was given).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct E {
        msg: &'static str,
        #[source]
        source: Option<Box<E>>,
    }

    fn e(msg: &'static str, source: Option<E>) -> E {
        E {
            msg,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn panics_become_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).expect_err("panics");
        assert_eq!(panic_message(p.as_ref()), "boom 7");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(5u8)).expect_err("panics");
        assert_eq!(panic_message(p.as_ref()), "a panic without a message");
    }

    #[test]
    fn chains_are_joined_once_each() {
        let root = e("connection refused (os error 111)", None);
        let mid = e("tcp connect error", Some(root));
        let top = e("dispatch failure", Some(mid));
        assert_eq!(
            chain(&top),
            "dispatch failure: tcp connect error: connection refused (os error 111)"
        );
        let repeats = e("reading: timed out", Some(e("timed out", None)));
        assert_eq!(chain(&repeats), "reading: timed out");
        let db = e(
            "db error",
            Some(e("ERROR: relation \"x\" does not exist", None)),
        );
        assert_eq!(chain(&db), "ERROR: relation \"x\" does not exist");
    }
}
