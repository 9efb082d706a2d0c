//! The router <-> shard gRPC protocol (`generate.proto`), generated at build time.
pub mod v3 {
    tonic::include_proto!("generate.v3");
}
pub use v3::*;
