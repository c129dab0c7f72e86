//! Standard Kubernetes conditions (`type, status, reason, message,
//! observedGeneration, lastTransitionTime`) so that `kubectl wait
//! --for=condition=Complete` works, and the rule that a condition keeps its
//! transition time while its status does not change.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub last_transition_time: DateTime<Utc>,
}

impl Condition {
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Utc::now(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// Sets `generation` on every new condition and keeps the previous
/// `lastTransitionTime` of each whose status did not change.
pub fn carry_over(previous: &[Condition], new: &mut [Condition], generation: Option<i64>) {
    for c in new.iter_mut() {
        c.observed_generation = generation;
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time;
        }
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = DateTime::<Utc>::from_timestamp(1_000, 0).expect("valid");
        let mut old = Condition::new("Ready", true, "Running", "");
        old.last_transition_time = t0;
        let mut old_p = Condition::new("Progressing", true, "Uploading", "");
        old_p.last_transition_time = t0;
        let mut new = vec![
            Condition::new("Ready", true, "Running", "2 of 3 files"),
            Condition::new("Progressing", false, "Done", ""),
        ];
        carry_over(&[old, old_p], &mut new, Some(7));
        assert_eq!(new[0].last_transition_time, t0);
        assert_ne!(new[1].last_transition_time, t0);
        assert!(new.iter().all(|c| c.observed_generation == Some(7)));
    }
}
