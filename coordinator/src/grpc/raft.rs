//! `RaftService`: raft messages from other coordinators, and what came of a former
//! leader's kick-off. Behind the cluster-token interceptor: raft messages are parsed only
//! from callers that passed it (protobuf 2 has a known stack overflow on crafted input).

use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::raft_service_server::RaftService;
use tonic::{Request, Response, Status};

use crate::node::{Coordinator, KickoffOutcome};

/// Raft messages from other coordinators.
pub struct RaftApi {
    pub(super) coordinator: Coordinator,
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn deliver(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
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
        let (outcome, status_url, reason) = match self.coordinator.kickoff_outcome(&request.into_inner().job_id).await {
            KickoffOutcome::Unknown => (Outcome::Unknown, String::new(), String::new()),
            KickoffOutcome::InProgress => (Outcome::InProgress, String::new(), String::new()),
            KickoffOutcome::Accepted { status_url } => (Outcome::Accepted, status_url, String::new()),
            KickoffOutcome::NotAccepted => (Outcome::NotAccepted, String::new(), String::new()),
            KickoffOutcome::Ambiguous { reason } => (Outcome::Ambiguous, String::new(), reason),
        };
        Ok(Response::new(pb::KickoffAnswer {
            outcome: outcome.into(),
            status_url,
            reason,
        }))
    }
}
