//! The `chatvault.v1` protobuf API: the canonical [`v1::ChatEvent`], the ingest and restore services.
//! Generated from `proto/chatvault/v1/*.proto` at build time; never edit generated code by hand.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chatvault.v1");

    /// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/chatvault_v1_descriptor.bin"));
}
