//! `stowage-operator`, built inside the e2e package so its tests can run it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = stowage_operator::config::OperatorArgs::parse();
    stowage_common::telemetry::init_logging(&args.telemetry)?;
    stowage_operator::run(args, stowage_common::telemetry::shutdown_signal()).await
}
