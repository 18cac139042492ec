//! The coordinator node: the raft log, each tenant's client and token manager, and the
//! leader's work — job drivers, lease expiry — driven by a self-scheduled supervisor tick
//! that reconciles what committed state asks for with what is running.

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

use crate::raft_log::{self, RaftError, RaftHandle, RaftSettings};
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
    pub raft_tick: Duration,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            data_dir: PathBuf::from("fhirhaul-data"),
            lease_duration: Duration::from_secs(30),
            max_file_attempts: 5,
            tick: Duration::from_millis(500),
            raft_tick: Duration::from_millis(100),
        }
    }
}

/// One tenant: its configuration and connected client (whose token manager workers share).
pub struct Tenant {
    pub config: TenantConfig,
    pub client: FhirClient,
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
    tenants: BTreeMap<String, Tenant>,
    settings: CoordinatorSettings,
    clock: Arc<dyn Clock>,
    /// When this node became able to expire leases: it cannot know when a lease it
    /// inherited was last renewed, so every lease gets a full period of grace from here.
    started_ms: u64,
    cancel: CancellationToken,
}

/// Handle to a running coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl Coordinator {
    /// Opens the raft log in `settings.data_dir`, connects every tenant and starts the
    /// leader's supervisor.
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
        let raft = raft_log::start(
            &settings.data_dir,
            RaftSettings {
                node_id: 1,
                tick: settings.raft_tick,
                ..RaftSettings::default()
            },
            cancel.child_token(),
        )?;
        let mut connected = BTreeMap::new();
        for config in tenants {
            let client = config.connect(
                Arc::clone(&transport),
                Arc::clone(&clock),
                entropy.clone(),
                cancel.child_token(),
            )?;
            connected.insert(config.name.clone(), Tenant { config, client });
        }
        let mut leadership = raft.leadership();
        leadership
            .wait_for(|leader| *leader)
            .await
            .map_err(|_| RaftError::Stopped)?;
        let started_ms = unix_ms(&*clock);
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                raft,
                tenants: connected,
                settings,
                clock,
                started_ms,
                cancel,
            }),
        };
        tokio::spawn(coordinator.clone().supervise());
        Ok(coordinator)
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

    fn tenant(&self, name: &str) -> Result<&Tenant, CoordinatorError> {
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
        let config = &self.tenant(tenant)?.config;
        let mut request = request.unwrap_or_else(|| config.request.clone());
        if incremental && request.since.is_none() {
            let name = tenant.to_string();
            request.since = self.read(move |state| state.tenant_since.get(&name).cloned()).await?;
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

    pub async fn job(&self, job_id: &str) -> Result<Job, CoordinatorError> {
        let id = job_id.to_string();
        self.inner
            .raft
            .read(move |state| state.jobs.get(&id).cloned())
            .await?
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))
    }

    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        Ok(self.inner.raft.read(read).await?)
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
        let deadline = tokio::time::Instant::now() + wait;
        let limits: BTreeMap<String, usize> = self
            .inner
            .tenants
            .iter()
            .map(|(name, t)| (name.clone(), t.config.export.concurrency.max(1)))
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
            }
        }
    }

    async fn leased_file(&self, grant: LeaseGrant) -> Result<LeasedFile, CoordinatorError> {
        let job = self.job(&grant.job_id).await?;
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
            fhir_base_url: tenant.config.base_url.to_string(),
            token_allow_list: tenant.config.token_allow_list.iter().map(|u| u.to_string()).collect(),
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
        let tokens = self.tenant(tenant)?.client.tokens();
        Ok(match refused {
            Some(generation) => tokens.token_refused(generation).await?,
            None => tokens.token().await?,
        })
    }

    /// The leader's reconciliation loop.
    async fn supervise(self) {
        let mut drivers: BTreeMap<String, CancellationToken> = BTreeMap::new();
        let mut deleting: BTreeSet<String> = BTreeSet::new();
        let mut ticker = tokio::time::interval(self.inner.settings.tick);
        loop {
            tokio::select! {
                biased;
                _ = self.inner.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.reconcile(&mut drivers, &mut deleting).await {
                tracing::warn!(%error, "coordinator reconciliation failed; retrying next tick");
            }
        }
        for driver in drivers.values() {
            driver.cancel();
        }
    }

    async fn reconcile(
        &self,
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
            .filter(|(_, t)| t.config.export.delete_when_done)
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
                        let token = self.inner.cancel.child_token();
                        drivers.insert(job_id.clone(), token.clone());
                        let span = tracing::info_span!("job", job = %job_id);
                        tokio::spawn(self.clone().drive(job_id.clone(), token).instrument(span));
                    }
                }
                JobPhase::Cancelled => {
                    if let Some(token) = drivers.remove(&job_id) {
                        token.cancel();
                    }
                    if has_status_url && !status_deleted && deleting.insert(job_id.clone()) {
                        tokio::spawn(self.clone().delete_status(job_id));
                    }
                }
                JobPhase::Completed => {
                    drivers.remove(&job_id);
                    let wanted = self
                        .inner
                        .tenants
                        .get(&tenant)
                        .map(|t| t.config.export.delete_when_done);
                    if wanted == Some(true) && has_status_url && !status_deleted && deleting.insert(job_id.clone()) {
                        tokio::spawn(self.clone().delete_status(job_id));
                    }
                }
                JobPhase::Downloading | JobPhase::Failed => {
                    drivers.remove(&job_id);
                }
            }
        }
        // Lease expiry, with a full lease period of grace after this node took over.
        let lease_ms = self.inner.settings.lease_duration.as_millis() as u64;
        if now >= self.inner.started_ms + lease_ms {
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

    async fn delete_status(self, job_id: String) {
        let Ok(job) = self.job(&job_id).await else { return };
        let (Some(status_url), Some(tenant)) = (
            job.status_url.as_ref().and_then(|u| u.parse().ok()),
            self.inner.tenants.get(&job.tenant),
        ) else {
            return;
        };
        match delete_export(&tenant.client, &status_url).await {
            Ok(()) => {
                let _ = self.propose(Command::StatusDeleted { job_id }).await;
            }
            Err(error) => tracing::warn!(%error, job = %job_id, "could not DELETE the export's status URL"),
        }
    }

    /// One job's driver: kick off (unless a status URL is committed), poll, commit files.
    async fn drive(self, job_id: String, cancel: CancellationToken) {
        let outcome = self.drive_inner(&job_id, &cancel).await;
        if cancel.is_cancelled() {
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

    async fn drive_inner(&self, job_id: &str, cancel: &CancellationToken) -> Result<(), CoordinatorError> {
        let job = self.job(job_id).await?;
        let tenant = self.tenant(&job.tenant)?;
        let client = &tenant.client;
        let settings = &tenant.config.export;
        let status_url = match &job.status_url {
            Some(url) => {
                tracing::info!(status_url = %url, "resuming polling of the committed export");
                url.parse()
                    .map_err(|e| CoordinatorError::Refused(format!("committed status URL is not a URL: {e}")))?
            }
            None => {
                let mut backoff = Backoff::new(
                    settings.poll.min_interval,
                    settings.poll.max_interval,
                    client.entropy().clone(),
                );
                let accepted = kick_off(
                    client,
                    &job.request,
                    &tenant.config.profile,
                    settings.kickoff_attempts.max(1),
                    &mut backoff,
                )
                .await?;
                // Committed before the first poll, so a restarted coordinator polls this
                // export instead of starting another.
                self.propose(Command::KickedOff {
                    job_id: job_id.to_string(),
                    status_url: accepted.status_url.to_string(),
                })
                .await?;
                accepted.status_url
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
