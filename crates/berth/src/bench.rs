//! `berth bench`: latency of CSI calls through the real gRPC server, and the data path.
//! Prints figures; asserts nothing.

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
