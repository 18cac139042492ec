//! The gRPC services: thin adapters that check the caller, convert, call the
//! [`Coordinator`], and convert back. [`status_from`] is the one place errors become
//! `tonic::Status`. `RaftService` hands peers' raft messages to the raft node.

use std::pin::Pin;
use std::time::Duration;

use fhirhaul_common::download::Checkpoint;
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_common::manifest::FileKind as CoreFileKind;
use fhirhaul_common::secret::Secret;
use fhirhaul_proto::connect::LEADER_METADATA;
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use fhirhaul_proto::v1::raft_service_server::{RaftService, RaftServiceServer};
use fhirhaul_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::node::{Coordinator, CoordinatorError, KickoffOutcome, LeasedFile};
use crate::peers::MAX_RAFT_MESSAGE_BYTES;
use crate::raft_node::RaftError;
use crate::state::{Command, FilePhase, Job, JobPhase};

/// Maps every coordinator error to a gRPC status. A follower's refusal is `Unavailable`
/// with the leader's address in the `fhirhaul-leader` metadata (clients follow it).
pub fn status_from(error: CoordinatorError) -> Status {
    match error {
        CoordinatorError::UnknownTenant(_) | CoordinatorError::UnknownJob(_) => Status::not_found(error.to_string()),
        CoordinatorError::UnknownWorker(_) => Status::failed_precondition(error.to_string()),
        CoordinatorError::Refused(_) => Status::aborted(error.to_string()),
        CoordinatorError::Raft(RaftError::NotLeader { leader, address }) => {
            let mut status = Status::unavailable(match leader {
                Some(id) => format!("this coordinator is not the leader; coordinator {id} is"),
                None => "this coordinator is not the leader, and no leader is known yet".to_string(),
            });
            if let Some(address) = address
                && let Ok(value) = address.parse()
            {
                status.metadata_mut().insert(LEADER_METADATA, value);
            }
            status
        }
        // The change may have been applied: retrying blindly could do it twice.
        CoordinatorError::Raft(RaftError::Uncertain) => Status::unknown(error.to_string()),
        CoordinatorError::Raft(RaftError::Membership(_)) => Status::failed_precondition(error.to_string()),
        CoordinatorError::Raft(_) => Status::unavailable(error.to_string()),
        CoordinatorError::Client(client) => match client {
            fhirhaul_common::Error::InvalidRequest { .. } | fhirhaul_common::Error::Config { .. } => {
                Status::invalid_argument(client.to_string())
            }
            other if other.is_retryable() => Status::unavailable(other.to_string()),
            other => Status::failed_precondition(other.to_string()),
        },
    }
}

fn kind_to_pb(kind: CoreFileKind) -> i32 {
    (match kind {
        CoreFileKind::Output => pb::FileKind::Output,
        CoreFileKind::Deleted => pb::FileKind::Deleted,
        CoreFileKind::Error => pb::FileKind::Error,
    }) as i32
}

fn category_to_pb(category: &str) -> i32 {
    (match category {
        "network" => pb::FailureCategory::Network,
        "throttled" => pb::FailureCategory::Throttled,
        "server" => pb::FailureCategory::Server,
        "rejected" => pb::FailureCategory::Rejected,
        "auth" => pb::FailureCategory::Auth,
        "protocol" => pb::FailureCategory::Protocol,
        "content" => pb::FailureCategory::Content,
        "timeout" => pb::FailureCategory::Timeout,
        "storage" => pb::FailureCategory::Storage,
        "config" => pb::FailureCategory::Config,
        "cancelled" => pb::FailureCategory::Cancelled,
        _ => pb::FailureCategory::Unspecified,
    }) as i32
}

/// The category name a worker reported.
pub fn category_from_pb(value: i32) -> &'static str {
    match pb::FailureCategory::try_from(value).unwrap_or(pb::FailureCategory::Unspecified) {
        pb::FailureCategory::Network => "network",
        pb::FailureCategory::Throttled => "throttled",
        pb::FailureCategory::Server => "server",
        pb::FailureCategory::Rejected => "rejected",
        pb::FailureCategory::Auth => "auth",
        pb::FailureCategory::Protocol => "protocol",
        pb::FailureCategory::Content => "content",
        pb::FailureCategory::Timeout => "timeout",
        pb::FailureCategory::Storage => "storage",
        pb::FailureCategory::Config => "config",
        pb::FailureCategory::Cancelled => "cancelled",
        pb::FailureCategory::Unspecified => "unknown",
    }
}

fn lease_to_pb(leased: LeasedFile, renew_every: Duration) -> pb::Lease {
    pb::Lease {
        lease_id: leased.grant.lease_id.to_string(),
        generation: leased.grant.generation,
        job_id: leased.grant.job_id,
        tenant: leased.tenant,
        file_url: leased.file.url,
        kind: kind_to_pb(leased.file.kind),
        resource_type: leased.file.resource_type,
        expected_count: leased.file.count,
        requires_access_token: leased.requires_access_token,
        relative_path: leased.file.relative_path,
        expires_at_unix_ms: leased.grant.expires_at_ms,
        fhir_base_url: leased.fhir_base_url,
        token_allow_list: leased.token_allow_list,
        renew_every_ms: renew_every.as_millis() as u64,
    }
}

fn phase_to_pb(phase: JobPhase) -> i32 {
    (match phase {
        JobPhase::Submitted => pb::JobPhase::Submitted,
        JobPhase::Polling => pb::JobPhase::Polling,
        JobPhase::Downloading => pb::JobPhase::Downloading,
        JobPhase::Completed => pb::JobPhase::Completed,
        JobPhase::Failed => pb::JobPhase::Failed,
        JobPhase::Cancelled => pb::JobPhase::Cancelled,
    }) as i32
}

fn summary_to_pb(job: &Job) -> pb::JobSummary {
    pb::JobSummary {
        job_id: job.id.clone(),
        tenant: job.tenant.clone(),
        phase: phase_to_pb(job.phase),
        files_total: job.files.len() as u32,
        files_done: job.files_done() as u32,
        files_failed: job.files_failed() as u32,
        bytes_done: job.bytes_done(),
        progress: None,
        error: job.error.clone(),
        transaction_time: job.transaction_time.clone(),
    }
}

fn job_to_pb(job: &Job) -> pb::GetJobResponse {
    pb::GetJobResponse {
        summary: Some(summary_to_pb(job)),
        files: job
            .files
            .iter()
            .map(|f| pb::FileState {
                url: fhirhaul_common::url_util::SafeUrl::from(f.url.as_str()).to_string(),
                kind: kind_to_pb(f.kind),
                resource_type: f.resource_type.clone(),
                phase: (match f.phase {
                    FilePhase::Pending => pb::FilePhase::Pending,
                    FilePhase::Leased { .. } => pb::FilePhase::Leased,
                    FilePhase::Done => pb::FilePhase::Done,
                    FilePhase::Failed => pb::FilePhase::Failed,
                }) as i32,
                bytes: f.progress.offset,
                resources: f.progress.resources,
                sha256: f.sha256.clone(),
                location: f.location.clone(),
                worker_id: match &f.phase {
                    FilePhase::Leased { worker_id, .. } => Some(worker_id.clone()),
                    _ => None,
                },
                attempts: f.attempts,
                failure_category: f.failure.as_ref().map(|(c, _)| category_to_pb(c)),
                failure: f.failure.as_ref().map(|(_, r)| r.clone()),
            })
            .collect(),
    }
}

fn parse_lease_id(text: &str) -> Result<u64, Status> {
    text.parse()
        .map_err(|_| Status::invalid_argument(format!("lease_id `{text}` is not a lease id")))
}

/// Checks the cluster token, when one is configured.
#[derive(Clone)]
pub struct ClusterAuth {
    token: Option<Secret>,
}

impl ClusterAuth {
    pub fn new(token: Option<Secret>) -> Self {
        ClusterAuth { token }
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else { return Ok(()) };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(expected.expose()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("a valid cluster token is required"))
        }
    }
}

pub struct WorkerApi {
    coordinator: Coordinator,
    auth: ClusterAuth,
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        if request.name.is_empty()
            || !request
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Status::invalid_argument("worker name must be letters, digits, - or _"));
        }
        self.coordinator
            .register_worker(&request.name, request.concurrency.max(1))
            .await
            .map_err(status_from)?;
        tracing::info!(worker = %request.name, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: request.name,
            heartbeat_interval_ms: (self.coordinator.settings().lease_duration / 3).as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.auth.check(&request)?;
        self.coordinator
            .heartbeat(&request.into_inner().worker_id)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms.min(60_000));
        let leased = self
            .coordinator
            .acquire_lease(&request.worker_id, wait)
            .await
            .map_err(status_from)?;
        let renew_every = self.coordinator.settings().lease_duration / 3;
        if let Some(leased) = &leased {
            tracing::info!(worker = %request.worker_id, lease = leased.grant.lease_id, job = %leased.grant.job_id, file = leased.grant.file, "lease granted");
        }
        Ok(Response::new(pb::AcquireLeaseResponse {
            lease: leased.map(|l| lease_to_pb(l, renew_every)),
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let progress = request.progress.unwrap_or_default();
        let expires_at_ms = self.coordinator.lease_expiry();
        self.coordinator
            .lease_command(Command::RenewLease {
                lease_id: parse_lease_id(&request.lease_id)?,
                generation: request.generation,
                progress: Checkpoint {
                    offset: progress.offset,
                    lines: progress.lines,
                    resources: progress.resources,
                    validator: None,
                },
                expires_at_ms,
            })
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::RenewLeaseResponse {
            expires_at_unix_ms: expires_at_ms,
        }))
    }

    async fn complete_lease(
        &self,
        request: Request<pb::CompleteLeaseRequest>,
    ) -> Result<Response<pb::CompleteLeaseResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        if request.sha256.len() != 64 || !request.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("sha256 must be 64 hex digits"));
        }
        self.coordinator
            .lease_command(Command::CompleteLease {
                lease_id: parse_lease_id(&request.lease_id)?,
                generation: request.generation,
                bytes: request.bytes,
                resources: request.resources,
                sha256: request.sha256,
                location: request.location,
                issues: request.issues,
            })
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::CompleteLeaseResponse {}))
    }

    async fn fail_lease(
        &self,
        request: Request<pb::FailLeaseRequest>,
    ) -> Result<Response<pb::FailLeaseResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let category = category_from_pb(request.category);
        let retryable = matches!(
            category,
            "network" | "throttled" | "server" | "auth" | "storage" | "unknown"
        );
        self.coordinator
            .lease_command(Command::FailLease {
                lease_id: parse_lease_id(&request.lease_id)?,
                generation: request.generation,
                category: category.to_string(),
                reason: request.reason,
                retryable,
                released: request.released,
            })
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::FailLeaseResponse {}))
    }

    async fn get_token(&self, request: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let known = {
            let worker = request.worker_id.clone();
            self.coordinator
                .read(move |state| state.workers.contains_key(&worker))
                .await
                .map_err(status_from)?
        };
        if !known {
            return Err(status_from(CoordinatorError::UnknownWorker(request.worker_id)));
        }
        let token = self
            .coordinator
            .token(&request.tenant, request.refused_generation)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::GetTokenResponse {
            access_token: token.value.expose().to_string(),
            generation: token.generation,
            expires_at_unix_ms: token
                .expires_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
        }))
    }
}

pub struct AdminApi {
    coordinator: Coordinator,
    auth: ClusterAuth,
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::GetJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn submit_export(
        &self,
        request: Request<pb::SubmitExportRequest>,
    ) -> Result<Response<pb::SubmitExportResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let export = if request.request_json.trim().is_empty() {
            None
        } else {
            Some(
                serde_json::from_str::<ExportRequest>(&request.request_json)
                    .map_err(|e| Status::invalid_argument(format!("request_json: {e}")))?,
            )
        };
        let job_id = self
            .coordinator
            .submit(&request.tenant, export, request.incremental)
            .await
            .map_err(status_from)?;
        tracing::info!(job = %job_id, tenant = %request.tenant, "export submitted");
        Ok(Response::new(pb::SubmitExportResponse { job_id }))
    }

    async fn cancel_export(
        &self,
        request: Request<pb::CancelExportRequest>,
    ) -> Result<Response<pb::CancelExportResponse>, Status> {
        self.auth.check(&request)?;
        self.coordinator
            .cancel(&request.into_inner().job_id)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::CancelExportResponse {}))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.auth.check(&request)?;
        let jobs = self
            .coordinator
            .read_linearizable(|state| state.jobs.values().map(summary_to_pb).collect())
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        self.auth.check(&request)?;
        let job = self
            .coordinator
            .job(&request.into_inner().job_id)
            .await
            .map_err(status_from)?;
        Ok(Response::new(job_to_pb(&job)))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.auth.check(&request)?;
        let job_id = request.into_inner().job_id;
        let first = self.coordinator.job(&job_id).await.map_err(status_from)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let mut applied = coordinator.raft().applied();
            let mut last = job_to_pb(&first);
            if sender.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut phase = first.phase;
            while !phase.is_final() {
                tokio::select! {
                    _ = sender.closed() => return,
                    changed = applied.changed() => if changed.is_err() { return },
                }
                // Coalesce bursts of commits into one update.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(job) = coordinator.job(&job_id).await else {
                    return;
                };
                phase = job.phase;
                let now = job_to_pb(&job);
                if now != last {
                    last = now.clone();
                    if sender.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        ))))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.auth.check(&request)?;
        let workers = self
            .coordinator
            .read_linearizable(|state| {
                state
                    .workers
                    .values()
                    .map(|w| pb::WorkerState {
                        worker_id: w.id.clone(),
                        name: w.id.clone(),
                        concurrency: w.concurrency,
                        leases: state.leases_held(&w.id) as u32,
                        last_heartbeat_unix_ms: w.last_seen_ms,
                    })
                    .collect()
            })
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.auth.check(&request)?;
        let status = self.coordinator.raft().status();
        Ok(Response::new(pb::ClusterStatusResponse {
            node_id: status.node_id.to_string(),
            leader_id: (status.leader_id != 0).then(|| status.leader_id.to_string()),
            leader_address: status.leader_address.clone(),
            term: status.term,
            commit_index: status.applied,
            voters: status.voters.iter().map(u64::to_string).collect(),
            coordinators: members_to_pb(&status),
            snapshot_index: status.snapshot_index,
            role: status.role.to_string(),
        }))
    }

    async fn add_coordinator(
        &self,
        request: Request<pb::AddCoordinatorRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.auth.check(&request)?;
        let request = request.into_inner();
        let voters = self
            .coordinator
            .add_coordinator(request.node_id, request.address.clone())
            .await
            .map_err(status_from)?;
        tracing::info!(node = request.node_id, address = %request.address, "coordinator added");
        let status = self.coordinator.raft().status_when(|s| s.voters == voters).await;
        Ok(Response::new(pb::MembershipResponse {
            coordinators: members_to_pb(&status),
        }))
    }

    async fn remove_coordinator(
        &self,
        request: Request<pb::RemoveCoordinatorRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.auth.check(&request)?;
        let node_id = request.into_inner().node_id;
        let voters = self
            .coordinator
            .remove_coordinator(node_id)
            .await
            .map_err(status_from)?;
        tracing::info!(node = node_id, "coordinator removed");
        let status = self.coordinator.raft().status_when(|s| s.voters == voters).await;
        Ok(Response::new(pb::MembershipResponse {
            coordinators: members_to_pb(&status),
        }))
    }

    async fn transfer_leadership(
        &self,
        request: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        self.auth.check(&request)?;
        let node_id = request.into_inner().node_id;
        self.coordinator
            .transfer_leadership(node_id)
            .await
            .map_err(status_from)?;
        tracing::info!(node = node_id, "leadership transfer started");
        Ok(Response::new(pb::TransferLeadershipResponse {}))
    }
}

fn members_to_pb(status: &crate::raft_node::RaftStatus) -> Vec<pb::CoordinatorInfo> {
    let mut ids: std::collections::BTreeSet<u64> = status.voters.iter().copied().collect();
    ids.extend(status.addresses.keys());
    ids.into_iter()
        .map(|node_id| pb::CoordinatorInfo {
            node_id,
            address: status.addresses.get(&node_id).cloned().unwrap_or_default(),
            voter: status.voters.contains(&node_id),
        })
        .collect()
}

/// Raft messages from other coordinators.
pub struct RaftApi {
    coordinator: Coordinator,
    auth: ClusterAuth,
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn deliver(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        self.auth.check(&request)?;
        let batch = request.into_inner();
        for bytes in batch.messages {
            let message = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("raft message from {}: {e}", batch.from)))?;
            if message.from != batch.from {
                return Err(Status::invalid_argument(format!(
                    "raft message claims to be from {} inside a batch from {}",
                    message.from, batch.from
                )));
            }
            self.coordinator
                .raft()
                .step(message)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn kickoff_outcome(&self, request: Request<pb::KickoffQuery>) -> Result<Response<pb::KickoffAnswer>, Status> {
        use pb::kickoff_answer::Outcome;
        self.auth.check(&request)?;
        let (outcome, status_url) = match self.coordinator.kickoff_outcome(&request.into_inner().job_id) {
            KickoffOutcome::Unknown => (Outcome::Unknown, String::new()),
            KickoffOutcome::InProgress => (Outcome::InProgress, String::new()),
            KickoffOutcome::Accepted { status_url } => (Outcome::Accepted, status_url),
            KickoffOutcome::NotAccepted => (Outcome::NotAccepted, String::new()),
        };
        Ok(Response::new(pb::KickoffAnswer {
            outcome: outcome.into(),
            status_url,
        }))
    }
}

/// Serves the worker, admin and raft APIs, gRPC health and reflection on `listener` until
/// `cancel`, with mutual TLS when `tls` is given. Every call must carry the coordinator's
/// cluster token when it has one (the same one it sends to its peers). Plaintext is meant
/// for loopback only (a warning is logged otherwise).
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    if let Ok(address) = listener.local_addr() {
        match (&tls, address.ip().is_loopback()) {
            (Some(_), _) => tracing::info!(%address, "serving gRPC with mutual TLS"),
            (None, true) => tracing::info!(%address, "serving plaintext gRPC on loopback"),
            (None, false) => {
                tracing::warn!(%address, "serving gRPC WITHOUT TLS on a non-loopback address; configure [cluster.tls]")
            }
        }
    }
    serve_incoming(
        coordinator,
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        tls,
        cancel,
    )
    .await
}

/// [`serve`] over any stream of accepted connections (a simulated network's, say).
pub async fn serve_incoming<I, IO, IE>(
    coordinator: Coordinator,
    incoming: I,
    tls: Option<tonic::transport::ServerTlsConfig>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let auth = ClusterAuth::new(coordinator.settings().cluster_token.clone());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    health_reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
    health_reporter.set_serving::<RaftServiceServer<RaftApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            tracing::error!(%e, "reflection service unavailable");
            e
        });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut router = builder
        .add_service(health)
        .add_service(WorkerServiceServer::new(WorkerApi {
            coordinator: coordinator.clone(),
            auth: auth.clone(),
        }))
        .add_service(
            RaftServiceServer::new(RaftApi {
                coordinator: coordinator.clone(),
                auth: auth.clone(),
            })
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES),
        )
        .add_service(AdminServiceServer::new(AdminApi { coordinator, auth }));
    if let Ok(reflection) = reflection {
        router = router.add_service(reflection);
    }
    router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn the_cluster_token_is_required_exactly_when_one_is_set() {
        let open = ClusterAuth::new(None);
        assert!(open.check(&with_authorization(None)).is_ok());
        let closed = ClusterAuth::new(Some(Secret::new("s3cret".to_string())));
        for refused in [None, Some("Bearer wrong"), Some("s3cret"), Some("Basic s3cret")] {
            let status = closed.check(&with_authorization(refused)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
            assert!(!status.message().contains("s3cret"), "the token is never echoed");
        }
        assert!(closed.check(&with_authorization(Some("Bearer s3cret"))).is_ok());
    }

    #[test]
    fn a_follower_names_the_leader_in_its_refusal() {
        let status = status_from(CoordinatorError::Raft(RaftError::NotLeader {
            leader: Some(2),
            address: Some("http://10.0.0.2:7400".into()),
        }));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()),
            Some("http://10.0.0.2:7400")
        );
        let uncertain = status_from(CoordinatorError::Raft(RaftError::Uncertain));
        assert_eq!(
            uncertain.code(),
            tonic::Code::Unknown,
            "an outcome that may have been applied is not presented as retryable"
        );
    }
}
