//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so a
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ferry/agent/v1/agent.proto",
        "proto/ferry/controller/v1/raft.proto",
        "proto/ferry/controller/v1/controller.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
