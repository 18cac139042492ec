//! `WorkerService`: thin adapters from workers' calls to the [`Coordinator`].

use std::time::Duration;

use fhirhaul_common::download::Checkpoint;
use fhirhaul_proto::convert::category_from_wire;
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};

use super::convert::{lease_to_pb, parse_lease_id};
use crate::node::{Coordinator, CoordinatorError};
use crate::state::{Command, Refusal};

/// What workers call: register, heartbeat, lease files, get the tenant's token.
pub struct WorkerApi {
    pub(super) coordinator: Coordinator,
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
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
            .map_err(Status::from)?;
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
        let request = request.into_inner();
        // Workers that report their leases say so; an older worker sends none and no
        // flag, and its leases are never reclaimed by report.
        let lease_ids = if request.reports_leases {
            Some(
                request
                    .lease_ids
                    .iter()
                    .map(|id| parse_lease_id(id))
                    .collect::<Result<Vec<u64>, Status>>()?,
            )
        } else {
            None
        };
        self.coordinator
            .heartbeat(&request.worker_id, lease_ids)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms.min(60_000));
        let leased = self
            .coordinator
            .acquire_lease(&request.worker_id, wait)
            .await
            .map_err(Status::from)?;
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
        let request = request.into_inner();
        let lease_id = parse_lease_id(&request.lease_id)?;
        self.coordinator.report_throttled(lease_id, request.throttled).await;
        let progress = Checkpoint::from(request.progress.unwrap_or_default());
        let expires_at_ms = self.coordinator.lease_expiry();
        self.coordinator
            .lease_command(Command::RenewLease {
                lease_id,
                generation: request.generation,
                progress,
                expires_at_ms,
            })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::RenewLeaseResponse {
            expires_at_unix_ms: expires_at_ms,
        }))
    }

    async fn complete_lease(
        &self,
        request: Request<pb::CompleteLeaseRequest>,
    ) -> Result<Response<pb::CompleteLeaseResponse>, Status> {
        let request = request.into_inner();
        if request.sha256.len() != 64 || !request.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("sha256 must be 64 hex digits"));
        }
        self.coordinator
            .report_throttled(parse_lease_id(&request.lease_id)?, request.throttled)
            .await;
        self.coordinator
            .lease_command(Command::CompleteLease {
                lease_id: parse_lease_id(&request.lease_id)?,
                generation: request.generation,
                bytes: request.bytes,
                resources: request.resources,
                sha256: request.sha256,
                location: request.location,
                issues: request.issues,
                ehr_errors: request.ehr_errors,
                at_ms: self.coordinator.now_ms(),
            })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::CompleteLeaseResponse {}))
    }

    async fn fail_lease(
        &self,
        request: Request<pb::FailLeaseRequest>,
    ) -> Result<Response<pb::FailLeaseResponse>, Status> {
        let request = request.into_inner();
        let category =
            category_from_wire(request.category).map_err(|e| Status::invalid_argument(format!("category: {e}")))?;
        let retryable = request.retryable.unwrap_or(category.usually_retryable());
        self.coordinator
            .report_throttled(parse_lease_id(&request.lease_id)?, request.throttled)
            .await;
        self.coordinator
            .lease_command(Command::FailLease {
                lease_id: parse_lease_id(&request.lease_id)?,
                generation: request.generation,
                category,
                reason: request.reason,
                retryable,
                released: request.released,
                at_ms: self.coordinator.now_ms(),
            })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::FailLeaseResponse {}))
    }

    async fn get_token(&self, request: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        let request = request.into_inner();
        let known = {
            let worker = request.worker_id.clone();
            self.coordinator
                .read(move |state| state.workers.contains_key(&worker))
                .await
                .map_err(Status::from)?
        };
        if !known {
            return Err(CoordinatorError::from(Refusal::UnknownWorker(request.worker_id)).into());
        }
        let token = self
            .coordinator
            .token(&request.tenant, request.refused_generation)
            .await
            .map_err(Status::from)?;
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

    async fn renew_link(
        &self,
        request: Request<pb::RenewLinkRequest>,
    ) -> Result<Response<pb::RenewLinkResponse>, Status> {
        let request = request.into_inner();
        let renewed = crate::leader::links::renew_link(
            &self.coordinator,
            &request.worker_id,
            parse_lease_id(&request.lease_id)?,
            request.generation,
            &request.failed_url,
        )
        .await
        .map_err(Status::from)?;
        Ok(Response::new(pb::RenewLinkResponse {
            file_url: renewed.url,
            links_expire_at_unix_ms: renewed.links_expire_ms,
        }))
    }
}
