//! The `workerd` binary: flags, and binding the worker's port. Logging,
//! signals, config checking and the exit code are `proto::daemon::main`;
//! everything else lives in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use jobcluster_proto::daemon;

/// Worker daemon of the job cluster: runs scripts through runner plugins and
/// serves the Worker gRPC API over mutual TLS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    flags: daemon::Flags,
    /// Write the manual pages to DIR and exit (scripts/man.sh).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    generate_man: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    // Matches first: --generate-man stands alone, without the --config
    // that `Args` itself cannot be built without.
    let matches = Args::command().get_matches();
    if let Some(dir) = matches.get_one::<std::path::PathBuf>("generate_man") {
        // Named as installed, not as the package (jobcluster-workerd).
        return jobcluster_proto::man::generate(Args::command().name("workerd"), "8", dir);
    }
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    daemon::main(
        "workerd",
        args.flags,
        jobcluster_workerd::Config::load,
        |config| {
            config
                .tls
                .is_none()
                .then_some("gRPC is plaintext and any caller may run jobs")
        },
        |config| config.runtime_threads,
        |config, shutdown| async move {
            let (listener, addr) = jobcluster_proto::transport::bind(&config.listen_addr)
                .await
                .with_context(|| format!("binding grpc_server.addr {}", config.listen_addr))?;
            tracing::info!(%addr, "grpc server listening");
            jobcluster_workerd::run(config, listener, shutdown).await?;
            Ok(())
        },
    )
}
