//! The `schedulerd` binary: flags, and binding the scheduler's ports.
//! Logging, signals, config checking and the exit code are
//! `proto::daemon::main`; everything else lives in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use jobcluster_proto::daemon;

/// Scheduler daemon of the job cluster: knows every worker and job and
/// serves the HTTPS API.
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
        // Named as installed, not as the package (jobcluster-schedulerd).
        return jobcluster_proto::man::generate(Args::command().name("schedulerd"), "8", dir);
    }
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    daemon::main(
        "schedulerd",
        args.flags,
        jobcluster_schedulerd::Config::load,
        |config| {
            config
                .grpc_tls
                .is_none()
                .then_some("gRPC and the HTTP API are plaintext and nothing is authenticated")
        },
        // One thread per CPU: the scheduler serves every client and worker.
        |_| None,
        |config, shutdown| async move {
            let open_files = daemon::raise_open_files_limit();
            tracing::debug!(open_files, "open files limit");
            let bind = |addr: String, key: &'static str| async move {
                jobcluster_proto::transport::bind(&addr)
                    .await
                    .with_context(|| format!("binding {key} {addr}"))
            };
            let (grpc, grpc_addr) = bind(config.grpc_addr.clone(), "grpc_server.addr").await?;
            let (http, http_addr) = bind(config.http_addr.clone(), "http_server.addr").await?;
            tracing::info!(addr = %grpc_addr, "grpc server listening");
            tracing::info!(addr = %http_addr, "http server listening");
            let listeners = jobcluster_schedulerd::Listeners { grpc, http };
            jobcluster_schedulerd::run(config, listeners, shutdown).await?;
            Ok(())
        },
    )
}
