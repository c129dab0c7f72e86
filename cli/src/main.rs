//! `stowctl`: see `stowctl --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stowctl::commands::Cli::parse().run().await
}
