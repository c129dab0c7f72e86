//! Status computation as pure functions: what the controllers read from
//! PostgreSQL goes in, the resource's `.status` (and the timing decisions
//! that follow from it) comes out. Tested on fixtures, no I/O.

pub mod index_collection;
pub mod upload_job;

/// Condition types.
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";

/// Reason of `Ready=False` for a spec the operator refuses.
pub const INVALID_SPEC: &str = "InvalidSpec";
