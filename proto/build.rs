//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no machine needs a
//! system `protoc`.

// A build script, not simulated code: it writes the descriptor set directly.
#![allow(clippy::disallowed_methods)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/fhirhaul/v1/common.proto",
        "proto/fhirhaul/v1/worker.proto",
        "proto/fhirhaul/v1/admin.proto",
        "proto/fhirhaul/v1/raft.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // The encoded descriptors, for gRPC reflection (grpcurl works without .proto files).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fhirhaul_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // The access token must never reach a log through `{:?}`: its Debug is written by
    // hand, redacting it (`src/lib.rs`).
    tonic_prost_build::configure()
        .skip_debug(["fhirhaul.v1.GetTokenResponse"])
        .compile_fds(descriptors)?;
    Ok(())
}
