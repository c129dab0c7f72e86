//! Stowage's wire contracts: the protobuf task and event messages carried on
//! NATS JetStream and the worker's gRPC services, generated at build time from
//! `proto/stowage/v1/*.proto`.

/// Package `stowage.v1`.
pub mod v1 {
    tonic::include_proto!("stowage.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("stowage_descriptor");
}

pub use prost::Message;
pub use prost_types::Timestamp;
