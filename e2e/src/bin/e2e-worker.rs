//! `stowage-worker`, built inside the e2e package so its tests can run it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = stowage_worker::config::WorkerArgs::parse();
    stowage_common::telemetry::init_logging(&args.telemetry)?;
    stowage_worker::run(args, stowage_common::telemetry::shutdown_signal()).await
}
