//! `stowage-worker`: see `stowage-worker --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = stowage_worker::config::WorkerArgs::parse();
    stowage_common::telemetry::init_logging(&args.telemetry)?;
    stowage_worker::run(args, stowage_worker::shutdown_signal()).await
}
