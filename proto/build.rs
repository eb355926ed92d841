//! Compiles `jobscheduler.proto` with protox, so a build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=jobscheduler.proto");
    let fds = protox::compile(["jobscheduler.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("jobscheduler_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Output as `Bytes`: a receiver decodes a chunk as a slice of the
        // received buffer instead of copying it into a new `Vec`, and passes
        // it on (the scheduler to its HTTPS body) without another copy.
        .bytes(".jobscheduler.StreamJobResponse.output")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
