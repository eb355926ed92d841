//! The `workerd` binary: flags, config, logging, binding, signals, exit code.
//! Everything else lives in the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Worker daemon of the job cluster: runs scripts through runner plugins and
/// serves the Worker gRPC API over mutual TLS.
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
            eprintln!("workerd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = jobcluster_workerd::Config::load(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    if config.tls.is_none() {
        tracing::warn!(
            "INSECURE MODE (grpc_server.use_tls = false): gRPC is plaintext and any caller may run jobs; never use this outside a development machine"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = jobcluster_proto::daemon::shutdown_signal()
            .context("listening for SIGTERM and SIGINT")?;
        let (listener, addr) = jobcluster_proto::transport::bind(&config.listen_addr)
            .await
            .with_context(|| format!("binding grpc_server.addr {}", config.listen_addr))?;
        tracing::info!(%addr, "grpc server listening");
        jobcluster_workerd::run(config, listener, shutdown).await?;
        Ok(())
    })
}
