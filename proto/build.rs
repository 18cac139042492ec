//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no machine needs a
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/fhirhaul/v1/common.proto",
        "proto/fhirhaul/v1/worker.proto",
        "proto/fhirhaul/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
