//! clusterctl: the command-line client of the job cluster.
//!
//! Owns the user's side: parsing commands, calling the scheduler's HTTPS API,
//! printing tables, JSON or YAML, and exit codes a pipeline can trust. It
//! speaks only the scheduler's HTTP API (never gRPC to workers), and its
//! `pki` commands only call the pki crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jobcluster_pki::Role;

#[derive(Debug, Parser)]
#[command(version, about = "Client of the job cluster", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and issue the cluster's certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create DIR with a new CA and the scheduler and client certificates.
    Init {
        dir: PathBuf,
        /// Extra host name or IP address for the certificates (repeatable).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
    /// Issue NAME.pem and NAME-key.pem in DIR, signed by DIR's CA.
    Issue {
        dir: PathBuf,
        /// scheduler, worker or client.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        name: String,
        /// Extra host name or IP address for the certificate (repeatable).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: jobcluster_pki::PkiError| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("clusterctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki(PkiCommand::Init { dir, sans }) => {
            for path in jobcluster_pki::init_dir(&dir, &sans)? {
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Pki(PkiCommand::Issue {
            dir,
            role,
            name,
            sans,
        }) => {
            for path in jobcluster_pki::issue_in_dir(&dir, role, &name, &sans)? {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
