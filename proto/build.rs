//! Generates the Rust code for `stowage/v1/*.proto` at build time with the
//! `protoc` vendored by `protoc-bin-vendored`, so no system compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("stowage_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                std::path::PathBuf::from("stowage/v1/tasks.proto"),
                std::path::PathBuf::from("stowage/v1/worker.proto"),
                std::path::PathBuf::from("stowage/v1/ingest.proto"),
            ],
            &[std::path::PathBuf::from("."), well_known],
        )?;
    println!("cargo:rerun-if-changed=stowage");
    Ok(())
}
