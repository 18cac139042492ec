//! The coordinator node's handle: what the gRPC services and the leader's work call. It
//! owns the raft node, the tenants' configuration, the kick-off ledger and the tracker
//! every task of the node runs under; the leader's work itself is in [`crate::leader`].
//! A follower answers every call that needs the leader with [`RaftError::NotLeader`],
//! naming the leader's address.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fhirhaul_common::auth::AccessToken;
use fhirhaul_common::client::FhirClient;
use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::http::HttpTransport;
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_common::offload::Offload;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::error::CoordinatorError;
use crate::kickoff_ledger::KickoffLedger;
pub use crate::kickoff_ledger::KickoffOutcome;
pub use crate::leader::LeaderTerm;
pub use crate::leader::leases::LeasedFile;
use crate::peers::Peers;
use crate::raft_node::{self, Membership, RaftError, RaftHandle, RaftSettings};
use crate::state::{Applied, ArchivedJob, Command, DeletePolicy, Job, Refusal, State};

/// How long a finished job stays in the hot state by default: long enough for whoever
/// started it to read its status and files, short enough that a coordinator running
/// export after export keeps a state (and memory, and snapshots) of what is running.
pub const DEFAULT_ARCHIVE_AFTER: Duration = Duration::from_secs(600);

/// A job as status calls see it.
#[derive(Debug, Clone)]
pub enum JobView {
    Live(Arc<Job>),
    Archived {
        summary: Box<ArchivedJob>,
        /// The job with its files, from this coordinator's archive (none if it caught up
        /// from a snapshot taken after the job was archived).
        detail: Option<Arc<Job>>,
    },
}

/// Coordinator timings and limits.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub data_dir: PathBuf,
    /// A lease not renewed for this long goes back to pending.
    pub lease_duration: Duration,
    pub max_file_attempts: u32,
    /// How often the leader plans its work (drivers, DELETEs, lease expiry).
    pub tick: Duration,
    /// This node's place in the raft group (node id, initial voters, timings).
    pub raft: RaftSettings,
    /// How to reach the other coordinators (TLS, or a simulation's network).
    pub peer_connector: fhirhaul_proto::connect::Connector,
    /// The cluster token sent to other coordinators.
    pub cluster_token: Option<fhirhaul_common::secret::Secret>,
    /// Where blocking disk work (the raft log, the kick-off ledger) runs.
    pub offload: Offload,
    /// Serve gRPC reflection (it lists every API, unauthenticated) on a non-loopback
    /// address too; on loopback it is always served.
    pub reflection_beyond_loopback: bool,
    /// A finished job is moved out of the replicated state (its summary stays; its files
    /// go to the archive directory) once it has been quiet this long.
    pub archive_after: Duration,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            data_dir: PathBuf::from("fhirhaul-data"),
            lease_duration: Duration::from_secs(30),
            max_file_attempts: 5,
            tick: Duration::from_millis(500),
            raft: RaftSettings::default(),
            peer_connector: fhirhaul_proto::connect::Connector::default(),
            cluster_token: None,
            offload: Offload::Threads,
            reflection_beyond_loopback: false,
            archive_after: DEFAULT_ARCHIVE_AFTER,
        }
    }
}

struct Inner {
    raft: RaftHandle,
    tenants: Arc<BTreeMap<String, TenantConfig>>,
    settings: CoordinatorSettings,
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    /// The current term's work while this node leads.
    term: watch::Sender<Option<Arc<LeaderTerm>>>,
    ledger: KickoffLedger,
    /// Every task this node starts (supervisor, drivers, kick-offs, DELETEs, lease
    /// manager), so a shutdown can wait for them.
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Handle to a running coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// What a submission created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job_id: String,
    /// False when the request id had been submitted before and this is that job.
    pub created: bool,
    /// The incremental cursor the export starts from, when it was asked to be incremental
    /// and the tenant has one.
    pub cursor: Option<Cursor>,
}

/// A tenant's incremental cursor: the `_since` of its next incremental export, and the job
/// whose `transactionTime` it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub since: String,
    pub from_job: Option<String>,
}

impl Coordinator {
    /// Opens the raft log in `settings.data_dir`, checks every tenant's configuration and
    /// starts the supervisor. A coordinator alone in its group is leader when this returns;
    /// one of several serves as a follower until an election makes it leader.
    pub async fn start(
        settings: CoordinatorSettings,
        tenants: Vec<TenantConfig>,
        transport: Arc<dyn HttpTransport>,
        clock: Arc<dyn Clock>,
        entropy: Entropy,
        cancel: CancellationToken,
    ) -> Result<Coordinator, CoordinatorError> {
        let data_dir = settings.data_dir.clone();
        settings
            .offload
            .run(
                #[allow(clippy::disallowed_methods)] // Inside the offload seam.
                move || {
                    fhirhaul_common::private_fs::create_dir_all(&data_dir)
                        .map_err(|e| fhirhaul_common::Error::io("creating", data_dir, e))
                },
            )
            .await?;
        // A bad key is reported now, not at the first election won. With every tenant
        // broken there is nothing to do and the coordinator refuses to start; otherwise the
        // broken tenants' jobs fail with the reason while the others' go on.
        let mut broken = Vec::new();
        for config in &tenants {
            let probe = cancel.child_token();
            let connected = config.connect(
                Arc::clone(&transport),
                Arc::clone(&clock),
                entropy.clone(),
                probe.clone(),
            );
            probe.cancel();
            if let Err(error) = connected {
                tracing::error!(tenant = %config.name, %error, "tenant cannot be used; its exports will fail until this is fixed");
                broken.push(error);
            }
        }
        if !tenants.is_empty()
            && broken.len() == tenants.len()
            && let Some(error) = broken.into_iter().next()
        {
            return Err(error.into());
        }
        let peers = Peers::new(
            settings.raft.node_id,
            settings.peer_connector.clone(),
            settings.cluster_token.clone(),
            cancel.child_token(),
        );
        let alone = !settings.raft.join && settings.raft.peers.keys().all(|id| *id == settings.raft.node_id);
        let raft = raft_node::start(
            &settings.data_dir,
            settings.raft.clone(),
            settings.offload,
            peers,
            cancel.child_token(),
        )?;
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                raft,
                tenants: Arc::new(tenants.into_iter().map(|t| (t.name.clone(), t)).collect()),
                ledger: KickoffLedger::new(&settings.data_dir, settings.offload),
                settings,
                transport,
                clock,
                entropy,
                term: watch::Sender::new(None),
                tracker: TaskTracker::new(),
                cancel,
            }),
        };
        coordinator
            .inner
            .tracker
            .spawn(crate::leader::supervise(coordinator.clone()));
        if alone {
            coordinator.wait_until_leading().await?;
        }
        Ok(coordinator)
    }

    /// Waits, after the node's cancellation token fired, until every task it started has
    /// ended (job drivers, kick-offs in flight, DELETEs, the lease manager).
    pub async fn drained(&self) {
        self.inner.cancel.cancelled().await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// Waits until this node leads and its leader work has started.
    pub async fn wait_until_leading(&self) -> Result<(), CoordinatorError> {
        let mut terms = self.inner.term.subscribe();
        loop {
            if self.leader_term().is_ok() {
                return Ok(());
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return Err(RaftError::Stopped.into()),
                changed = terms.changed() => if changed.is_err() { return Err(RaftError::Stopped.into()) },
            }
        }
    }

    /// The current term's work, or the refusal naming the leader.
    pub fn leader_term(&self) -> Result<Arc<LeaderTerm>, CoordinatorError> {
        match self.inner.term.borrow().as_ref() {
            Some(term) if !term.is_over() => Ok(Arc::clone(term)),
            _ => Err(self.inner.raft.not_leader().into()),
        }
    }

    pub(crate) fn set_leader_term(&self, term: Option<Arc<LeaderTerm>>) {
        self.inner.term.send_replace(term);
    }

    /// Adds a coordinator (already running with `join`) to the group.
    pub async fn add_coordinator(&self, node_id: u64, address: String) -> Result<Vec<u64>, CoordinatorError> {
        if node_id == 0 {
            return Err(CoordinatorError::ReservedNodeId);
        }
        check_coordinator_address(&address)?;
        Ok(self
            .inner
            .raft
            .change_membership(Membership::Add { node_id, address })
            .await?)
    }

    pub async fn transfer_leadership(&self, node_id: u64) -> Result<(), CoordinatorError> {
        Ok(self.inner.raft.transfer_leadership(node_id).await?)
    }

    pub async fn remove_coordinator(&self, node_id: u64) -> Result<Vec<u64>, CoordinatorError> {
        Ok(self
            .inner
            .raft
            .change_membership(Membership::Remove { node_id })
            .await?)
    }

    pub fn raft(&self) -> &RaftHandle {
        &self.inner.raft
    }

    pub fn settings(&self) -> &CoordinatorSettings {
        &self.inner.settings
    }

    pub fn node_id(&self) -> u64 {
        self.inner.settings.raft.node_id
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_unix_ms()
    }

    pub(crate) fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.inner.clock)
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    pub(crate) fn stopping(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    pub(crate) fn ledger(&self) -> &KickoffLedger {
        &self.inner.ledger
    }

    pub(crate) fn tenants(&self) -> &Arc<BTreeMap<String, TenantConfig>> {
        &self.inner.tenants
    }

    pub(crate) fn tenant(&self, name: &str) -> Result<&TenantConfig, CoordinatorError> {
        self.inner
            .tenants
            .get(name)
            .ok_or_else(|| CoordinatorError::UnknownTenant(name.to_string()))
    }

    pub fn tenant_names(&self) -> Vec<String> {
        self.inner.tenants.keys().cloned().collect()
    }

    /// A connected client (with its token manager) for one tenant, for one term.
    pub(crate) fn connect_tenant(
        &self,
        config: &TenantConfig,
        cancel: CancellationToken,
    ) -> Result<FhirClient, fhirhaul_common::Error> {
        config.connect(
            Arc::clone(&self.inner.transport),
            Arc::clone(&self.inner.clock),
            self.inner.entropy.clone(),
            cancel,
        )
    }

    pub(crate) async fn propose(&self, command: Command) -> Result<Applied, CoordinatorError> {
        Ok(self.inner.raft.propose(command).await?)
    }

    /// Commits a new export for `tenant` (nothing is sent to the EHR before the commit).
    /// Without a request, the tenant's configured one is used. `incremental` fills `since`
    /// with the tenant's last `transactionTime`, when it has one and the request has none.
    ///
    /// `request_id` makes the submission idempotent: the same id again (a retry after a
    /// lost answer, or after a leader change left the first attempt's fate unknown) gets
    /// the first attempt's job, never a second one.
    pub async fn submit(
        &self,
        tenant: &str,
        request: Option<ExportRequest>,
        incremental: bool,
        request_id: Option<String>,
    ) -> Result<Submitted, CoordinatorError> {
        let config = self.tenant(tenant)?;
        let mut request = request.unwrap_or_else(|| config.request.clone());
        let mut cursor = None;
        if incremental && request.since.is_none() {
            let name = tenant.to_string();
            cursor = self
                .read_linearizable(move |state| {
                    let since = state.tenant_since.get(&name)?.clone();
                    Some(Cursor {
                        since,
                        from_job: state.tenant_since_job.get(&name).cloned(),
                    })
                })
                .await?;
            request.since = cursor.as_ref().map(|c| c.since.clone());
        }
        request.validate(&config.profile)?;
        let at_ms = self.now_ms();
        let submitted = self
            .propose(Command::SubmitJob {
                tenant: tenant.to_string(),
                request,
                max_file_attempts: self.inner.settings.max_file_attempts,
                at_ms,
                request_id,
                export_id: Some(export_id(at_ms, &self.inner.entropy)),
                delete_policy: DeletePolicy {
                    when_done: config.export.delete_when_done,
                    after_failure: config.export.delete_after_failure,
                },
            })
            .await?;
        if let Ok(term) = self.leader_term() {
            // Kick it off now, not at the next tick.
            term.wake();
        }
        let (job_id, created) = match submitted {
            Applied::JobSubmitted { job_id } => (job_id, true),
            Applied::AlreadySubmitted { job_id } => (job_id, false),
            Applied::Refused(refusal) => return Err(refusal.into()),
            other => unreachable!("SubmitJob applies as JobSubmitted, not {other:?}"),
        };
        Ok(Submitted {
            job_id,
            created,
            cursor,
        })
    }

    pub async fn cancel(&self, job_id: &str) -> Result<(), CoordinatorError> {
        let cancelled = self
            .propose(Command::CancelJob {
                job_id: job_id.to_string(),
            })
            .await?;
        if let Ok(term) = self.leader_term() {
            // Stop its driver and DELETE its export now.
            term.wake();
        }
        match cancelled {
            Applied::Refused(refusal) => Err(refusal.into()),
            _ => Ok(()),
        }
    }

    /// A worker saw the EHR answer 429/503 `responses` times while holding `lease_id`:
    /// the lease's tenant is paced down (when this node leads; otherwise nobody paces).
    pub async fn report_throttled(&self, lease_id: u64, responses: u32) {
        if responses == 0 {
            return;
        }
        let Ok(term) = self.leader_term() else {
            return;
        };
        let tenant = self
            .read(move |state| {
                let at = state.leases.get(&lease_id)?;
                state.jobs.get(&at.job_id).map(|job| job.tenant.clone())
            })
            .await;
        if let Ok(Some(tenant)) = tenant {
            term.pacing().throttled(&tenant, u64::from(responses));
        }
    }

    /// The job as the leader knows it now (a linearizable read); an archived job as this
    /// coordinator's archive holds it, files and all.
    pub async fn job(&self, job_id: &str) -> Result<Job, CoordinatorError> {
        match self.job_or_archived(job_id).await? {
            JobView::Live(job) | JobView::Archived { detail: Some(job), .. } => Ok(Arc::unwrap_or_clone(job)),
            JobView::Archived { detail: None, .. } => Err(Refusal::ArchivedElsewhere(job_id.to_string()).into()),
        }
    }

    /// The job as the leader knows it now, or what is kept of it once archived: its
    /// summary, and its files if this coordinator's archive has them.
    pub async fn job_or_archived(&self, job_id: &str) -> Result<JobView, CoordinatorError> {
        let id = job_id.to_string();
        let (live, archived) = self
            .read_linearizable(move |state| (state.jobs.get(&id).cloned(), state.archived.get(&id).cloned()))
            .await?;
        if let Some(job) = live {
            return Ok(JobView::Live(Arc::new(job)));
        }
        let Some(summary) = archived else {
            return Err(Refusal::UnknownJob(job_id.to_string()).into());
        };
        let detail = self
            .raft()
            .archive()
            .read_when_written(job_id, self.inner.settings.offload)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, job = %job_id, "could not read an archived job's files");
                None
            });
        Ok(JobView::Archived {
            summary: Box::new(summary),
            detail,
        })
    }

    /// The job in this node's applied state (for the leader's own work).
    pub(crate) async fn applied_job(&self, job_id: &str) -> Result<Job, CoordinatorError> {
        let id = job_id.to_string();
        self.read(move |state| state.jobs.get(&id).cloned())
            .await?
            .ok_or_else(|| Refusal::UnknownJob(job_id.to_string()).into())
    }

    /// Reads this node's applied state, which a follower's may lag.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        Ok(self.inner.raft.read(read).await?)
    }

    /// Reads on the leader, seeing every write that finished before the call.
    pub async fn read_linearizable<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        Ok(self.inner.raft.read_linearizable(read).await?)
    }

    pub async fn register_worker(&self, worker_id: &str, concurrency: u32) -> Result<(), CoordinatorError> {
        self.propose(Command::RegisterWorker {
            worker_id: worker_id.to_string(),
            concurrency,
            at_ms: self.now_ms(),
        })
        .await?;
        Ok(())
    }

    /// A worker is alive; `lease_ids`, when it reports them, are every lease it holds (a
    /// lease it does not list is reclaimed, see `planner::plan`).
    pub async fn heartbeat(&self, worker_id: &str, lease_ids: Option<Vec<u64>>) -> Result<(), CoordinatorError> {
        let beat = self
            .propose(Command::Heartbeat {
                worker_id: worker_id.to_string(),
                at_ms: self.now_ms(),
                lease_ids,
            })
            .await?;
        match beat {
            Applied::Refused(refusal) => Err(refusal.into()),
            _ => Ok(()),
        }
    }

    /// Long-polls for a file for `worker_id`, until `wait` passes. Only the leader grants;
    /// a follower names it at once instead of long-polling.
    pub async fn acquire_lease(&self, worker_id: &str, wait: Duration) -> Result<Option<LeasedFile>, CoordinatorError> {
        let term = self.leader_term()?;
        term.leases().acquire(worker_id, wait).await
    }

    /// Proposes a renewal, completion or failure of a lease; a refusal (a stale generation,
    /// say) is an error.
    pub async fn lease_command(&self, command: Command) -> Result<Applied, CoordinatorError> {
        match self.propose(command).await? {
            Applied::Refused(refusal) => Err(refusal.into()),
            other => Ok(other),
        }
    }

    pub fn lease_expiry(&self) -> u64 {
        self.now_ms() + self.inner.settings.lease_duration.as_millis() as u64
    }

    /// The tenant's token; `refused` names a token the EHR answered 401 to.
    pub async fn token(&self, tenant: &str, refused: Option<u64>) -> Result<AccessToken, CoordinatorError> {
        let term = self.leader_term()?;
        let tokens = term.client(tenant)?.tokens();
        Ok(match refused {
            Some(generation) => tokens.token_refused(generation).await?,
            None => tokens.token().await?,
        })
    }

    /// What came of the kick-off of `job_id` that this node sent while it led.
    pub async fn kickoff_outcome(&self, job_id: &str) -> KickoffOutcome {
        self.inner.ledger.outcome(job_id).await
    }

    /// Where coordinator `node` listens: as the log records it, else as configured.
    pub(crate) async fn coordinator_address(&self, node: u64) -> Option<String> {
        let recorded = self.read(move |state| state.coordinators.get(&node).cloned()).await;
        recorded
            .ok()
            .flatten()
            .or_else(|| self.inner.settings.raft.peers.get(&node).cloned())
    }

    /// Asks coordinator `address` what came of its kick-off of `job_id`.
    pub(crate) async fn ask_kickoff_outcome(
        &self,
        address: Option<&str>,
        job_id: &str,
    ) -> Result<KickoffOutcome, AskError> {
        use fhirhaul_proto::v1::kickoff_answer::Outcome;
        use fhirhaul_proto::v1::raft_service_client::RaftServiceClient;
        let address = address.ok_or(AskError::NoAddress)?;
        let channel = self.inner.settings.peer_connector.channel(address)?;
        let mut request = fhirhaul_proto::connect::with_cluster_token(
            fhirhaul_proto::v1::KickoffQuery {
                job_id: job_id.to_string(),
            },
            self.inner.settings.cluster_token.as_ref(),
        );
        request.set_timeout(Duration::from_secs(2));
        let answer = RaftServiceClient::new(channel)
            .kickoff_outcome(request)
            .await
            .map_err(|status| AskError::Refused(Box::new(status)))?
            .into_inner();
        Ok(match answer.outcome() {
            Outcome::Unknown => KickoffOutcome::Unknown,
            Outcome::InProgress => KickoffOutcome::InProgress,
            Outcome::Accepted => KickoffOutcome::Accepted {
                status_url: answer.status_url,
            },
            Outcome::NotAccepted => KickoffOutcome::NotAccepted,
            Outcome::Ambiguous => KickoffOutcome::Ambiguous { reason: answer.reason },
        })
    }
}

/// A new export's id: its submission time (UTC, to the second, so ids sort by age and read
/// as dates) and 32 random bits, so two clusters, or one started again with fresh state,
/// never name two exports alike: `20261202T094700Z-3fa9c01b`.
fn export_id(at_ms: u64, entropy: &Entropy) -> String {
    let at = fhirhaul_common::fhir::system_time_to_offset(UNIX_EPOCH + Duration::from_secs(at_ms / 1000));
    let stamp: String = fhirhaul_common::fhir::format_instant(at)
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("{stamp}-{}", entropy.hex(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ids_sort_by_time_and_never_repeat() {
        let entropy = Entropy::from_seed(1);
        let first = export_id(1_764_668_820_345, &entropy);
        assert_eq!(&first[..17], "20251202T094700Z-", "{first}");
        assert_eq!(first.len(), 17 + 8);
        let again = export_id(1_764_668_820_000, &entropy);
        assert_ne!(first, again, "the same second, another export");
        assert!(export_id(1_764_668_821_000, &entropy) > first);
    }
}

/// Why another coordinator could not say what came of its kick-off.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("its address is not known")]
    NoAddress,
    #[error(transparent)]
    Address(#[from] fhirhaul_proto::connect::ConnectError),
    #[error("it answered {0}")]
    Refused(Box<tonic::Status>),
}

/// A coordinator address must be a URL a gRPC client can dial.
fn check_coordinator_address(address: &str) -> Result<(), CoordinatorError> {
    match url::Url::parse(address) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err(CoordinatorError::InvalidAddress(address.to_string())),
    }
}
