//! Generates Rust types for CRIU's image messages from the `images/*.proto` of the CRIU
//! source that `make setup` built (kept in its cache), so the image code always matches the
//! CRIU it runs with. CRIU's files are not part of this repository.

use std::path::PathBuf;

const DEFAULT_CACHE: &str = "/var/cache/trenv";
const DEFAULT_CRIU_VERSION: &str = "4.2.1";

fn main() {
    println!("cargo:rerun-if-env-changed=TRENV_CRIU_PROTO_DIR");
    println!("cargo:rerun-if-env-changed=TRENV_CACHE");
    println!("cargo:rerun-if-env-changed=CRIU_VERSION");
    let dir = std::env::var_os("TRENV_CRIU_PROTO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var("TRENV_CACHE").unwrap_or_else(|_| DEFAULT_CACHE.into());
            let version =
                std::env::var("CRIU_VERSION").unwrap_or_else(|_| DEFAULT_CRIU_VERSION.into());
            PathBuf::from(cache).join(format!("criu-{version}/images"))
        });
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut inputs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "proto"))
            .collect(),
        Err(e) => panic!(
            "CRIU image definitions not found in {} ({e}): run `make setup` (it builds CRIU \
             and keeps its images/*.proto there) or set TRENV_CRIU_PROTO_DIR",
            dir.display()
        ),
    };
    inputs.sort();
    if inputs.is_empty() {
        panic!("no .proto files in {}: run `make setup`", dir.display());
    }
    protobuf_codegen::Codegen::new()
        .pure()
        .include(&dir)
        .inputs(&inputs)
        .cargo_out_dir("criu_images")
        .run_from_script();
}
