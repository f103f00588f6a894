//! Compiles `chatvault/v1/*.proto` without a `protoc` binary: `protox` parses the files in pure Rust into a
//! `FileDescriptorSet`, which feeds both the code generator and gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO_FILES: &[&str] = &[
    "chatvault/v1/event.proto",
    "chatvault/v1/ingest.proto",
    "chatvault/v1/restore.proto",
    "chatvault/v1/audit.proto",
    "chatvault/v1/keys.proto",
    "chatvault/v1/governance.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptor_set = protox::compile(PROTO_FILES, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("chatvault_v1_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptor_set)?;
    Ok(())
}
