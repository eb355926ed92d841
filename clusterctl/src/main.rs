//! clusterctl: the command-line client of the job cluster.
//!
//! Owns the user's side: parsing commands, calling the scheduler's HTTPS API,
//! printing tables, JSON or YAML, and exit codes a pipeline can trust. It
//! speaks only the scheduler's HTTP API (never gRPC to workers), and its
//! `pki` commands only call the pki crate.
//!
//! It must not build rustls configs itself (pki does), redefine the API's
//! JSON types (proto's `http` module has them), or write anything but job
//! output to stdout in `run` and `logs`. `main` only parses and reports.
//!
//! # Layout
//!
//! - `cli`: the clap types of SPEC §8.
//! - `bench`: `clusterctl bench`, a load tool (job starts, output streaming,
//!   status reads, simulated workers).
//! - `commands`: one function per subcommand.
//! - `api`: the typed HTTPS client and its errors.
//! - `explain`: transport errors turned into one line that says what to do.
//! - `follow`: the resumable output reader shared by `run` and `logs`, and
//!   the job-to-exit-code mapping.
//! - `interrupt`: Ctrl-C in `run` (stop the job, wait for its end) and
//!   `logs -f` (stop following).
//! - `output`: JSON/YAML, tables, key: value blocks, relative times.
//! - `progress`: the terminal-only spinner.

#![forbid(unsafe_code)]

mod api;
mod bench;
mod cli;
mod commands;
mod explain;
mod follow;
mod interrupt;
mod output;
mod progress;
#[cfg(test)]
mod tests;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    jobcluster_proto::alloc::keep_stream_buffers();
    // `clusterctl generate-man DIR` (scripts/man.sh) writes the manual
    // pages. It is no command of the CLI: answered before clap parses, so
    // no help, page or completion script offers it (clap_complete lists
    // even hidden subcommands).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == "generate-man") {
        return match (args.next(), args.next()) {
            (Some(dir), None) => {
                jobcluster_proto::man::generate(cli::Cli::command(), "1", dir.as_ref())
            }
            _ => {
                eprintln!("usage: clusterctl generate-man DIR");
                ExitCode::from(2)
            }
        };
    }
    let cli = cli::Cli::parse();
    jobcluster_pki::install_crypto_provider();
    match commands::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // A closed stdout (`clusterctl logs -f JOB | head`) is the
            // reader's choice, not something to complain about.
            if !is_broken_pipe(&error) {
                eprintln!("clusterctl: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
