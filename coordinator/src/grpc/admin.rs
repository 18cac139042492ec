//! `AdminService`: submit, cancel, list and watch exports; workers and cluster status;
//! membership changes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_server::AdminService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{archived_job_to_pb, archived_summary_to_pb, job_summary_to_pb, job_to_pb, summary_to_pb};
use crate::node::{Coordinator, JobView};

/// What operators and the CLI call.
pub struct AdminApi {
    pub(super) coordinator: Coordinator,
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::GetJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn submit_export(
        &self,
        request: Request<pb::SubmitExportRequest>,
    ) -> Result<Response<pb::SubmitExportResponse>, Status> {
        let request = request.into_inner();
        let export = if request.request_json.trim().is_empty() {
            None
        } else {
            Some(
                serde_json::from_str::<ExportRequest>(&request.request_json)
                    .map_err(|e| Status::invalid_argument(format!("request_json: {e}")))?,
            )
        };
        let request_id = match request.request_id.as_str() {
            "" => None,
            id if id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()) => Some(id.to_string()),
            _ => {
                return Err(Status::invalid_argument(
                    "request_id must be at most 128 printable ASCII characters",
                ));
            }
        };
        let submitted = self
            .coordinator
            .submit(&request.tenant, export, request.incremental, request_id)
            .await
            .map_err(Status::from)?;
        let (job_id, created) = (submitted.job_id, submitted.created);
        if created {
            tracing::info!(job = %job_id, tenant = %request.tenant, "export submitted");
        } else {
            tracing::info!(job = %job_id, tenant = %request.tenant, "export submitted again with the same request id; answering with its job");
        }
        let (since, since_from_job) = match submitted.cursor {
            Some(cursor) => (Some(cursor.since), cursor.from_job),
            None => (None, None),
        };
        Ok(Response::new(pb::SubmitExportResponse {
            job_id,
            created,
            since,
            since_from_job,
        }))
    }

    async fn cancel_export(
        &self,
        request: Request<pb::CancelExportRequest>,
    ) -> Result<Response<pb::CancelExportResponse>, Status> {
        self.coordinator
            .cancel(&request.into_inner().job_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::CancelExportResponse {}))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let now_ms = self.coordinator.now_ms();
        let jobs = self
            .coordinator
            .read_linearizable(move |state| {
                let archived = state.archived.values().map(archived_summary_to_pb);
                archived
                    .chain(state.jobs.values().map(|job| summary_to_pb(job, now_ms)))
                    .collect()
            })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .coordinator
            .job_or_archived(&request.job_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(match view {
            JobView::Live(job) | JobView::Archived { detail: Some(job), .. } => {
                job_to_pb(&job, self.coordinator.now_ms(), request.file_offset, request.file_limit)
            }
            JobView::Archived { summary, detail: None } => archived_job_to_pb(&summary),
        }))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = request.into_inner().job_id;
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let first = match self.coordinator.job_or_archived(&job_id).await.map_err(Status::from)? {
            JobView::Live(job) => Arc::unwrap_or_clone(job),
            // Archived: it has ended; its summary is all there is to watch.
            JobView::Archived { summary, .. } => {
                let _ = sender.send(Ok(archived_job_to_pb(&summary))).await;
                return Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
                    receiver,
                ))));
            }
        };
        let coordinator = self.coordinator.clone();
        // Tracked, so shutdown drains it (it ends when the raft node stops or the caller goes).
        self.coordinator.tracker().spawn(async move {
            let mut applied = coordinator.raft().applied();
            let mut last = job_summary_to_pb(&first, coordinator.now_ms());
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
                let now = job_summary_to_pb(&job, coordinator.now_ms());
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
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
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
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
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
            tenant_concurrency: match self.coordinator.leader_term() {
                Ok(term) => term
                    .pacing()
                    .limits()
                    .into_iter()
                    .map(|(tenant, limit)| (tenant, limit as u32))
                    .collect(),
                Err(_) => Default::default(),
            },
        }))
    }

    async fn add_coordinator(
        &self,
        request: Request<pb::AddCoordinatorRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let request = request.into_inner();
        let voters = self
            .coordinator
            .add_coordinator(request.node_id, request.address.clone())
            .await
            .map_err(Status::from)?;
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
        let node_id = request.into_inner().node_id;
        let voters = self
            .coordinator
            .remove_coordinator(node_id)
            .await
            .map_err(Status::from)?;
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
        let node_id = request.into_inner().node_id;
        self.coordinator
            .transfer_leadership(node_id)
            .await
            .map_err(Status::from)?;
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
