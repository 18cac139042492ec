//! One job's driver, run by the leader: kick off (unless a status URL is committed, or an
//! earlier leader's kick-off can be adopted), commit the status URL before the first poll,
//! poll, and commit the manifest's files as they arrive. Also the status URL's DELETE.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fhirhaul_common::client::FhirClient;
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::kickoff::{KickoffRetries, kick_off};
use fhirhaul_common::retry::Backoff;
use fhirhaul_common::status::{PollEvent, Poller, delete_export};
use fhirhaul_common::url_util::SafeUrl;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::LeaderTerm;
use crate::error::CoordinatorError;
use crate::kickoff_ledger::KickoffOutcome;
use crate::node::Coordinator;
use crate::raft_node::RaftError;
use crate::state::{Applied, Command, Job};

/// How long a new leader keeps asking an unreachable former leader what came of its
/// kick-off before sending one itself (and risking a second export at the EHR).
const KICKOFF_HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// What polling saw, to be committed.
enum Seen {
    Files(Vec<fhirhaul_common::manifest::ManifestFile>, bool),
    Progress(Option<String>),
}

/// One job's driver for one term.
pub(super) struct JobDriver {
    pub coordinator: Coordinator,
    pub term: Arc<LeaderTerm>,
    pub job_id: String,
    pub cancel: CancellationToken,
}

impl JobDriver {
    pub async fn run(self) {
        let outcome = self.drive().await;
        if self.cancel.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => {}
            // Not the export's fault: leadership moved (the next leader resumes the job).
            Err(CoordinatorError::Raft(error)) => tracing::info!(%error, "job driver stopped"),
            Err(error) => {
                tracing::warn!(%error, "export failed");
                let _ = self
                    .coordinator
                    .propose(Command::JobFailed {
                        job_id: self.job_id.clone(),
                        reason: error.to_string(),
                    })
                    .await;
            }
        }
    }

    async fn drive(&self) -> Result<(), CoordinatorError> {
        let job = self.coordinator.applied_job(&self.job_id).await?;
        let tenant = self.coordinator.tenant(&job.tenant)?;
        let client = self.term.client(&job.tenant)?;
        let status_url = match &job.status_url {
            Some(url) => {
                tracing::info!(status_url = %SafeUrl::from(url.as_str()), "resuming polling of the committed export");
                parse_url("committed status URL", url)?
            }
            None => {
                let adopted = match job.kickoff_by {
                    // An earlier leader (maybe this node, in an earlier term) sent the
                    // kick-off; the EHR may have accepted it without the status URL being
                    // committed.
                    Some(node) => self.kickoff_handed_over(node).await?,
                    None => None,
                };
                if self.cancel.is_cancelled() {
                    // Leadership lost (or shutting down) while asking: not ours to kick off.
                    return Err(CoordinatorError::Raft(RaftError::Stopped));
                }
                let status_url = match adopted {
                    Some(url) => url,
                    None => self.send_kickoff(client, &job, tenant).await?,
                };
                // Committed before the first poll, so a restarted coordinator polls this
                // export instead of starting another.
                self.coordinator
                    .propose(Command::KickedOff {
                        job_id: self.job_id.clone(),
                        status_url: status_url.clone(),
                    })
                    .await?;
                self.coordinator
                    .ledger()
                    .record(&self.job_id, KickoffOutcome::Unknown)
                    .await;
                parse_url("status URL", &status_url)?
            }
        };
        self.poll(client, tenant, &job, &status_url).await
    }

    /// Polls until the manifest is complete, committing partial-manifest files and progress
    /// as they come. The deadline and the stall watchdog count from the job's submission and
    /// its last committed progress, so a new leader does not start them again.
    async fn poll(
        &self,
        client: &FhirClient,
        tenant: &TenantConfig,
        job: &Job,
        status_url: &url::Url,
    ) -> Result<(), CoordinatorError> {
        let (seen_tx, mut seen_rx) = mpsc::channel(16);
        let forward_to = self.coordinator.clone();
        let forward_job = self.job_id.clone();
        let forwarder = self.coordinator.tracker().spawn(
            async move {
                while let Some(seen) = seen_rx.recv().await {
                    let command = match seen {
                        Seen::Files(files, requires_access_token) => Command::AddFiles {
                            job_id: forward_job.clone(),
                            files,
                            requires_access_token,
                        },
                        Seen::Progress(progress) => Command::JobProgress {
                            job_id: forward_job.clone(),
                            progress,
                            at_ms: forward_to.now_ms(),
                        },
                    };
                    let _ = forward_to.propose(command).await;
                }
            }
            .in_current_span(),
        );
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let mut poller = Poller::resuming(
            tenant.export.poll.clone(),
            client,
            at(job.submitted_ms),
            at(job.progress_at_ms.unwrap_or(job.submitted_ms)),
            job.progress.clone(),
        );
        let completed = poller
            .run(client, status_url, &self.cancel, |event| match event {
                PollEvent::PartialFiles {
                    files,
                    requires_access_token,
                } => {
                    // The final manifest lists these again, so a full queue loses nothing.
                    let _ = seen_tx.try_send(Seen::Files(files, requires_access_token));
                    let _ = seen_tx.try_send(Seen::Progress(None));
                }
                PollEvent::Progress(text) => {
                    tracing::info!(progress = %text, "export in progress");
                    let _ = seen_tx.try_send(Seen::Progress(Some(text)));
                }
                PollEvent::Waiting { .. } => {}
            })
            .await;
        drop(seen_tx);
        let _ = forwarder.await;
        let completed = completed?;
        self.coordinator
            .propose(Command::AddFiles {
                job_id: self.job_id.clone(),
                files: completed.files,
                requires_access_token: completed.requires_access_token,
            })
            .await?;
        self.coordinator
            .propose(Command::ManifestComplete {
                job_id: self.job_id.clone(),
                transaction_time: completed.transaction_time,
                links_expire_ms: completed.expires.map(fhirhaul_common::clock::unix_ms),
            })
            .await?;
        Ok(())
    }

    /// Marks the kick-off as sent by this node, then sends it. The request runs to its end
    /// even if leadership is lost meanwhile, and its outcome is recorded here for the next
    /// leader to ask about.
    async fn send_kickoff(
        &self,
        client: &FhirClient,
        job: &Job,
        tenant: &TenantConfig,
    ) -> Result<String, CoordinatorError> {
        let starting = Command::KickoffStarting {
            job_id: job.id.clone(),
            node_id: self.coordinator.node_id(),
        };
        if let Applied::Refused(refusal) = self.coordinator.propose(starting).await? {
            return Err(refusal.into());
        }
        let ledger = self.coordinator.ledger().clone();
        ledger.record(&job.id, KickoffOutcome::InProgress).await;
        let settings = tenant.export.clone();
        let (client, request, profile) = (client.clone(), job.request.clone(), tenant.profile);
        let job_id = job.id.clone();
        // Not tied to the term: the request finishes (and is recorded) even if leadership is
        // lost meanwhile. Tracked, so a shutdown waits for it.
        let sending = self.coordinator.tracker().spawn(
            async move {
                let mut backoff = Backoff::new(
                    settings.poll.min_interval,
                    settings.poll.max_interval,
                    client.entropy().clone(),
                )
                .with_hint_bounds(settings.poll.min_retry_after, settings.poll.max_retry_after);
                let sent = kick_off(
                    &client,
                    &request,
                    &profile,
                    KickoffRetries {
                        max_attempts: settings.kickoff_attempts.max(1),
                        retry_ambiguous: settings.kickoff_retry_ambiguous,
                        throttled_at_most: settings.poll.deadline,
                    },
                    &mut backoff,
                )
                .await;
                let outcome = match &sent {
                    Ok(accepted) => KickoffOutcome::Accepted {
                        status_url: accepted.status_url.to_string(),
                    },
                    // The EHR may hold an export: no leader may send this job's kick-off again.
                    Err(error @ fhirhaul_common::Error::AmbiguousKickoff { .. }) => KickoffOutcome::Ambiguous {
                        reason: error.to_string(),
                    },
                    Err(_) => KickoffOutcome::NotAccepted,
                };
                ledger.record(&job_id, outcome).await;
                sent
            }
            .in_current_span(),
        );
        tokio::select! {
            sent = sending => match sent {
                Ok(sent) => Ok(sent?.status_url.to_string()),
                Err(_) => Err(CoordinatorError::TaskPanicked("kick-off")),
            },
            // Leadership lost: the request finishes on its own and its outcome is recorded.
            _ = self.cancel.cancelled() => Err(CoordinatorError::Raft(RaftError::Stopped)),
        }
    }

    /// The status URL of the export that coordinator `node` kicked off for this job as an
    /// earlier leader, if the EHR accepted it. Asks that node (this one answers from its own
    /// ledger) until it answers, for as long as its kick-off is still running, and for at
    /// most [`KICKOFF_HANDOVER_WAIT`] while it cannot be reached.
    ///
    /// A kick-off whose connection broke after sending (ambiguous) fails the job: the EHR
    /// may hold that export, and sending another could make two.
    async fn kickoff_handed_over(&self, node: u64) -> Result<Option<String>, CoordinatorError> {
        let address = self.coordinator.coordinator_address(node).await;
        let mut give_up = tokio::time::Instant::now() + KICKOFF_HANDOVER_WAIT;
        loop {
            let answer = if node == self.coordinator.node_id() {
                Ok(self.coordinator.ledger().outcome(&self.job_id).await)
            } else {
                self.coordinator
                    .ask_kickoff_outcome(address.as_deref(), &self.job_id)
                    .await
            };
            match answer {
                Ok(KickoffOutcome::Accepted { status_url }) => {
                    tracing::info!(node, status_url = %SafeUrl::from(status_url.as_str()), "adopting the export a former leader kicked off");
                    return Ok(Some(status_url));
                }
                Ok(KickoffOutcome::Ambiguous { reason }) => {
                    return Err(CoordinatorError::Client(fhirhaul_common::Error::Relayed {
                        from: "the kick-off a former leader sent",
                        category: fhirhaul_common::Category::Network,
                        retryable: false,
                        message: reason,
                    }));
                }
                Ok(KickoffOutcome::NotAccepted | KickoffOutcome::Unknown) => return Ok(None),
                Ok(KickoffOutcome::InProgress) => {
                    give_up = tokio::time::Instant::now() + KICKOFF_HANDOVER_WAIT;
                }
                Err(error) => {
                    if tokio::time::Instant::now() >= give_up {
                        tracing::warn!(
                            node,
                            %error,
                            "the former leader that kicked this export off cannot say what came of it; kicking off again (the EHR may end up with two exports)"
                        );
                        return Ok(None);
                    }
                    tracing::debug!(node, %error, "asking a former leader about its kick-off");
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// DELETEs a finished or cancelled job's status URL and commits that it is gone.
pub(super) async fn delete_status(coordinator: Coordinator, term: Arc<LeaderTerm>, job_id: String) {
    let Ok(job) = coordinator.applied_job(&job_id).await else {
        return;
    };
    let (Some(status_url), Ok(client)) = (
        job.status_url.as_ref().and_then(|u| u.parse().ok()),
        term.client(&job.tenant),
    ) else {
        return;
    };
    match delete_export(client, &status_url).await {
        Ok(()) => {
            let _ = coordinator.propose(Command::StatusDeleted { job_id }).await;
        }
        Err(error) => {
            tracing::warn!(%error, job = %job_id, "could not DELETE the export's status URL");
            let _ = coordinator
                .propose(Command::StatusDeleteFailed {
                    job_id,
                    reason: error.to_string(),
                    at_ms: coordinator.now_ms(),
                })
                .await;
        }
    }
}

fn parse_url(what: &'static str, url: &str) -> Result<url::Url, CoordinatorError> {
    url.parse().map_err(|e: url::ParseError| CoordinatorError::BadUrl {
        what,
        url: SafeUrl::from(url),
        reason: e.to_string(),
    })
}
