//! The leader's work, which exists only while this node leads. [`supervise`] waits for
//! leadership, makes sure everything earlier leaders committed is applied here (a
//! read-index barrier), and starts a [`LeaderTerm`]: each tenant's client and token
//! manager, the [`leases::LeaseManager`] actor, and a loop that asks the pure
//! [`planner::plan`] what to do on a self-scheduled tick and does it (job drivers,
//! DELETEs, lease expiry). Every task it starts runs under the node's tracker; the moment
//! leadership is lost the term's token is cancelled and all of it stops.

pub mod driver;
pub mod leases;
pub mod links;
pub mod pacing;
pub mod planner;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fhirhaul_common::client::FhirClient;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::driver::{JobDriver, delete_status};
use self::leases::{LeaseContext, LeaseManager};
use self::planner::{Action, PlanSettings, Running, plan};
use crate::error::CoordinatorError;
use crate::node::Coordinator;
use crate::state::Command;

/// The leader's work for one term: each tenant's connected client (whose token manager
/// workers share), the lease manager, and the cancellation that ends all of it when
/// leadership is lost.
pub struct LeaderTerm {
    pub term: u64,
    /// When this node took over: it cannot know when an inherited lease was last renewed,
    /// so every lease gets a full period of grace from here.
    pub since_ms: u64,
    clients: BTreeMap<String, FhirClient>,
    /// Tenants that could not be connected this term (an unreadable key, say), with why:
    /// their jobs fail with that reason while every other tenant's go on.
    unavailable: BTreeMap<String, fhirhaul_common::Error>,
    leases: LeaseManager,
    /// Each tenant's adaptive download concurrency, for this term.
    pacing: Arc<pacing::Pacing>,
    /// One link renewal at a time per job (see `links::renew_link`).
    link_renewals: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Plans at once instead of at the next tick (a job was submitted or cancelled).
    wake: tokio::sync::Notify,
    cancel: CancellationToken,
}

impl LeaderTerm {
    pub fn client(&self, tenant: &str) -> Result<&FhirClient, CoordinatorError> {
        if let Some(error) = self.unavailable.get(tenant) {
            return Err(CoordinatorError::Client(error.clone()));
        }
        self.clients
            .get(tenant)
            .ok_or_else(|| CoordinatorError::UnknownTenant(tenant.to_string()))
    }

    pub fn leases(&self) -> &LeaseManager {
        &self.leases
    }

    pub fn pacing(&self) -> &pacing::Pacing {
        &self.pacing
    }

    /// The lock that makes a job's link renewals one at a time: workers whose links
    /// expired together wait for the first renewal and find their fresh link in it,
    /// instead of each asking the EHR for the whole manifest again.
    pub fn link_renewal(&self, job_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.link_renewals.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(job_id.to_string()).or_default())
    }

    /// Whether this term has ended (leadership lost, or the node is stopping).
    pub fn is_over(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Asks the term to plan now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Waits for leadership, leads until it is lost, and again, until the node stops.
pub(crate) async fn supervise(coordinator: Coordinator) {
    let stop = coordinator.stopping().clone();
    let mut leadership = coordinator.raft().leadership();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            led = leadership.wait_for(|leader| *leader) => if led.is_err() { break },
        }
        let cancel = stop.child_token();
        let term = coordinator.raft().term();
        let span = tracing::info_span!("leader", term);
        let outcome = lead(&coordinator, cancel.clone(), &mut leadership)
            .instrument(span)
            .await;
        cancel.cancel();
        coordinator.set_leader_term(None);
        if let Err(error) = outcome {
            tracing::warn!(%error, term, "leader work stopped; trying again");
            // Still leader but unable to lead (a tenant's key became unreadable, say):
            // do not spin.
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(coordinator.settings().tick) => {}
            }
        }
    }
}

/// One term of leadership.
async fn lead(
    coordinator: &Coordinator,
    cancel: CancellationToken,
    leadership: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    // Before deciding anything, everything earlier leaders committed is applied here
    // (the read-index barrier waits for this term's first entry to commit): a job
    // kicked off under the old leader is seen with its status URL and never re-kicked.
    coordinator.read_linearizable(|_| ()).await?;
    let mut clients = BTreeMap::new();
    let mut unavailable = BTreeMap::new();
    for (name, config) in coordinator.tenants().iter() {
        // One tenant's broken key must not stop every tenant's exports.
        match coordinator.connect_tenant(config, cancel.child_token()) {
            Ok(client) => {
                clients.insert(name.clone(), client);
            }
            Err(error) => {
                tracing::error!(tenant = %name, %error, "tenant cannot be used this term; its jobs fail with this reason");
                unavailable.insert(name.clone(), error);
            }
        }
    }
    let pacing = Arc::new(pacing::Pacing::for_tenants(coordinator.tenants(), coordinator.now_ms()));
    let leases = LeaseManager::start(
        LeaseContext {
            raft: coordinator.raft().clone(),
            pacing: Arc::clone(&pacing),
            tenants: Arc::clone(coordinator.tenants()),
            lease_duration: coordinator.settings().lease_duration,
            clock: coordinator.clock(),
        },
        coordinator.tracker(),
        cancel.child_token(),
    );
    let term = Arc::new(LeaderTerm {
        term: coordinator.raft().term(),
        since_ms: coordinator.now_ms(),
        clients,
        unavailable,
        leases,
        pacing,
        link_renewals: Default::default(),
        wake: tokio::sync::Notify::new(),
        cancel: cancel.clone(),
    });
    coordinator.set_leader_term(Some(Arc::clone(&term)));
    tracing::info!(term = term.term, "leading: job drivers, leases and tokens run here");
    record_address(coordinator).await;
    let plan_settings = PlanSettings {
        lease_ms: coordinator.settings().lease_duration.as_millis() as u64,
        term_since_ms: term.since_ms,
        // Workers heartbeat every third of a lease period (see `grpc::worker`).
        report_grace_ms: (coordinator.settings().lease_duration / 3).as_millis() as u64,
        archive_after_ms: coordinator.settings().archive_after.as_millis() as u64,
    };
    let mut work = TermWork {
        coordinator,
        term: &term,
        drivers: BTreeMap::new(),
        deleting: BTreeSet::new(),
    };
    let mut ticker = tokio::time::interval(coordinator.settings().tick);
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
            _ = term.wake.notified() => {}
        }
        match work.step(&plan_settings).await {
            Ok(()) => {}
            Err(error) if error.is_leadership_lost() => break Ok(()),
            Err(error) => tracing::warn!(%error, "leader step failed; retrying next tick"),
        }
    };
    for driver in work.drivers.values() {
        driver.cancel();
    }
    outcome
}

/// What one term runs, and carrying out the planner's actions.
struct TermWork<'a> {
    coordinator: &'a Coordinator,
    term: &'a Arc<LeaderTerm>,
    drivers: BTreeMap<String, CancellationToken>,
    deleting: BTreeSet<String>,
}

impl TermWork<'_> {
    async fn step(&mut self, settings: &PlanSettings) -> Result<(), CoordinatorError> {
        let running = Running {
            drivers: self.drivers.keys().cloned().collect(),
            deleting: self.deleting.clone(),
        };
        let now_ms = self.coordinator.now_ms();
        let settings = settings.clone();
        let actions = self
            .coordinator
            .read(move |state| plan(state, &running, now_ms, &settings))
            .await?;
        for action in actions {
            self.carry_out(action).await?;
        }
        self.pace(now_ms).await
    }

    /// Ticks each tenant's pacer with what it downloaded so far and whether its leases are
    /// at the limit (see `pacing`).
    async fn pace(&self, now_ms: u64) -> Result<(), CoordinatorError> {
        let limits = self.term.pacing.limits();
        let observed = self
            .coordinator
            .read(move |state| {
                let mut observed: BTreeMap<String, (u64, usize)> = BTreeMap::new();
                for job in state.jobs.values() {
                    observed.entry(job.tenant.clone()).or_default().0 += job.bytes_done();
                }
                for at in state.leases.values() {
                    if let Some(job) = state.jobs.get(&at.job_id) {
                        observed.entry(job.tenant.clone()).or_default().1 += 1;
                    }
                }
                observed
                    .into_iter()
                    .map(|(tenant, (bytes, leased))| {
                        let saturated = leased >= limits.get(&tenant).copied().unwrap_or(1);
                        (tenant, (bytes, saturated))
                    })
                    .collect()
            })
            .await?;
        for (tenant, change) in self.term.pacing.tick(now_ms, &observed) {
            match change {
                pacing::Change::Grew { to } => {
                    tracing::info!(%tenant, concurrency = to, "the EHR keeps up: one more file at once")
                }
                pacing::Change::BackedOff { to } => {
                    tracing::warn!(%tenant, concurrency = to, "the EHR is throttling (429/503): fewer files at once")
                }
            }
        }
        Ok(())
    }

    async fn carry_out(&mut self, action: Action) -> Result<(), CoordinatorError> {
        match action {
            Action::StartDriver { job_id } => {
                let cancel = self.term.cancel.child_token();
                self.drivers.insert(job_id.clone(), cancel.clone());
                let span = tracing::info_span!("job", job = %job_id);
                let driver = JobDriver {
                    coordinator: self.coordinator.clone(),
                    term: Arc::clone(self.term),
                    job_id,
                    cancel,
                };
                self.coordinator.tracker().spawn(driver.run().instrument(span));
            }
            Action::StopDriver { job_id } => {
                if let Some(cancel) = self.drivers.remove(&job_id) {
                    cancel.cancel();
                }
            }
            Action::DeleteStatus { job_id } => {
                self.deleting.insert(job_id.clone());
                let span = tracing::info_span!("job", job = %job_id);
                self.coordinator
                    .tracker()
                    .spawn(delete_status(self.coordinator.clone(), Arc::clone(self.term), job_id).instrument(span));
            }
            Action::ExpireLease { lease_id, generation } => {
                tracing::info!(lease = lease_id, "lease expired; the file goes back to pending");
                self.coordinator
                    .propose(Command::ExpireLease { lease_id, generation })
                    .await?;
            }
            Action::ArchiveJob { job_id } => {
                tracing::info!(job = %job_id, "archiving a finished job; its summary stays in the state");
                let at_ms = self.coordinator.now_ms();
                self.coordinator.propose(Command::ArchiveJob { job_id, at_ms }).await?;
            }
            Action::ForgetAbsentWorkers { stale_before_ms } => {
                self.coordinator
                    .propose(Command::ForgetAbsentWorkers { stale_before_ms })
                    .await?;
            }
        }
        Ok(())
    }
}

/// Puts this node's own address (as its configuration gives it) into the log, so
/// followers can name it to clients and coordinators that join later can reach it.
async fn record_address(coordinator: &Coordinator) {
    let me = coordinator.node_id();
    let Some(address) = coordinator.settings().raft.peers.get(&me).cloned() else {
        return;
    };
    let recorded = coordinator
        .read(move |state| state.coordinators.get(&me).cloned())
        .await;
    if matches!(recorded, Ok(Some(ref known)) if *known == address) {
        return;
    }
    if let Err(error) = coordinator
        .propose(Command::SetCoordinatorAddress { node_id: me, address })
        .await
    {
        tracing::debug!(%error, "could not record this coordinator's address");
    }
}
