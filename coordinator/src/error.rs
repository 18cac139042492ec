//! The coordinator's one error type, and the one place it becomes a `tonic::Status`.
//!
//! Every status carries the error's category and retryability as metadata
//! (`fhirhaul_proto::convert`), so a worker learns, say, that the EHR refused the client
//! (auth, not retryable) rather than seeing a flaky network.

use fhirhaul_common::Category;
use fhirhaul_common::url_util::SafeUrl;
use fhirhaul_proto::connect::LEADER_METADATA;
use fhirhaul_proto::convert::with_error_kind;
use tonic::Status;

use crate::raft_node::RaftError;
use crate::state::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    /// The state machine refused the change (see [`Refusal`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("node id 0 is reserved")]
    ReservedNodeId,
    #[error("coordinator address `{0}` must look like http://host:port or https://host:port")]
    InvalidAddress(String),
    #[error("{what} `{url}` is not a URL: {reason}")]
    BadUrl {
        what: &'static str,
        url: SafeUrl,
        reason: String,
    },
    #[error("the {0} task panicked")]
    TaskPanicked(&'static str),
    #[error(transparent)]
    Client(#[from] fhirhaul_common::Error),
}

impl CoordinatorError {
    /// The error's category, and whether the same call may succeed later.
    pub fn kind(&self) -> (Category, bool) {
        match self {
            CoordinatorError::Raft(RaftError::Uncertain) => (Category::Network, false),
            CoordinatorError::Raft(RaftError::Membership(_)) => (Category::Config, false),
            CoordinatorError::Raft(RaftError::Storage(_)) => (Category::Storage, true),
            CoordinatorError::Raft(_) => (Category::Network, true),
            CoordinatorError::Refused(refusal) if refusal.is_fencing() => (Category::Cancelled, false),
            CoordinatorError::UnknownTenant(_)
            | CoordinatorError::Refused(_)
            | CoordinatorError::ReservedNodeId
            | CoordinatorError::InvalidAddress(_)
            | CoordinatorError::BadUrl { .. } => (Category::Config, false),
            CoordinatorError::TaskPanicked(_) => (Category::Cancelled, false),
            CoordinatorError::Client(error) => (error.category(), error.is_retryable()),
        }
    }

    /// Whether leadership moved under the call (the next leader carries on).
    pub fn is_leadership_lost(&self) -> bool {
        matches!(
            self,
            CoordinatorError::Raft(RaftError::NotLeader { .. } | RaftError::Uncertain | RaftError::Stopped)
        )
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Status {
        let (category, retryable) = error.kind();
        let message = error.to_string();
        let status = match error {
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
            CoordinatorError::Raft(RaftError::Uncertain) => Status::unknown(message),
            CoordinatorError::Raft(RaftError::Membership(_)) => Status::failed_precondition(message),
            CoordinatorError::Raft(_) => Status::unavailable(message),
            CoordinatorError::UnknownTenant(_) | CoordinatorError::Refused(Refusal::UnknownJob(_)) => {
                Status::not_found(message)
            }
            // A worker that hears this registers again.
            CoordinatorError::Refused(Refusal::UnknownWorker(_)) => Status::failed_precondition(message),
            // Fencing: the lease is no longer the caller's; it must stop.
            CoordinatorError::Refused(ref refusal) if refusal.is_fencing() => Status::aborted(message),
            CoordinatorError::Refused(_) => Status::failed_precondition(message),
            CoordinatorError::ReservedNodeId
            | CoordinatorError::InvalidAddress(_)
            | CoordinatorError::BadUrl { .. } => Status::invalid_argument(message),
            CoordinatorError::TaskPanicked(_) => Status::internal(message),
            CoordinatorError::Client(client) => match client {
                fhirhaul_common::Error::InvalidRequest { .. } | fhirhaul_common::Error::Config { .. } => {
                    Status::invalid_argument(message)
                }
                other if other.is_retryable() => Status::unavailable(message),
                _ => Status::failed_precondition(message),
            },
        };
        with_error_kind(status, category, retryable)
    }
}

#[cfg(test)]
mod tests {
    use fhirhaul_proto::convert::error_from_status;
    use tonic::Code;

    use super::*;

    #[test]
    fn a_follower_names_the_leader_in_its_refusal() {
        let status = Status::from(CoordinatorError::Raft(RaftError::NotLeader {
            leader: Some(2),
            address: Some("http://10.0.0.2:7400".into()),
        }));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()),
            Some("http://10.0.0.2:7400")
        );
        let uncertain = Status::from(CoordinatorError::Raft(RaftError::Uncertain));
        assert_eq!(
            uncertain.code(),
            Code::Unknown,
            "an outcome that may have been applied is not presented as retryable"
        );
    }

    #[test]
    fn each_refusal_has_its_own_code() {
        let code = |refusal: Refusal| Status::from(CoordinatorError::Refused(refusal)).code();
        assert_eq!(
            code(Refusal::StaleGeneration {
                lease_id: 1,
                generation: 1,
                current: 2
            }),
            Code::Aborted
        );
        assert_eq!(code(Refusal::LeaseNotLive { lease_id: 1 }), Code::Aborted);
        assert_eq!(code(Refusal::UnknownJob("job-9".into())), Code::NotFound);
        assert_eq!(code(Refusal::UnknownWorker("w9".into())), Code::FailedPrecondition);
        assert_eq!(code(Refusal::JobEnded("job-1".into())), Code::FailedPrecondition);
    }

    #[test]
    fn an_ehr_refusing_the_client_reaches_the_worker_as_non_retryable_auth() {
        // What the token manager returns when the EHR answers invalid_client.
        let refusal = fhirhaul_common::Error::OAuth {
            url: SafeUrl::from("https://ehr.example/token"),
            status: 400,
            error: "invalid_client".into(),
            description: Some("the key was revoked".into()),
            uri: None,
        };
        let status = Status::from(CoordinatorError::Client(refusal));
        // What the worker's token provider makes of the status it receives.
        let at_worker = error_from_status(&status, "the coordinator");
        assert_eq!(at_worker.category(), Category::Auth);
        assert!(!at_worker.is_retryable(), "a revoked key is not a flaky network");
        assert!(at_worker.to_string().contains("the key was revoked"), "{at_worker}");
        // A token endpoint that is down is still worth another try.
        let down = fhirhaul_common::Error::OAuth {
            url: SafeUrl::from("https://ehr.example/token"),
            status: 503,
            error: "temporarily_unavailable".into(),
            description: None,
            uri: None,
        };
        let at_worker = error_from_status(&Status::from(CoordinatorError::Client(down)), "the coordinator");
        assert_eq!(at_worker.category(), Category::Auth);
        assert!(at_worker.is_retryable());
    }
}
