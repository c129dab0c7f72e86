//! The Stowage operator.
pub mod crd;
