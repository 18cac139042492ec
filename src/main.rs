//! `fhirhaul`: one binary for every role. `src/` parses arguments and configuration,
//! starts tracing, calls into the crates and prints: the client core is `common/`, the
//! cluster's roles `coordinator/` and `worker/` (assembled in one process by `embedded/`),
//! and the simulated EHR `sim/`.

// The binary is not run by the simulation: it reads configs, writes summaries and
// measures wall time directly (clippy.toml lists what simulated code may not call).
#![allow(clippy::disallowed_methods)]

mod cluster;
mod commands;
mod config;
mod process;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fhirhaul", version, about = "FHIR Bulk Data export at population scale")]
struct Cli {
    /// Log filter (e.g. `info`, `fhirhaul_common=debug`); also RUST_LOG.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one export end to end in this process. With no --config it starts the built-in
    /// simulated EHR and exports from it.
    #[command(after_help = cluster::EXIT_STATUSES)]
    Run(commands::RunArgs),
    /// Run a coordinator (raft-replicated job state, leases, tokens) serving gRPC.
    Coordinator(cluster::CoordinatorArgs),
    /// Run a worker that leases and downloads files for a coordinator.
    Worker(cluster::WorkerArgs),
    /// Submit an export to a coordinator and follow it.
    #[command(after_help = cluster::EXIT_STATUSES)]
    Export(cluster::ExportArgs),
    /// Show jobs and workers, or one job file by file.
    Status(cluster::StatusArgs),
    /// Cancel an export.
    Cancel(cluster::CancelArgs),
    /// The coordinator group: status of each member, add or remove a coordinator.
    Cluster(cluster::ClusterArgs),
    /// Check a configuration file and show what it configures (no secrets).
    CheckConfig {
        #[arg(long, env = "FHIRHAUL_CONFIG")]
        config: PathBuf,
    },
    /// Serve the simulated EHR on 127.0.0.1 and print a ready client registration.
    SimEhr(commands::SimArgs),
    /// Key management for SMART Backend Services registration.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new private key and the JWK Set to register (or host) with the EHR.
    Generate {
        /// RS384 or ES384.
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// Directory for `<kid>.pem` and `jwks.json`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Key id; defaults to the RFC 7638 thumbprint.
        #[arg(long)]
        kid: Option<String>,
        /// Add the new key to this existing JWKS (rotation) instead of starting a new one.
        #[arg(long)]
        add_to: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => commands::run(args).await,
        Command::SimEhr(args) => commands::sim_ehr(args).await,
        Command::Coordinator(args) => cluster::coordinator(args).await,
        Command::Worker(args) => cluster::worker(args).await,
        Command::Export(args) => cluster::export(args).await,
        Command::Status(args) => cluster::status(args).await,
        Command::Cancel(args) => cluster::cancel(args).await,
        Command::Cluster(args) => cluster::cluster(args).await,
        Command::CheckConfig { config } => commands::check_config(&config),
        Command::Keys {
            command: KeysCommand::Generate { alg, out, kid, add_to },
        } => commands::keys_generate(&alg, &out, kid, add_to.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
