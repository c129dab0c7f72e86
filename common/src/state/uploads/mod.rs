//! Upload jobs and everything that hangs off them, one file per aggregate:
//! [`jobs`], their [`items`], [`multipart`] progress, and the [`objects`]
//! written. Every name is re-exported here: callers say `uploads::get_job`.
//!
//! Statements are prepared once per pooled connection and reused
//! (`prepare_cached`): a file costs a few statements, and parsing each one
//! every time was a large share of PostgreSQL's CPU in the small-file
//! benchmark.

mod items;
mod jobs;
mod multipart;
mod objects;

pub use items::*;
pub use jobs::*;
pub use multipart::*;
pub use objects::*;
