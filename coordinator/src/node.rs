//! The coordinator node: the raft node, and the leader's work — each tenant's client and
//! token manager, job drivers, lease expiry — which exists only while this node leads. A
//! supervisor waits for leadership, makes sure everything earlier leaders committed is
//! applied here (a read-index barrier), starts a [`LeaderTerm`], reconciles what committed
//! state asks for with what is running on a self-scheduled tick, and tears it all down the
//! moment leadership is lost. A follower answers every call that needs the leader with
//! [`RaftError::NotLeader`], naming the leader's address.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fhirhaul_common::auth::AccessToken;
use fhirhaul_common::client::FhirClient;
use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::http::HttpTransport;
use fhirhaul_common::kickoff::{ExportRequest, kick_off};
use fhirhaul_common::retry::Backoff;
use fhirhaul_common::status::{PollEvent, Poller, delete_export};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::peers::Peers;
use crate::raft_node::{self, Membership, RaftError, RaftHandle, RaftSettings};
use crate::state::{Applied, Command, FilePhase, FileRecord, Job, JobPhase, LeaseGrant, State};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    #[error("unknown worker `{0}`: register first")]
    UnknownWorker(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Client(#[from] fhirhaul_common::Error),
}

/// Coordinator timings and limits.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub data_dir: PathBuf,
    /// A lease not renewed for this long goes back to pending.
    pub lease_duration: Duration,
    pub max_file_attempts: u32,
    /// How often the supervisor reconciles drivers and expires leases.
    pub tick: Duration,
    /// This node's place in the raft group (node id, initial voters, timings).
    pub raft: RaftSettings,
    /// How to reach the other coordinators (TLS, or a simulation's network).
    pub peer_connector: fhirhaul_proto::connect::Connector,
    /// The cluster token sent to other coordinators.
    pub cluster_token: Option<fhirhaul_common::secret::Secret>,
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
        }
    }
}

/// The leader's work for one term: each tenant's connected client (whose token manager
/// workers share) and the cancellation that ends drivers when leadership is lost.
pub struct LeaderTerm {
    pub term: u64,
    /// When this node took over: it cannot know when an inherited lease was last renewed,
    /// so every lease gets a full period of grace from here.
    pub since_ms: u64,
    clients: BTreeMap<String, FhirClient>,
    cancel: CancellationToken,
}

impl LeaderTerm {
    fn client(&self, tenant: &str) -> Result<&FhirClient, CoordinatorError> {
        self.clients
            .get(tenant)
            .ok_or_else(|| CoordinatorError::UnknownTenant(tenant.to_string()))
    }
}

/// What a worker needs to download a leased file.
#[derive(Debug, Clone)]
pub struct LeasedFile {
    pub grant: LeaseGrant,
    pub tenant: String,
    pub file: FileRecord,
    pub requires_access_token: bool,
    pub fhir_base_url: String,
    pub token_allow_list: Vec<String>,
}

struct Inner {
    raft: RaftHandle,
    tenants: BTreeMap<String, TenantConfig>,
    settings: CoordinatorSettings,
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    /// The current term's work while this node leads.
    leading: std::sync::RwLock<Option<Arc<LeaderTerm>>>,
    /// What came of each kick-off this node sent, kept past its terms so a later leader can
    /// ask ([`Coordinator::kickoff_outcome`]); accepted ones are on disk too.
    kickoffs: std::sync::Mutex<BTreeMap<String, KickoffOutcome>>,
    cancel: CancellationToken,
}

/// What came of a kick-off this node sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KickoffOutcome {
    /// Never sent from here (or sent before this process started).
    Unknown,
    InProgress,
    Accepted {
        status_url: String,
    },
    NotAccepted,
}

/// How long a new leader keeps asking an unreachable former leader what came of its
/// kick-off before sending one itself (and risking a second export at the EHR).
const KICKOFF_HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// Handle to a running coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
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
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|e| RaftError::Storage(format!("creating {}: {e}", settings.data_dir.display())))?;
        // A bad key or URL is reported now, not at the first election won.
        for config in &tenants {
            let probe = cancel.child_token();
            config.connect(
                Arc::clone(&transport),
                Arc::clone(&clock),
                entropy.clone(),
                probe.clone(),
            )?;
            probe.cancel();
        }
        let peers = Peers::new(
            settings.raft.node_id,
            settings.peer_connector.clone(),
            settings.cluster_token.clone(),
            cancel.child_token(),
        );
        let alone = !settings.raft.join && settings.raft.peers.keys().all(|id| *id == settings.raft.node_id);
        let raft = raft_node::start(&settings.data_dir, settings.raft.clone(), peers, cancel.child_token())?;
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                raft,
                tenants: tenants.into_iter().map(|t| (t.name.clone(), t)).collect(),
                settings,
                transport,
                clock,
                entropy,
                leading: std::sync::RwLock::new(None),
                kickoffs: std::sync::Mutex::default(),
                cancel,
            }),
        };
        tokio::spawn(coordinator.clone().supervise());
        if alone {
            coordinator.wait_until_leading().await?;
        }
        Ok(coordinator)
    }

    /// Waits until this node leads and its leader work has started.
    pub async fn wait_until_leading(&self) -> Result<(), CoordinatorError> {
        loop {
            if self.leader_term().is_ok() {
                return Ok(());
            }
            if self.inner.cancel.is_cancelled() {
                return Err(RaftError::Stopped.into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The current term's work, or the refusal naming the leader.
    pub fn leader_term(&self) -> Result<Arc<LeaderTerm>, CoordinatorError> {
        let leading = self.inner.leading.read().unwrap_or_else(|p| p.into_inner());
        match leading.as_ref() {
            Some(term) if !term.cancel.is_cancelled() => Ok(Arc::clone(term)),
            _ => Err(self.inner.raft.not_leader().into()),
        }
    }

    /// Adds a coordinator (already running with `join`) to the group.
    pub async fn add_coordinator(&self, node_id: u64, address: String) -> Result<Vec<u64>, CoordinatorError> {
        if node_id == 0 {
            return Err(CoordinatorError::Refused("node id 0 is reserved".into()));
        }
        tonic_address_check(&address)?;
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

    pub fn now_ms(&self) -> u64 {
        unix_ms(&*self.inner.clock)
    }

    fn tenant(&self, name: &str) -> Result<&TenantConfig, CoordinatorError> {
        self.inner
            .tenants
            .get(name)
            .ok_or_else(|| CoordinatorError::UnknownTenant(name.to_string()))
    }

    pub fn tenant_names(&self) -> Vec<String> {
        self.inner.tenants.keys().cloned().collect()
    }

    async fn propose(&self, command: Command) -> Result<Applied, CoordinatorError> {
        Ok(self.inner.raft.propose(command).await?)
    }

    /// Commits a new export for `tenant` (nothing is sent to the EHR before the commit).
    /// Without a request, the tenant's configured one is used. `incremental` fills `since`
    /// with the tenant's last `transactionTime`, when it has one and the request has none.
    pub async fn submit(
        &self,
        tenant: &str,
        request: Option<ExportRequest>,
        incremental: bool,
    ) -> Result<String, CoordinatorError> {
        let config = self.tenant(tenant)?;
        let mut request = request.unwrap_or_else(|| config.request.clone());
        if incremental && request.since.is_none() {
            let name = tenant.to_string();
            request.since = self
                .read_linearizable(move |state| state.tenant_since.get(&name).cloned())
                .await?;
        }
        request.validate(&config.profile)?;
        match self
            .propose(Command::SubmitJob {
                tenant: tenant.to_string(),
                request,
                max_file_attempts: self.inner.settings.max_file_attempts,
                at_ms: self.now_ms(),
            })
            .await?
        {
            Applied::JobSubmitted { job_id } => Ok(job_id),
            other => Err(CoordinatorError::Refused(format!("{other:?}"))),
        }
    }

    pub async fn cancel(&self, job_id: &str) -> Result<(), CoordinatorError> {
        match self
            .propose(Command::CancelJob {
                job_id: job_id.to_string(),
            })
            .await?
        {
            Applied::Done => Ok(()),
            Applied::Refused { reason } => Err(CoordinatorError::Refused(reason)),
            other => Err(CoordinatorError::Refused(format!("{other:?}"))),
        }
    }

    /// The job as the leader knows it now (a linearizable read).
    pub async fn job(&self, job_id: &str) -> Result<Job, CoordinatorError> {
        let id = job_id.to_string();
        self.read_linearizable(move |state| state.jobs.get(&id).cloned())
            .await?
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))
    }

    /// The job in this node's applied state (for the leader's own work).
    /// What came of the kick-off of `job_id` that this node sent while it led.
    /// An accepted export's status URL is also on disk until it is committed, so a restart
    /// does not lose it.
    pub fn kickoff_outcome(&self, job_id: &str) -> KickoffOutcome {
        let kickoffs = self.inner.kickoffs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outcome) = kickoffs.get(job_id) {
            return outcome.clone();
        }
        match std::fs::read_to_string(self.accepted_kickoff_path(job_id)) {
            Ok(status_url) if !status_url.is_empty() => KickoffOutcome::Accepted { status_url },
            _ => KickoffOutcome::Unknown,
        }
    }

    /// `<data_dir>/kickoffs/<job id, hex>`: the status URL of an export this node kicked off
    /// that is not committed yet.
    fn accepted_kickoff_path(&self, job_id: &str) -> PathBuf {
        let name: String = job_id.bytes().map(|b| format!("{b:02x}")).collect();
        self.inner.settings.data_dir.join("kickoffs").join(name)
    }

    fn record_kickoff(&self, job_id: &str, outcome: KickoffOutcome) {
        let path = self.accepted_kickoff_path(job_id);
        match &outcome {
            KickoffOutcome::Accepted { status_url } => {
                // Synchronously, before anything else can happen: the EHR has an export
                // now, and only this node knows where.
                let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
                    let mut file = std::fs::File::create(&path)?;
                    std::io::Write::write_all(&mut file, status_url.as_bytes())?;
                    file.sync_all()
                });
                if let Err(error) = written {
                    tracing::warn!(path = %path.display(), %error, "could not record an accepted kick-off on disk");
                }
            }
            KickoffOutcome::Unknown => {
                let _ = std::fs::remove_file(&path);
            }
            KickoffOutcome::InProgress | KickoffOutcome::NotAccepted => {}
        }
        let mut kickoffs = self.inner.kickoffs.lock().unwrap_or_else(|p| p.into_inner());
        if outcome == KickoffOutcome::Unknown {
            kickoffs.remove(job_id);
        } else {
            kickoffs.insert(job_id.to_string(), outcome);
        }
    }

    /// The status URL of the export that coordinator `node` kicked off for `job_id` as an
    /// earlier leader, if the EHR accepted it. Asks that node (this one answers from its own
    /// record) until it answers, for as long as its kick-off is still running, and for at
    /// most [`KICKOFF_HANDOVER_WAIT`] while it cannot be reached.
    async fn kickoff_handed_over(&self, node: u64, job_id: &str, cancel: &CancellationToken) -> Option<String> {
        let address = {
            let node_addresses = self.read(move |state| state.coordinators.get(&node).cloned()).await;
            node_addresses
                .ok()
                .flatten()
                .or_else(|| self.inner.settings.raft.peers.get(&node).cloned())
        };
        let mut give_up = tokio::time::Instant::now() + KICKOFF_HANDOVER_WAIT;
        loop {
            let answer = if node == self.inner.settings.raft.node_id {
                Ok(self.kickoff_outcome(job_id))
            } else {
                self.ask_kickoff_outcome(address.as_deref(), job_id).await
            };
            match answer {
                Ok(KickoffOutcome::Accepted { status_url }) => {
                    tracing::info!(node, %status_url, "adopting the export a former leader kicked off");
                    return Some(status_url);
                }
                Ok(KickoffOutcome::NotAccepted | KickoffOutcome::Unknown) => return None,
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
                        return None;
                    }
                    tracing::debug!(node, %error, "asking a former leader about its kick-off");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn ask_kickoff_outcome(&self, address: Option<&str>, job_id: &str) -> Result<KickoffOutcome, String> {
        use fhirhaul_proto::v1::kickoff_answer::Outcome;
        use fhirhaul_proto::v1::raft_service_client::RaftServiceClient;
        let address = address.ok_or("its address is not known")?;
        let channel = self
            .inner
            .settings
            .peer_connector
            .channel(address)
            .map_err(|e| e.to_string())?;
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
            .map_err(|status| status.to_string())?
            .into_inner();
        Ok(match answer.outcome() {
            Outcome::Unknown => KickoffOutcome::Unknown,
            Outcome::InProgress => KickoffOutcome::InProgress,
            Outcome::Accepted => KickoffOutcome::Accepted {
                status_url: answer.status_url,
            },
            Outcome::NotAccepted => KickoffOutcome::NotAccepted,
        })
    }

    async fn applied_job(&self, job_id: &str) -> Result<Job, CoordinatorError> {
        let id = job_id.to_string();
        self.read(move |state| state.jobs.get(&id).cloned())
            .await?
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))
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

    pub async fn heartbeat(&self, worker_id: &str) -> Result<(), CoordinatorError> {
        match self
            .propose(Command::Heartbeat {
                worker_id: worker_id.to_string(),
                at_ms: self.now_ms(),
            })
            .await?
        {
            Applied::Refused { .. } => Err(CoordinatorError::UnknownWorker(worker_id.to_string())),
            _ => Ok(()),
        }
    }

    /// Long-polls for a file for `worker_id`, until `wait` passes.
    pub async fn acquire_lease(&self, worker_id: &str, wait: Duration) -> Result<Option<LeasedFile>, CoordinatorError> {
        // Only the leader grants; a follower names it at once instead of long-polling.
        let term = self.leader_term()?;
        let deadline = tokio::time::Instant::now() + wait;
        let limits: BTreeMap<String, usize> = self
            .inner
            .tenants
            .iter()
            .map(|(name, t)| (name.clone(), t.export.concurrency.max(1)))
            .collect();
        let mut applied = self.inner.raft.applied();
        loop {
            let worker = worker_id.to_string();
            let limits_now = limits.clone();
            let (known, pick) = self
                .inner
                .raft
                .read(move |state| {
                    (
                        state.workers.contains_key(&worker),
                        state.next_file_for(&worker, |t| limits_now.get(t).copied().unwrap_or(1)),
                    )
                })
                .await?;
            if !known {
                return Err(CoordinatorError::UnknownWorker(worker_id.to_string()));
            }
            if let Some((job_id, file)) = pick {
                let grant = self
                    .propose(Command::GrantLease {
                        job_id,
                        file,
                        worker_id: worker_id.to_string(),
                        expires_at_ms: self.now_ms() + self.inner.settings.lease_duration.as_millis() as u64,
                    })
                    .await?;
                if let Applied::LeaseGranted(grant) = grant {
                    return self.leased_file(grant).await.map(Some);
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                changed = applied.changed() => if changed.is_err() { return Err(RaftError::Stopped.into()) },
                _ = self.inner.cancel.cancelled() => return Ok(None),
                _ = term.cancel.cancelled() => return Err(self.inner.raft.not_leader().into()),
            }
        }
    }

    async fn leased_file(&self, grant: LeaseGrant) -> Result<LeasedFile, CoordinatorError> {
        let job = self.applied_job(&grant.job_id).await?;
        let file = job
            .files
            .get(grant.file as usize)
            .cloned()
            .ok_or_else(|| CoordinatorError::UnknownJob(grant.job_id.clone()))?;
        let tenant = self.tenant(&job.tenant)?;
        Ok(LeasedFile {
            grant,
            tenant: job.tenant.clone(),
            file,
            requires_access_token: job.requires_access_token,
            fhir_base_url: tenant.base_url.to_string(),
            token_allow_list: tenant.token_allow_list.iter().map(|u| u.to_string()).collect(),
        })
    }

    pub async fn lease_command(&self, command: Command) -> Result<Applied, CoordinatorError> {
        match self.propose(command).await? {
            Applied::Refused { reason } => Err(CoordinatorError::Refused(reason)),
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

    /// Waits for leadership, leads until it is lost, and again.
    async fn supervise(self) {
        let mut leadership = self.inner.raft.leadership();
        loop {
            tokio::select! {
                biased;
                _ = self.inner.cancel.cancelled() => break,
                led = leadership.wait_for(|leader| *leader) => if led.is_err() { break },
            }
            let cancel = self.inner.cancel.child_token();
            let term = self.inner.raft.term();
            let span = tracing::info_span!("leader", term);
            let outcome = self.lead(cancel.clone(), &mut leadership).instrument(span).await;
            cancel.cancel();
            *self.inner.leading.write().unwrap_or_else(|p| p.into_inner()) = None;
            if let Err(error) = outcome {
                tracing::warn!(%error, term, "leader work stopped; trying again");
                // Still leader but unable to lead (a tenant's key became unreadable, say):
                // do not spin.
                tokio::select! {
                    _ = self.inner.cancel.cancelled() => break,
                    _ = tokio::time::sleep(self.inner.settings.tick) => {}
                }
            }
        }
    }

    /// One term of leadership.
    async fn lead(
        &self,
        cancel: CancellationToken,
        leadership: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), CoordinatorError> {
        // Before deciding anything, everything earlier leaders committed is applied here
        // (the read-index barrier waits for this term's first entry to commit): a job
        // kicked off under the old leader is seen with its status URL and never re-kicked.
        self.read_linearizable(|_| ()).await?;
        let mut clients = BTreeMap::new();
        for (name, config) in &self.inner.tenants {
            let client = config.connect(
                Arc::clone(&self.inner.transport),
                Arc::clone(&self.inner.clock),
                self.inner.entropy.clone(),
                cancel.child_token(),
            )?;
            clients.insert(name.clone(), client);
        }
        let term = Arc::new(LeaderTerm {
            term: self.inner.raft.term(),
            since_ms: self.now_ms(),
            clients,
            cancel: cancel.clone(),
        });
        *self.inner.leading.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&term));
        tracing::info!(term = term.term, "leading: job drivers, leases and tokens run here");
        self.record_addresses().await;
        let mut drivers: BTreeMap<String, CancellationToken> = BTreeMap::new();
        let mut deleting: BTreeSet<String> = BTreeSet::new();
        let mut ticker = tokio::time::interval(self.inner.settings.tick);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                changed = leadership.changed() => {
                    if changed.is_err() || !*leadership.borrow_and_update() {
                        break Ok(());
                    }
                    continue;
                }
                _ = ticker.tick() => {}
            }
            match self.reconcile(&term, &mut drivers, &mut deleting).await {
                Ok(()) => {}
                Err(CoordinatorError::Raft(RaftError::NotLeader { .. } | RaftError::Uncertain)) => break Ok(()),
                Err(error) => tracing::warn!(%error, "coordinator reconciliation failed; retrying next tick"),
            }
        };
        for driver in drivers.values() {
            driver.cancel();
        }
        outcome
    }

    /// Puts this node's own address (as its configuration gives it) into the log, so
    /// followers can name it to clients and coordinators that join later can reach it.
    async fn record_addresses(&self) {
        let me = self.inner.settings.raft.node_id;
        let Some(address) = self.inner.settings.raft.peers.get(&me).cloned() else {
            return;
        };
        let recorded = self.read(move |state| state.coordinators.get(&me).cloned()).await;
        if matches!(recorded, Ok(Some(ref known)) if *known == address) {
            return;
        }
        if let Err(error) = self
            .propose(Command::SetCoordinatorAddress { node_id: me, address })
            .await
        {
            tracing::debug!(%error, "could not record this coordinator's address");
        }
    }

    async fn reconcile(
        &self,
        term: &Arc<LeaderTerm>,
        drivers: &mut BTreeMap<String, CancellationToken>,
        deleting: &mut BTreeSet<String>,
    ) -> Result<(), CoordinatorError> {
        let now = self.now_ms();
        // Only jobs that may still need work: a finished job is skipped once its status URL
        // needs no DELETE, so a long-lived coordinator does not walk its history every tick.
        let deleting_tenants: BTreeSet<String> = self
            .inner
            .tenants
            .iter()
            .filter(|(_, t)| t.export.delete_when_done)
            .map(|(name, _)| name.clone())
            .collect();
        let jobs: Vec<(String, String, JobPhase, bool, bool)> = self
            .read(move |state| {
                state
                    .jobs
                    .values()
                    .filter(|j| {
                        let delete_due = j.status_url.is_some()
                            && !j.status_deleted
                            && (j.phase == JobPhase::Cancelled || deleting_tenants.contains(&j.tenant));
                        !j.phase.is_final() || delete_due
                    })
                    .map(|j| {
                        (
                            j.id.clone(),
                            j.tenant.clone(),
                            j.phase,
                            j.status_deleted,
                            j.status_url.is_some(),
                        )
                    })
                    .collect()
            })
            .await?;
        // Drivers of jobs that ended (and so are no longer listed) are forgotten.
        drivers.retain(|id, _| jobs.iter().any(|(job_id, ..)| job_id == id));
        for (job_id, tenant, phase, status_deleted, has_status_url) in jobs {
            match phase {
                JobPhase::Submitted | JobPhase::Polling => {
                    if !drivers.contains_key(&job_id) {
                        let token = term.cancel.child_token();
                        drivers.insert(job_id.clone(), token.clone());
                        let span = tracing::info_span!("job", job = %job_id);
                        tokio::spawn(
                            self.clone()
                                .drive(Arc::clone(term), job_id.clone(), token)
                                .instrument(span),
                        );
                    }
                }
                JobPhase::Cancelled => {
                    if let Some(token) = drivers.remove(&job_id) {
                        token.cancel();
                    }
                    if has_status_url && !status_deleted && deleting.insert(job_id.clone()) {
                        tokio::spawn(self.clone().delete_status(Arc::clone(term), job_id));
                    }
                }
                JobPhase::Completed => {
                    drivers.remove(&job_id);
                    let wanted = self.inner.tenants.get(&tenant).map(|t| t.export.delete_when_done);
                    if wanted == Some(true) && has_status_url && !status_deleted && deleting.insert(job_id.clone()) {
                        tokio::spawn(self.clone().delete_status(Arc::clone(term), job_id));
                    }
                }
                JobPhase::Downloading | JobPhase::Failed => {
                    drivers.remove(&job_id);
                }
            }
        }
        // Lease expiry, with a full lease period of grace after this node took over.
        let lease_ms = self.inner.settings.lease_duration.as_millis() as u64;
        if now >= term.since_ms + lease_ms {
            let expired = self.read(move |state| state.expired_leases(now)).await?;
            for (lease_id, generation) in expired {
                tracing::info!(lease = lease_id, "lease expired; the file goes back to pending");
                self.propose(Command::ExpireLease { lease_id, generation }).await?;
            }
            let stale_before_ms = now.saturating_sub(lease_ms);
            let stale = self
                .read(move |state| {
                    state.jobs.values().flat_map(|j| j.files.iter()).any(|f| {
                        f.phase == FilePhase::Pending
                            && f.preferred_worker
                                .as_ref()
                                .is_some_and(|w| state.workers.get(w).is_none_or(|w| w.last_seen_ms < stale_before_ms))
                    })
                })
                .await?;
            if stale {
                self.propose(Command::ForgetAbsentWorkers { stale_before_ms }).await?;
            }
        }
        Ok(())
    }

    async fn delete_status(self, term: Arc<LeaderTerm>, job_id: String) {
        let Ok(job) = self.applied_job(&job_id).await else {
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
                let _ = self.propose(Command::StatusDeleted { job_id }).await;
            }
            Err(error) => tracing::warn!(%error, job = %job_id, "could not DELETE the export's status URL"),
        }
    }

    /// One job's driver: kick off (unless a status URL is committed), poll, commit files.
    async fn drive(self, term: Arc<LeaderTerm>, job_id: String, cancel: CancellationToken) {
        let outcome = self.drive_inner(&term, &job_id, &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        if let Err(CoordinatorError::Raft(error)) = &outcome {
            // Not the export's fault: leadership moved (the next leader resumes the job).
            tracing::info!(%error, "job driver stopped");
            return;
        }
        if let Err(error) = outcome {
            tracing::warn!(%error, "export failed");
            let _ = self
                .propose(Command::JobFailed {
                    job_id,
                    reason: error.to_string(),
                })
                .await;
        }
    }

    /// Marks the kick-off as sent by this node, then sends it. The request runs to its end
    /// even if leadership is lost meanwhile, and its outcome is recorded here for the next
    /// leader to ask about.
    async fn send_kickoff(
        &self,
        client: &FhirClient,
        job: &Job,
        tenant: &TenantConfig,
        cancel: &CancellationToken,
    ) -> Result<String, CoordinatorError> {
        match self
            .propose(Command::KickoffStarting {
                job_id: job.id.clone(),
                node_id: self.inner.settings.raft.node_id,
            })
            .await?
        {
            Applied::Done => {}
            Applied::Refused { reason } => return Err(CoordinatorError::Refused(reason)),
            other => return Err(CoordinatorError::Refused(format!("{other:?}"))),
        }
        self.record_kickoff(&job.id, KickoffOutcome::InProgress);
        let settings = tenant.export.clone();
        let (client, request, profile) = (client.clone(), job.request.clone(), tenant.profile);
        let node = self.clone();
        let job_id = job.id.clone();
        let sending = tokio::spawn(
            async move {
                let mut backoff = Backoff::new(
                    settings.poll.min_interval,
                    settings.poll.max_interval,
                    client.entropy().clone(),
                );
                let sent = kick_off(
                    &client,
                    &request,
                    &profile,
                    settings.kickoff_attempts.max(1),
                    &mut backoff,
                )
                .await;
                node.record_kickoff(
                    &job_id,
                    match &sent {
                        Ok(accepted) => KickoffOutcome::Accepted {
                            status_url: accepted.status_url.to_string(),
                        },
                        Err(_) => KickoffOutcome::NotAccepted,
                    },
                );
                sent
            }
            .in_current_span(),
        );
        tokio::select! {
            sent = sending => match sent {
                Ok(sent) => Ok(sent?.status_url.to_string()),
                Err(panicked) => Err(CoordinatorError::Refused(format!("the kick-off task failed: {panicked}"))),
            },
            // Leadership lost: the request finishes on its own and its outcome is recorded.
            _ = cancel.cancelled() => Err(CoordinatorError::Raft(RaftError::Stopped)),
        }
    }

    async fn drive_inner(
        &self,
        term: &LeaderTerm,
        job_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), CoordinatorError> {
        let job = self.applied_job(job_id).await?;
        let tenant = self.tenant(&job.tenant)?;
        let client = term.client(&job.tenant)?;
        let settings = &tenant.export;
        let status_url = match &job.status_url {
            Some(url) => {
                tracing::info!(status_url = %url, "resuming polling of the committed export");
                url.parse()
                    .map_err(|e| CoordinatorError::Refused(format!("committed status URL is not a URL: {e}")))?
            }
            None => {
                let adopted = match job.kickoff_by {
                    // An earlier leader (maybe this node, in an earlier term) sent the
                    // kick-off; the EHR may have accepted it without the status URL being
                    // committed.
                    Some(node) => self.kickoff_handed_over(node, job_id, cancel).await,
                    None => None,
                };
                if cancel.is_cancelled() {
                    // Leadership lost (or shutting down) while asking: not ours to kick off.
                    return Err(CoordinatorError::Raft(RaftError::Stopped));
                }
                let status_url = match adopted {
                    Some(url) => url,
                    None => self.send_kickoff(client, &job, tenant, cancel).await?,
                };
                // Committed before the first poll, so a restarted coordinator polls this
                // export instead of starting another.
                self.propose(Command::KickedOff {
                    job_id: job_id.to_string(),
                    status_url: status_url.clone(),
                })
                .await?;
                self.record_kickoff(job_id, KickoffOutcome::Unknown);
                status_url
                    .parse()
                    .map_err(|e| CoordinatorError::Refused(format!("status URL is not a URL: {e}")))?
            }
        };
        let (partial_tx, mut partial_rx) = mpsc::channel(16);
        let forward_self = self.clone();
        let forward_job = job_id.to_string();
        let forwarder = tokio::spawn(async move {
            while let Some((files, requires_access_token)) = partial_rx.recv().await {
                let _ = forward_self
                    .propose(Command::AddFiles {
                        job_id: forward_job.clone(),
                        files,
                        requires_access_token,
                    })
                    .await;
            }
        });
        let mut poller = Poller::new(settings.poll.clone(), client);
        let completed = poller
            .run(client, &status_url, cancel, |event| match event {
                PollEvent::PartialFiles {
                    files,
                    requires_access_token,
                } => {
                    // The final manifest lists these again, so a full queue loses nothing.
                    let _ = partial_tx.try_send((files, requires_access_token));
                }
                PollEvent::Progress(text) => tracing::info!(progress = %text, "export in progress"),
                PollEvent::Waiting { .. } => {}
            })
            .await;
        drop(partial_tx);
        let _ = forwarder.await;
        let completed = completed?;
        self.propose(Command::AddFiles {
            job_id: job_id.to_string(),
            files: completed.files,
            requires_access_token: completed.requires_access_token,
        })
        .await?;
        self.propose(Command::ManifestComplete {
            job_id: job_id.to_string(),
            transaction_time: completed.transaction_time,
        })
        .await?;
        Ok(())
    }
}

fn unix_ms(clock: &dyn Clock) -> u64 {
    clock
        .now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A coordinator address must be a URL a gRPC client can dial.
fn tonic_address_check(address: &str) -> Result<(), CoordinatorError> {
    match url::Url::parse(address) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err(CoordinatorError::Refused(format!(
            "coordinator address `{address}` must look like http://host:port or https://host:port"
        ))),
    }
}
