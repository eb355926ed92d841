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
    jobcluster_proto::daemon::init_logging();
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
        let shutdown = jobcluster_proto::daemon::shutdown_signal()
            .context("listening for SIGTERM and SIGINT")?;
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
