//! Generated protobuf and gRPC code for Stratus.
//!
//! `pdisk::v1` is the persistent-disk service, `agent::v1` the host agent; the file descriptor set is
//! served by the daemons' reflection service so `grpcurl` needs no .proto.

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("agent.v1");
    }
}

pub mod pdisk {
    pub mod v1 {
        tonic::include_proto!("pdisk.v1");
    }
}

/// Encoded `FileDescriptorSet` of every .proto in this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
