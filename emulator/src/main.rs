//! `pgpushd-emulator`: the APNs (or FCM, or Web Push) emulator on its own, the same
//! command as `pgpushd emulator`. Logs to standard error (`RUST_LOG` filters, default
//! `info`); stops on SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use pgpushd_emulator::cli::{self, EmulatorArgs};

#[derive(Parser)]
#[command(
    name = "pgpushd-emulator",
    version,
    about = "Runs a local APNs emulator (HTTP/2, or the retired binary protocol), FCM emulator (HTTP v1) or Web Push service (RFC 8030, 8291, 8292)"
)]
struct Cli {
    #[command(flatten)]
    args: EmulatorArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli.args, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgpushd-emulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
