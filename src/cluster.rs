//! The cluster subcommands: `coordinator`, `worker`, `export`, `status`, `cancel`, and the
//! embedded cluster `run` uses.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::download::DownloadSettings;
use fhirhaul_common::secret::Secret;
use fhirhaul_coordinator::node::{Coordinator, CoordinatorSettings};
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_client::AdminServiceClient;
use fhirhaul_worker::WorkerSettings;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::commands::{parse_duration, transport};
use crate::config::Config;

fn cluster_token() -> Option<Secret> {
    std::env::var("FHIRHAUL_CLUSTER_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new)
}

/// Cancels on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopping: leases are given back, partial files keep their checkpoints");
        trigger.cancel();
    });
    cancel
}

/// Mutual TLS to a coordinator (all three, or none).
#[derive(clap::Args, Clone)]
pub struct ClientTls {
    /// CA certificate (PEM) the coordinator's certificate is signed by.
    #[arg(long, env = "FHIRHAUL_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, env = "FHIRHAUL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "FHIRHAUL_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl ClientTls {
    fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                let files = crate::config::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                };
                Ok(Some(files.client()?))
            }
            (None, None, None) => Ok(None),
            _ => bail!("--tls-ca, --tls-cert and --tls-key go together"),
        }
    }
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// fhirhaul.toml with the tenants and [cluster] settings.
    #[arg(long, env = "FHIRHAUL_CONFIG")]
    config: PathBuf,
    /// Address for the worker and admin gRPC APIs (overrides cluster.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Raft log and state (overrides cluster.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A lease not renewed for this long goes to another worker (overrides cluster.lease_duration).
    #[arg(long, value_parser = parse_duration)]
    lease_duration: Option<Duration>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Stable worker name (a restarted worker with the same name resumes its files).
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Where verified files are published.
    #[arg(long, default_value = "fhirhaul-out")]
    out: PathBuf,
    /// Staging and checkpoints.
    #[arg(long, default_value = "fhirhaul-data/worker")]
    state_dir: PathBuf,
    /// Record a resumable checkpoint every this many bytes of a file.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    checkpoint_every: u64,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    #[arg(long)]
    tenant: String,
    /// An export request as JSON (default: the tenant's configured request).
    #[arg(long)]
    request: Option<String>,
    /// Submit and return without following progress.
    #[arg(long)]
    no_wait: bool,
    /// Only what changed since this tenant's last export (its transactionTime as `_since`).
    #[arg(long)]
    incremental: bool,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// A job to show file by file (default: list jobs and workers).
    job: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(clap::Args)]
pub struct CancelArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    job: String,
    #[command(flatten)]
    tls: ClientTls,
}

fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = cluster_token()
        && let Ok(value) = format!("Bearer {}", token.expose()).parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn admin(address: &str, tls: &ClientTls) -> anyhow::Result<AdminServiceClient<Channel>> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
        .with_context(|| format!("`{address}` is not a coordinator address"))?;
    if let Some(tls) = tls.config()? {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {address}"))?;
    Ok(AdminServiceClient::new(channel))
}

/// Starts a coordinator and serves its APIs on `listener`.
pub async fn start_coordinator(
    tenants: Vec<TenantConfig>,
    settings: CoordinatorSettings,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    cancel: CancellationToken,
) -> anyhow::Result<Coordinator> {
    let coordinator = Coordinator::start(
        settings,
        tenants,
        transport()?,
        Arc::new(SystemClock),
        Entropy::from_os(),
        cancel.clone(),
    )
    .await
    .context("starting the coordinator")?;
    let serving = coordinator.clone();
    tokio::spawn(async move {
        if let Err(error) = fhirhaul_coordinator::grpc::serve(serving, listener, tls, cluster_token(), cancel).await {
            tracing::error!(%error, "gRPC server stopped");
        }
    });
    Ok(coordinator)
}

/// `fhirhaul coordinator`
pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    if config.tenant.is_empty() {
        bail!("{} has no [[tenant]]", args.config.display());
    }
    let cluster = config.cluster;
    let listen = match args.listen {
        Some(listen) => listen,
        None => cluster
            .listen
            .parse()
            .with_context(|| format!("cluster.listen `{}`", cluster.listen))?,
    };
    let settings = CoordinatorSettings {
        data_dir: args.data_dir.unwrap_or(cluster.data_dir),
        lease_duration: args.lease_duration.unwrap_or(cluster.lease_duration),
        max_file_attempts: cluster.max_file_attempts,
        ..CoordinatorSettings::default()
    };
    let tls = cluster.tls.as_ref().map(crate::config::TlsFiles::server).transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let cancel = shutdown_on_signal();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    start_coordinator(config.tenant, settings, listener, tls, cancel.clone()).await?;
    println!("coordinator listening on {scheme}://{address}");
    cancel.cancelled().await;
    Ok(ExitCode::SUCCESS)
}

pub fn worker_settings(
    coordinator: String,
    name: String,
    concurrency: u32,
    out: PathBuf,
    state_dir: PathBuf,
) -> WorkerSettings {
    WorkerSettings {
        tls: None,
        dialer: None,
        coordinator,
        name,
        concurrency,
        output_dir: out,
        state_dir,
        download: DownloadSettings::default(),
        cluster_token: cluster_token(),
        acquire_wait: Duration::from_secs(10),
    }
}

/// `fhirhaul worker`
pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let cancel = shutdown_on_signal();
    let mut settings = worker_settings(args.coordinator, args.name, args.concurrency, args.out, args.state_dir);
    settings.download.checkpoint_every_bytes = args.checkpoint_every.max(4096);
    settings.tls = args.tls.config()?;
    fhirhaul_worker::run(
        settings,
        transport()?,
        Arc::new(SystemClock),
        Entropy::from_os(),
        cancel,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `fhirhaul export`
pub async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut admin = admin(&args.coordinator, &args.tls).await?;
    let request_json = match &args.request {
        Some(text) => {
            serde_json::from_str::<fhirhaul_common::kickoff::ExportRequest>(text)
                .context("--request is not an export request")?;
            text.clone()
        }
        None => String::new(),
    };
    let job_id = admin
        .submit_export(with_token(pb::SubmitExportRequest {
            tenant: args.tenant.clone(),
            request_json,
            incremental: args.incremental,
        }))
        .await
        .map_err(|s| anyhow::anyhow!("submit refused: {}", s.message()))?
        .into_inner()
        .job_id;
    println!("submitted {job_id}");
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let job = follow(&mut admin, &job_id).await?;
    Ok(exit_for(&job))
}

pub fn exit_for(job: &pb::GetJobResponse) -> ExitCode {
    let summary = job.summary.clone().unwrap_or_default();
    match pb::JobPhase::try_from(summary.phase) {
        Ok(pb::JobPhase::Completed) if summary.files_failed == 0 => ExitCode::SUCCESS,
        Ok(pb::JobPhase::Completed) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Follows a job until it ends, printing progress: files done/total, bytes, rate, ETA and
/// failures by category (one updating line on a terminal, plain lines otherwise).
pub async fn follow(admin: &mut AdminServiceClient<Channel>, job_id: &str) -> anyhow::Result<pb::GetJobResponse> {
    let mut stream = admin
        .watch_job(with_token(pb::GetJobRequest {
            job_id: job_id.to_string(),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("watching {job_id}: {}", s.message()))?
        .into_inner();
    let interactive = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last = None;
    let mut last_line = String::new();
    while let Some(update) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("watching {job_id}: {}", s.message()))?
    {
        let line = progress_line(&update, started.elapsed());
        if line != last_line {
            if interactive {
                print!("\r\x1b[2K{line}");
                let _ = std::io::stdout().flush();
            } else {
                println!("{line}");
            }
            last_line = line;
        }
        last = Some(update);
    }
    if interactive {
        println!();
    }
    last.context("the coordinator ended the watch without any state")
}

fn progress_line(job: &pb::GetJobResponse, elapsed: Duration) -> String {
    let summary = job.summary.clone().unwrap_or_default();
    let phase = pb::JobPhase::try_from(summary.phase)
        .map(|p| p.as_str_name().trim_start_matches("JOB_PHASE_").to_lowercase())
        .unwrap_or_default();
    let megabytes = summary.bytes_done as f64 / 1e6;
    let rate = megabytes / elapsed.as_secs_f64().max(0.001);
    let settled = summary.files_done + summary.files_failed;
    let eta = if settled > 0 && settled < summary.files_total {
        let per_file = elapsed.as_secs_f64() / f64::from(settled);
        format!(", ETA {:.0}s", per_file * f64::from(summary.files_total - settled))
    } else {
        String::new()
    };
    let mut failures: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for file in &job.files {
        if let Some(category) = file
            .failure_category
            .filter(|_| file.phase == pb::FilePhase::Failed as i32)
        {
            *failures
                .entry(
                    pb::FailureCategory::try_from(category)
                        .map(|c| c.as_str_name())
                        .unwrap_or("UNKNOWN"),
                )
                .or_default() += 1;
        }
    }
    let failures = if failures.is_empty() {
        String::new()
    } else {
        format!(", failed: {failures:?}")
    };
    let error = summary.error.map(|e| format!(" — {e}")).unwrap_or_default();
    format!(
        "{} {phase}: {}/{} files, {megabytes:.1} MB, {rate:.1} MB/s{eta}{failures}{error}",
        summary.job_id, summary.files_done, summary.files_total
    )
}

/// `fhirhaul status`
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut admin = admin(&args.coordinator, &args.tls).await?;
    match &args.job {
        Some(job_id) => {
            let job = admin
                .get_job(with_token(pb::GetJobRequest { job_id: job_id.clone() }))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("{}", progress_line(&job, Duration::from_secs(1)));
            for file in &job.files {
                let phase = pb::FilePhase::try_from(file.phase)
                    .map(|p| p.as_str_name().trim_start_matches("FILE_PHASE_").to_lowercase())
                    .unwrap_or_default();
                println!(
                    "  {:<8} {:>12} B  {}{}",
                    phase,
                    file.bytes,
                    file.location.clone().unwrap_or_else(|| file.url.clone()),
                    file.failure.as_ref().map(|f| format!("  ({f})")).unwrap_or_default()
                );
            }
        }
        None => {
            let jobs = admin
                .list_jobs(with_token(pb::ListJobsRequest {}))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            for job in &jobs.jobs {
                println!(
                    "{}",
                    progress_line(
                        &pb::GetJobResponse {
                            summary: Some(job.clone()),
                            files: vec![]
                        },
                        Duration::from_secs(1)
                    )
                );
            }
            let workers = admin
                .list_workers(with_token(pb::ListWorkersRequest {}))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            for worker in &workers.workers {
                println!(
                    "worker {}: {} lease(s), concurrency {}",
                    worker.worker_id, worker.leases, worker.concurrency
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `fhirhaul cancel`
pub async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let mut admin = admin(&args.coordinator, &args.tls).await?;
    admin
        .cancel_export(with_token(pb::CancelExportRequest {
            job_id: args.job.clone(),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("cancelled {}", args.job);
    Ok(ExitCode::SUCCESS)
}
