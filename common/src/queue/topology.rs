//! Names: the streams, the subjects of tasks, dead letters and events
//! (`<p>.<family>.<kind>.<namespace>.<name>`, each part one token).

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
    pub(super) prefix: String,
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
