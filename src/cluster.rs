//! The cluster subcommands: `coordinator`, `worker`, `export`, `status`, `cancel`,
//! `cluster` (membership). Every client command takes
//! the list of coordinators and talks to whichever leads.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_coordinator::node::CoordinatorSettings;
use fhirhaul_coordinator::raft_node::RaftSettings;
use fhirhaul_proto::connect::{Connector, Coordinators};
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::config::Config;
use crate::process::{cluster_token, parse_duration, shutdown_on_signal, transport};

/// Mutual TLS to a coordinator (all three, or none).
#[derive(clap::Args, Clone)]
pub struct ClientTls {
    /// CA certificate (PEM) the coordinator's certificate is signed by.
    #[arg(long, env = "FHIRHAUL_TLS_CA", requires_all = ["tls_cert", "tls_key"], global = true)]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, env = "FHIRHAUL_TLS_CERT", global = true)]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "FHIRHAUL_TLS_KEY", global = true)]
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
    /// Serve on a non-loopback address with neither mutual TLS nor a cluster token. Anyone
    /// who can reach the port can then take the EHR's access tokens: only for a network
    /// you trust entirely.
    #[arg(long)]
    insecure_no_auth_on_network: bool,
    /// Serve gRPC reflection on a non-loopback address too (it lists every API without
    /// authentication; on loopback it is always served).
    #[arg(long)]
    reflection: bool,
}

/// The coordinators to talk to (any of them; calls find the leader).
#[derive(clap::Args, Clone)]
pub struct CoordinatorList {
    /// Coordinator gRPC addresses, comma-separated or repeated.
    #[arg(
        long = "coordinator",
        env = "FHIRHAUL_COORDINATORS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    coordinators: Vec<String>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    coordinators: CoordinatorList,
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
    #[command(flatten)]
    coordinators: CoordinatorList,
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
    #[command(flatten)]
    coordinators: CoordinatorList,
    /// A job to show file by file (default: list jobs and workers).
    job: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    coordinators: CoordinatorList,
    job: String,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    coordinators: CoordinatorList,
    #[command(flatten)]
    tls: ClientTls,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Show every coordinator's view of the raft group.
    Status,
    /// Add a coordinator (started with `join = true`) to the group.
    Add {
        /// Its raft node id (unique, never reused).
        #[arg(long)]
        node_id: u64,
        /// Its gRPC address.
        #[arg(long)]
        address: String,
    },
    /// Remove a coordinator from the group.
    Remove {
        #[arg(long)]
        node_id: u64,
    },
    /// Hand leadership to another coordinator (to drain the current leader).
    Transfer {
        #[arg(long)]
        node_id: u64,
    },
}

/// The admin API of the cluster, reached through whichever coordinator leads.
pub struct Admin {
    coordinators: Coordinators,
}

impl Admin {
    pub fn new(addresses: &[String], tls: Option<tonic::transport::ClientTlsConfig>) -> anyhow::Result<Admin> {
        let connector = Connector {
            tls,
            ..Connector::default()
        };
        Ok(Admin {
            coordinators: Coordinators::new(addresses, connector, cluster_token())?,
        })
    }

    /// One admin call at the leader; a refusal reads as the coordinator's own words.
    async fn call<T, R, F, Fut>(&self, what: &str, message: T, call: F) -> anyhow::Result<R>
    where
        T: Clone,
        F: Fn(AdminServiceClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.coordinators
            .call(|channel| {
                call(
                    AdminServiceClient::new(channel),
                    self.coordinators.request(message.clone()),
                )
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                anyhow::anyhow!(
                    "{what}: {} (coordinator {})",
                    status.message(),
                    self.coordinators.current()
                )
            })
    }
}

async fn admin(list: &CoordinatorList, tls: &ClientTls) -> anyhow::Result<Admin> {
    Admin::new(&list.coordinators, tls.config()?)
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
        data_dir: args.data_dir.unwrap_or(cluster.data_dir.clone()),
        lease_duration: args.lease_duration.unwrap_or(cluster.lease_duration),
        max_file_attempts: cluster.max_file_attempts,
        archive_after: cluster.archive_after,
        raft: RaftSettings {
            node_id: cluster.node_id,
            snapshot_every: cluster.snapshot_every,
            election_tick: cluster.election_tick,
            peers: cluster.peers(),
            join: cluster.join,
            ..RaftSettings::default()
        },
        peer_connector: Connector {
            tls: cluster.tls.as_ref().map(crate::config::TlsFiles::client).transpose()?,
            ..Connector::default()
        },
        cluster_token: cluster_token(),
        reflection_beyond_loopback: args.reflection,
        ..CoordinatorSettings::default()
    };
    let tls = cluster.tls.as_ref().map(crate::config::TlsFiles::server).transpose()?;
    fhirhaul_coordinator::grpc::check_exposure(
        listen,
        tls.is_some(),
        settings.cluster_token.is_some(),
        args.insecure_no_auth_on_network,
    )?;
    if args.insecure_no_auth_on_network && !listen.ip().is_loopback() {
        tracing::warn!(%listen, "serving WITHOUT authentication on the network, as --insecure-no-auth-on-network asks");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let cancel = shutdown_on_signal();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    let node_id = settings.raft.node_id;
    let tracker = tokio_util::task::TaskTracker::new();
    let coordinator = fhirhaul_embedded::serve_coordinator(
        config.tenant,
        settings,
        listener,
        tls,
        transport()?,
        Arc::new(SystemClock),
        Entropy::from_os(),
        &tracker,
        cancel.clone(),
    )
    .await
    .context("starting the coordinator")?;
    println!("coordinator listening on {scheme}://{address} (raft node {node_id})");
    cancel.cancelled().await;
    tracker.close();
    tracker.wait().await;
    coordinator.drained().await;
    Ok(ExitCode::SUCCESS)
}

/// `fhirhaul worker`
pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let cancel = shutdown_on_signal();
    let mut settings = fhirhaul_embedded::worker_settings(
        args.coordinators.coordinators,
        args.name,
        args.concurrency,
        args.out,
        args.state_dir,
        cluster_token(),
    );
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
    let admin = admin(&args.coordinators, &args.tls).await?;
    let (request_json, own_since) = match &args.request {
        Some(text) => {
            let request = serde_json::from_str::<fhirhaul_common::kickoff::ExportRequest>(text)
                .context("--request is not an export request")?;
            (text.clone(), request.since.is_some())
        }
        None => (String::new(), false),
    };
    // One id for every attempt: a retry after a lost answer or a leader change can only
    // find the job the first attempt created, never make a second.
    let request = pb::SubmitExportRequest {
        tenant: args.tenant.clone(),
        request_json,
        incremental: args.incremental,
        request_id: Entropy::from_os().hex(16),
    };
    let mut uncertain_left = 5;
    let submitted = loop {
        let answer = admin
            .coordinators
            .call(|channel| {
                let request = admin.coordinators.request(request.clone());
                async move { AdminServiceClient::new(channel).submit_export(request).await }
            })
            .await;
        match answer {
            // A leader change left the proposal's fate unknown: ask again with the same id.
            Err(status) if status.code() == tonic::Code::Unknown && uncertain_left > 0 => {
                uncertain_left -= 1;
                tracing::info!(status = %status.message(), "submission outcome unknown; asking again with the same request id");
            }
            Err(status) => bail!(
                "submit refused: {} (coordinator {})",
                status.message(),
                admin.coordinators.current()
            ),
            Ok(response) => break response.into_inner(),
        }
    };
    let job_id = submitted.job_id;
    if submitted.created {
        println!("submitted {job_id}");
    } else {
        println!("submitted {job_id} (found by its request id after a retry)");
    }
    if args.incremental {
        match (&submitted.since, &submitted.since_from_job) {
            (Some(since), Some(from)) => println!(
                "incremental: _since={since}, the transactionTime of {from} (the last export of {} that downloaded every file)",
                args.tenant
            ),
            (Some(since), None) => println!("incremental: _since={since} (the tenant's cursor)"),
            (None, _) if own_since => println!("incremental: the request gives its own since"),
            (None, _) => println!(
                "incremental: {} has no completed export yet, so this one exports everything",
                args.tenant
            ),
        }
    }
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let job = follow(&admin, &job_id).await?;
    Ok(exit_for(&job))
}

/// The exit status for an ended job (see `EXIT_STATUSES`).
pub fn exit_for(job: &pb::GetJobResponse) -> ExitCode {
    let summary = job.summary.clone().unwrap_or_default();
    match pb::JobPhase::try_from(summary.phase) {
        Ok(pb::JobPhase::Completed) if summary.files_failed > 0 => ExitCode::from(2),
        Ok(pb::JobPhase::Completed) if summary.ehr_errors > 0 => ExitCode::from(3),
        Ok(pb::JobPhase::Completed) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// What `run` and `export` exit with; shown in `--help` and the README.
pub const EXIT_STATUSES: &str = "Exit status: 0 every file downloaded and verified; 1 the export failed (or was \
cancelled); 2 it completed but some files failed; 3 every file downloaded but the EHR's error \
files report errors (data it could not export); 130 interrupted (run again to resume).";

/// Follows a job until it ends, printing progress: files done/total, bytes, rate, ETA and
/// failures by category (one updating line on a terminal, plain lines otherwise). A watch
/// cut by a leader change is opened again at the new leader.
pub async fn follow(admin: &Admin, job_id: &str) -> anyhow::Result<pb::GetJobResponse> {
    let interactive = std::io::stdout().is_terminal();
    let mut last: Option<pb::GetJobResponse> = None;
    let mut last_line = String::new();
    let mut reopened = 0;
    loop {
        let request = pb::GetJobRequest {
            job_id: job_id.to_string(),
            ..Default::default()
        };
        let mut stream = admin
            .call(
                &format!("watching {job_id}"),
                request,
                |mut client, request| async move { client.watch_job(request).await },
            )
            .await?;
        let ended = loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    let line = progress_line(&update);
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
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        let finished = last.as_ref().and_then(|l| l.summary.as_ref()).is_some_and(|s| {
            matches!(
                pb::JobPhase::try_from(s.phase),
                Ok(pb::JobPhase::Completed | pb::JobPhase::Failed | pb::JobPhase::Cancelled)
            )
        });
        match ended {
            _ if finished => break,
            Some(status) if reopened < 20 => {
                reopened += 1;
                tracing::info!(%status, "the watch was cut (leader change?); watching again");
            }
            Some(status) => anyhow::bail!("watching {job_id}: {}", status.message()),
            None if reopened < 20 => reopened += 1,
            None => break,
        }
    }
    if interactive {
        println!();
    }
    last.context("the coordinator ended the watch without any state")
}

fn progress_line(job: &pb::GetJobResponse) -> String {
    let summary = job.summary.clone().unwrap_or_default();
    let phase = pb::JobPhase::try_from(summary.phase)
        .map(|p| p.as_str_name().trim_start_matches("JOB_PHASE_").to_lowercase())
        .unwrap_or_default();
    let megabytes = summary.bytes_done as f64 / 1e6;
    // Rates divide by the download phase as the coordinator measured it (first lease to
    // last file), never by time spent kicking off and polling.
    let downloading = Duration::from_millis(summary.download_ms).as_secs_f64();
    let rate = if downloading > 0.0 {
        format!(", {:.1} MB/s", megabytes / downloading)
    } else {
        String::new()
    };
    let settled = summary.files_done + summary.files_failed;
    let eta = if settled > 0 && settled < summary.files_total && downloading > 0.0 {
        let per_file = downloading / f64::from(settled);
        format!(", ETA {:.0}s", per_file * f64::from(summary.files_total - settled))
    } else {
        String::new()
    };
    let progress = match (&summary.progress, pb::JobPhase::try_from(summary.phase)) {
        (Some(progress), Ok(pb::JobPhase::Polling | pb::JobPhase::Submitted)) => format!(" (EHR: {progress})"),
        _ => String::new(),
    };
    let ehr_errors = if summary.ehr_errors > 0 {
        format!(", EHR reported {} error(s)", summary.ehr_errors)
    } else {
        String::new()
    };
    // By category, from the summary (a watch carries no files).
    let failures: std::collections::BTreeMap<&String, &u32> = summary.failures_by_category.iter().collect();
    let failures = if failures.is_empty() {
        String::new()
    } else {
        format!(", failed: {failures:?}")
    };
    let error = summary.error.clone().map(|e| format!(" — {e}")).unwrap_or_default();
    let cleanup = match pb::Cleanup::try_from(summary.cleanup) {
        Ok(pb::Cleanup::Pending) => ", DELETE at the EHR pending".to_string(),
        Ok(pb::Cleanup::Deleted) => ", DELETEd at the EHR".to_string(),
        Ok(pb::Cleanup::Failed) => format!(
            ", DELETE at the EHR failed: {}",
            summary.delete_error.as_deref().unwrap_or("no reason given")
        ),
        _ => String::new(),
    };
    format!(
        "{} {phase}{progress}: {}/{} files, {megabytes:.1} MB{rate}{eta}{failures}{ehr_errors}{error}{cleanup}",
        summary.job_id, summary.files_done, summary.files_total
    )
}

/// `fhirhaul status`
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let admin = admin(&args.coordinators, &args.tls).await?;
    match &args.job {
        Some(job_id) => {
            // A page of files at a time, so a job of any size fits the message limits.
            let mut offset = Some(0);
            while let Some(file_offset) = offset {
                let request = pb::GetJobRequest {
                    job_id: job_id.clone(),
                    file_offset,
                    file_limit: 5_000,
                };
                let job = admin
                    .call("status", request, |mut client, request| async move {
                        client.get_job(request).await
                    })
                    .await?;
                if file_offset == 0 {
                    println!("{}", progress_line(&job));
                }
                let total = job.summary.as_ref().map_or(0, |s| s.files_total);
                if job.files.is_empty() && file_offset < total {
                    // An archived job whose file list this coordinator does not hold.
                    anyhow::bail!(
                        "{job_id}: {file_offset} of {total} files listed; the coordinator returned no more \
                         (the job is archived and its file list is not on the leader; its summary above stands)"
                    );
                }
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
                offset = job.next_file_offset;
            }
        }
        None => {
            let jobs = admin
                .call(
                    "listing jobs",
                    pb::ListJobsRequest {},
                    |mut client, request| async move { client.list_jobs(request).await },
                )
                .await?;
            for job in &jobs.jobs {
                println!(
                    "{}",
                    progress_line(&pb::GetJobResponse {
                        summary: Some(job.clone()),
                        ..Default::default()
                    })
                );
            }
            let workers = admin
                .call(
                    "listing workers",
                    pb::ListWorkersRequest {},
                    |mut client, request| async move { client.list_workers(request).await },
                )
                .await?;
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
    let admin = admin(&args.coordinators, &args.tls).await?;
    let request = pb::CancelExportRequest {
        job_id: args.job.clone(),
    };
    admin
        .call("cancel refused", request, |mut client, request| async move {
            client.cancel_export(request).await
        })
        .await?;
    println!("cancelled {}", args.job);
    Ok(ExitCode::SUCCESS)
}

fn print_members(members: &[pb::CoordinatorInfo]) {
    for member in members {
        println!(
            "  coordinator {} at {}{}",
            member.node_id,
            if member.address.is_empty() {
                "(address unknown)"
            } else {
                &member.address
            },
            if member.voter { "" } else { " (not a voter)" }
        );
    }
}

/// `fhirhaul cluster …`
pub async fn cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let tls = args.tls.config()?;
    match args.command {
        ClusterCommand::Status => {
            // Each coordinator's own view, so a partitioned or lagging one shows as such.
            let mut reached = 0;
            for address in &args.coordinators.coordinators {
                let single = Admin::new(std::slice::from_ref(address), tls.clone())?;
                let mut client = AdminServiceClient::new(single.coordinators.channel_to_current());
                match client
                    .cluster_status(single.coordinators.request(pb::ClusterStatusRequest {}))
                    .await
                {
                    Ok(status) => {
                        reached += 1;
                        let status = status.into_inner();
                        println!(
                            "{address}: coordinator {} is {} in term {}, applied {}, snapshot at {}, leader {}",
                            status.node_id,
                            status.role,
                            status.term,
                            status.commit_index,
                            status.snapshot_index,
                            status.leader_id.as_deref().unwrap_or("unknown")
                        );
                        print_members(&status.coordinators);
                        let mut tenants: Vec<_> = status.tenant_concurrency.iter().collect();
                        tenants.sort();
                        for (tenant, files) in tenants {
                            println!("  tenant {tenant}: {files} file(s) at once");
                        }
                    }
                    Err(status) => println!("{address}: unreachable ({})", status.message()),
                }
            }
            Ok(if reached == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        ClusterCommand::Add { node_id, address } => {
            let admin = Admin::new(&args.coordinators.coordinators, tls)?;
            let request = pb::AddCoordinatorRequest { node_id, address };
            let members = admin
                .call("adding a coordinator", request, |mut client, request| async move {
                    client.add_coordinator(request).await
                })
                .await?;
            println!("coordinator {node_id} added; the group is now:");
            print_members(&members.coordinators);
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Remove { node_id } => {
            let admin = Admin::new(&args.coordinators.coordinators, tls)?;
            let request = pb::RemoveCoordinatorRequest { node_id };
            let members = admin
                .call("removing a coordinator", request, |mut client, request| async move {
                    client.remove_coordinator(request).await
                })
                .await?;
            println!("coordinator {node_id} removed; the group is now:");
            print_members(&members.coordinators);
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Transfer { node_id } => {
            let admin = Admin::new(&args.coordinators.coordinators, tls)?;
            let request = pb::TransferLeadershipRequest { node_id };
            admin
                .call("transferring leadership", request, |mut client, request| async move {
                    client.transfer_leadership(request).await
                })
                .await?;
            println!("leadership is moving to coordinator {node_id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
