//! The `schedulerd` binary: flags, config, logging, binding, signals, exit
//! code. Everything else lives in the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Scheduler daemon of the job cluster: knows every worker and job and
/// serves the HTTPS API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the config (and the certificates it names) and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    jobcluster_pki::install_crypto_provider();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("schedulerd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = jobcluster_schedulerd::Config::load(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    if config.grpc_tls.is_none() {
        tracing::warn!(
            "INSECURE MODE (grpc_server.use_tls = false): gRPC and the HTTP API are plaintext and nothing is authenticated; never use this outside a development machine"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let (grpc, grpc_addr) = jobcluster_proto::transport::bind(&config.grpc_addr)
            .await
            .with_context(|| format!("binding grpc_server.addr {}", config.grpc_addr))?;
        let (http, http_addr) = jobcluster_proto::transport::bind(&config.http_addr)
            .await
            .with_context(|| format!("binding http_server.addr {}", config.http_addr))?;
        tracing::info!(addr = %grpc_addr, "grpc server listening");
        tracing::info!(addr = %http_addr, "http server listening");
        let listeners = jobcluster_schedulerd::Listeners { grpc, http };
        jobcluster_schedulerd::run(config, listeners, shutdown).await?;
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed
/// when this is called, not when the future is first polled, so a signal
/// that arrives while the daemon starts is not lost (nor fatal).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
