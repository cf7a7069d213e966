//! Build script: compiles `proto/openapiv2.proto` (the subset of gnostic's OpenAPI v2 document
//! kubectl decodes) with protox, pure Rust, and generates the prost messages.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/openapiv2.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(["openapiv2.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
