//! stowctl's commands, as a library so that the end-to-end suite can build
//! the same binary beside the operator's and the worker's (`e2e-stowctl`).

pub mod commands;
pub mod grpc;
pub mod ingest;
pub mod token;
