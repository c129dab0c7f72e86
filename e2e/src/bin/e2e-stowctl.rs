//! `stowctl`, built inside the e2e package so its tests can run it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stowctl::commands::Cli::parse().run().await
}
