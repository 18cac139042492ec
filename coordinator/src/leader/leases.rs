//! The lease manager: one actor per term of leadership that queues workers waiting in
//! `AcquireLease` and hands them files. It alone decides grants, so waiting workers never
//! race each other with proposals for the same file (and the log holds no refused grants):
//! on each commit, while anyone waits, it asks state for one distinct file per waiting
//! worker in arrival order ([`State::next_files_for`]), proposes those grants, and answers
//! each waiter. A grant whose waiter has gone (its call timed out or was cancelled) is
//! returned to pending at once ([`Command::ReturnLease`]) instead of waiting out a lease
//! period. Waiters whose wait ends empty-handed get `None` on time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::clock::Clock;
use fhirhaul_common::config::TenantConfig;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::CoordinatorError;
use crate::raft_node::{RaftError, RaftHandle};
use crate::state::{Applied, Command, FileRecord, LeaseGrant, LeaseRequest, Refusal, State};

/// What a worker needs to download a leased file.
#[derive(Debug, Clone)]
pub struct LeasedFile {
    pub grant: LeaseGrant,
    pub tenant: String,
    pub export_id: String,
    pub file: FileRecord,
    pub requires_access_token: bool,
    /// When the file's link may stop working (the manifest's `Expires`, unix ms).
    pub links_expire_ms: Option<u64>,
    pub fhir_base_url: String,
    pub token_allow_list: Vec<String>,
}

type Reply = oneshot::Sender<Result<Option<LeasedFile>, CoordinatorError>>;

struct Waiter {
    worker_id: String,
    deadline: Instant,
    reply: Reply,
}

/// Handle to the term's lease manager. Cheap to clone.
#[derive(Clone)]
pub struct LeaseManager {
    sender: mpsc::Sender<Waiter>,
}

/// What the lease manager needs from its node.
pub struct LeaseContext {
    pub raft: RaftHandle,
    /// Each tenant's current download concurrency.
    pub pacing: Arc<super::pacing::Pacing>,
    pub tenants: Arc<BTreeMap<String, TenantConfig>>,
    pub lease_duration: Duration,
    pub clock: Arc<dyn Clock>,
}

impl LeaseManager {
    /// Starts the actor; it ends with `cancel` (the term's), answering every waiter with
    /// the leader's address.
    pub fn start(context: LeaseContext, tracker: &tokio_util::task::TaskTracker, cancel: CancellationToken) -> Self {
        let (sender, receiver) = mpsc::channel(1024);
        let actor = Actor {
            context,
            waiting: VecDeque::new(),
        };
        tracker.spawn(actor.run(receiver, cancel));
        LeaseManager { sender }
    }

    /// Waits up to `wait` for a file for `worker_id`.
    pub async fn acquire(&self, worker_id: &str, wait: Duration) -> Result<Option<LeasedFile>, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            worker_id: worker_id.to_string(),
            deadline: Instant::now() + wait,
            reply,
        };
        self.sender
            .send(waiter)
            .await
            .map_err(|_| CoordinatorError::Raft(RaftError::Stopped))?;
        answer.await.map_err(|_| CoordinatorError::Raft(RaftError::Stopped))?
    }
}

struct Actor {
    context: LeaseContext,
    waiting: VecDeque<Waiter>,
}

impl Actor {
    async fn run(mut self, mut receiver: mpsc::Receiver<Waiter>, cancel: CancellationToken) {
        let mut applied = self.context.raft.applied();
        loop {
            // Every waiter that has arrived joins this round: one entry grants them all,
            // instead of one commit per waiter while the rest queue behind it.
            while let Ok(waiter) = receiver.try_recv() {
                self.waiting.push_back(waiter);
            }
            self.let_go_of_finished_waits();
            if !self.waiting.is_empty() {
                self.grant_what_we_can().await;
                self.let_go_of_finished_waits();
            }
            let next_deadline = self.waiting.iter().map(|w| w.deadline).min();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                waiter = receiver.recv() => match waiter {
                    Some(waiter) => self.waiting.push_back(waiter),
                    None => break,
                },
                changed = applied.changed(), if !self.waiting.is_empty() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {}
            }
        }
        let not_leader = self.context.raft.not_leader();
        receiver.close();
        while let Ok(waiter) = receiver.try_recv() {
            self.waiting.push_back(waiter);
        }
        for waiter in self.waiting.drain(..) {
            let _ = waiter.reply.send(Err(CoordinatorError::Raft(not_leader.clone())));
        }
    }

    /// Answers `None` to waits that ran out and forgets callers that left.
    fn let_go_of_finished_waits(&mut self) {
        let now = Instant::now();
        let mut still = VecDeque::with_capacity(self.waiting.len());
        for waiter in self.waiting.drain(..) {
            if waiter.reply.is_closed() {
                continue;
            }
            if waiter.deadline <= now {
                let _ = waiter.reply.send(Ok(None));
                continue;
            }
            still.push_back(waiter);
        }
        self.waiting = still;
    }

    /// Each tenant's current download concurrency (adaptive; see `pacing`).
    fn limits(&self) -> BTreeMap<String, usize> {
        self.context.pacing.limits()
    }

    /// One round: a distinct file for as many waiters as state allows, all granted in one
    /// raft entry (one commit and one disk sync however many workers wait).
    async fn grant_what_we_can(&mut self) {
        let workers: Vec<String> = self.waiting.iter().map(|w| w.worker_id.clone()).collect();
        let limits = self.limits();
        let picked = self
            .context
            .raft
            .read(move |state| picks(state, &workers, &limits))
            .await;
        let picks = match picked {
            Ok(picks) => picks,
            Err(error) => {
                tracing::debug!(%error, "cannot read state for lease grants");
                return;
            }
        };
        let mut unserved = VecDeque::with_capacity(self.waiting.len());
        let mut chosen = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for (waiter, pick) in waiting.into_iter().zip(picks) {
            match pick {
                Pick::Nothing => unserved.push_back(waiter),
                Pick::UnknownWorker => {
                    let _ = waiter
                        .reply
                        .send(Err(Refusal::UnknownWorker(waiter.worker_id.clone()).into()));
                }
                // A caller that left gets nothing granted.
                Pick::File(_) if waiter.reply.is_closed() => {}
                Pick::File(candidate) => chosen.push((waiter, *candidate)),
            }
        }
        unserved.extend(self.grant(chosen).await);
        self.waiting = unserved;
    }

    /// Proposes the grants in one entry and answers each waiter; returns the waiters that
    /// should wait on (state moved between the read and the commit).
    async fn grant(&self, chosen: Vec<(Waiter, Candidate)>) -> Vec<Waiter> {
        if chosen.is_empty() {
            return Vec::new();
        }
        let granted_at_ms = self.context.clock.now_unix_ms();
        let expires_at_ms = granted_at_ms + self.context.lease_duration.as_millis() as u64;
        let grants = chosen
            .iter()
            .map(|(waiter, candidate)| LeaseRequest {
                job_id: candidate.job_id.clone(),
                file: candidate.file,
                worker_id: waiter.worker_id.clone(),
                expires_at_ms,
                granted_at_ms,
            })
            .collect();
        let outcomes = match self.context.raft.propose(Command::GrantLeases { grants }).await {
            Ok(Applied::Each(outcomes)) if outcomes.len() == chosen.len() => outcomes,
            Ok(other) => {
                tracing::warn!(?other, "a batch of grants applied unexpectedly; the waiters wait on");
                return chosen.into_iter().map(|(waiter, _)| waiter).collect();
            }
            Err(error) => {
                for (waiter, _) in chosen {
                    let _ = waiter.reply.send(Err(CoordinatorError::Raft(error.clone())));
                }
                return Vec::new();
            }
        };
        let mut wait_on = Vec::new();
        for ((waiter, candidate), outcome) in chosen.into_iter().zip(outcomes) {
            match outcome {
                Applied::LeaseGranted(grant) => self.answer(waiter, candidate, grant).await,
                // State moved between the read and the commit (a cancel, say): try again.
                _ => wait_on.push(waiter),
            }
        }
        wait_on
    }

    /// Sends a committed grant to its waiter; a waiter that left has it returned at once.
    async fn answer(&self, waiter: Waiter, candidate: Candidate, grant: LeaseGrant) {
        let tenant = self.context.tenants.get(&candidate.tenant);
        let leased = LeasedFile {
            grant: grant.clone(),
            tenant: candidate.tenant,
            export_id: candidate.export_id,
            file: candidate.record,
            requires_access_token: candidate.requires_access_token,
            links_expire_ms: candidate.links_expire_ms,
            fhir_base_url: tenant.map(|t| t.base_url.to_string()).unwrap_or_default(),
            token_allow_list: tenant
                .map(|t| t.token_allow_list.iter().map(|u| u.to_string()).collect())
                .unwrap_or_default(),
        };
        if waiter.reply.send(Ok(Some(leased))).is_err() {
            tracing::info!(lease = grant.lease_id, worker = %waiter.worker_id, "the worker stopped waiting; returning its grant");
            let returned = self
                .context
                .raft
                .propose(Command::ReturnLease {
                    lease_id: grant.lease_id,
                    generation: grant.generation,
                })
                .await;
            if let Err(error) = returned {
                tracing::warn!(%error, lease = grant.lease_id, "could not return an undelivered grant; it will expire");
            }
        }
    }
}

/// A file chosen for a waiter, with what its answer needs.
#[derive(Debug)]
struct Candidate {
    job_id: String,
    file: u32,
    tenant: String,
    export_id: String,
    record: FileRecord,
    requires_access_token: bool,
    links_expire_ms: Option<u64>,
}

#[derive(Debug)]
enum Pick {
    Nothing,
    UnknownWorker,
    File(Box<Candidate>),
}

/// What each waiting worker gets from `state`, in order.
fn picks(state: &State, workers: &[String], limits: &BTreeMap<String, usize>) -> Vec<Pick> {
    let known: Vec<&str> = workers
        .iter()
        .filter(|w| state.workers.contains_key(w.as_str()))
        .map(String::as_str)
        .collect();
    let mut chosen = state
        .next_files_for(&known, |tenant| limits.get(tenant).copied().unwrap_or(1))
        .into_iter();
    workers
        .iter()
        .map(|worker| {
            if !state.workers.contains_key(worker.as_str()) {
                return Pick::UnknownWorker;
            }
            let Some((job_id, file)) = chosen.next().flatten() else {
                return Pick::Nothing;
            };
            let job = &state.jobs[&job_id];
            Pick::File(Box::new(Candidate {
                record: job.files[file as usize].clone(),
                tenant: job.tenant.clone(),
                export_id: job.export_id.clone(),
                requires_access_token: job.requires_access_token,
                links_expire_ms: job.links_expire_ms,
                job_id,
                file,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fhirhaul_common::manifest::{FileKind, ManifestFile};

    use super::*;

    #[tokio::test]
    async fn waiters_that_arrive_together_are_granted_in_one_entry() {
        use crate::raft_node::RaftSettings;
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let raft = crate::raft_node::start(
            dir.path(),
            RaftSettings {
                node_id: 1,
                tick: Duration::from_millis(10),
                ..RaftSettings::default()
            },
            fhirhaul_common::offload::Offload::Threads,
            crate::peers::Peers::new(1, Default::default(), None, cancel.clone()),
            cancel.clone(),
        )
        .unwrap();
        let mut role = raft.leadership();
        tokio::time::timeout(Duration::from_secs(5), role.wait_for(|leader| *leader))
            .await
            .unwrap()
            .unwrap();
        let workers: Vec<String> = (0..8).map(|n| format!("w{n}")).collect();
        let names: Vec<&str> = workers.iter().map(String::as_str).collect();
        for command in setup(8, &names) {
            raft.propose(command).await.unwrap();
        }
        let mut tenant = TenantConfig::new(
            "t",
            "https://ehr.example/fhir".parse().unwrap(),
            "client",
            dir.path().join("unused.pem"),
        );
        tenant.export.concurrency = 8;
        let tenants: Arc<BTreeMap<String, TenantConfig>> = Arc::new([("t".to_string(), tenant)].into_iter().collect());
        let tracker = tokio_util::task::TaskTracker::new();
        let leases = LeaseManager::start(
            LeaseContext {
                raft: raft.clone(),
                pacing: Arc::new(super::super::pacing::Pacing::for_tenants(&tenants, 0)),
                tenants,
                lease_duration: Duration::from_secs(30),
                clock: Arc::new(fhirhaul_common::clock::SystemClock),
            },
            &tracker,
            cancel.child_token(),
        );
        let before = *raft.applied().borrow();
        let acquires: Vec<_> = (0..8)
            .map(|n| {
                let leases = leases.clone();
                tokio::spawn(async move { leases.acquire(&format!("w{n}"), Duration::from_secs(5)).await })
            })
            .collect();
        for acquire in acquires {
            assert!(acquire.await.unwrap().unwrap().is_some(), "every waiter got a file");
        }
        let entries = *raft.applied().borrow() - before;
        assert!(entries <= 2, "8 waiters granted in {entries} raft entries");
        cancel.cancel();
    }

    /// The commands that make a kicked-off `job-1` of tenant `t` with `files` files and
    /// registered `workers`.
    fn setup(files: u32, workers: &[&str]) -> Vec<Command> {
        let mut commands = vec![
            Command::test_submission(),
            Command::KickedOff {
                job_id: "job-1".into(),
                status_url: "https://ehr.example/status/1".into(),
            },
            Command::AddFiles {
                job_id: "job-1".into(),
                files: (0..files)
                    .map(|n| ManifestFile {
                        kind: FileKind::Output,
                        resource_type: Some("Patient".into()),
                        url: format!("https://ehr.example/files/{n}").parse().unwrap(),
                        count: None,
                    })
                    .collect(),
                requires_access_token: false,
            },
        ];
        commands.extend(workers.iter().map(|worker| Command::RegisterWorker {
            worker_id: worker.to_string(),
            concurrency: 4,
            at_ms: 0,
        }));
        commands
    }

    fn state_with(files: u32, workers: &[&str]) -> State {
        let mut state = State::default();
        for command in setup(files, workers) {
            state.apply(command);
        }
        state
    }

    fn files_of(picks: &[Pick]) -> Vec<Option<u32>> {
        picks
            .iter()
            .map(|p| match p {
                Pick::File(c) => Some(c.file),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_waiter_gets_its_own_file_in_arrival_order() {
        let state = state_with(2, &["w1", "w2", "w3"]);
        let waiting: Vec<String> = ["w2", "w1", "w3"].map(String::from).to_vec();
        let limits = BTreeMap::from([("t".to_string(), 10)]);
        let picks = picks(&state, &waiting, &limits);
        assert_eq!(files_of(&picks), [Some(0), Some(1), None]);
        let Pick::File(first) = &picks[0] else { panic!() };
        assert_eq!(first.tenant, "t");
        assert_eq!(first.record.url, "https://ehr.example/files/0");
        assert!(!first.requires_access_token);
    }

    #[test]
    fn an_unknown_worker_is_told_so_and_takes_nothing() {
        let state = state_with(2, &["w1"]);
        let waiting: Vec<String> = ["ghost", "w1"].map(String::from).to_vec();
        let picks = picks(&state, &waiting, &BTreeMap::from([("t".to_string(), 10)]));
        assert!(matches!(picks[0], Pick::UnknownWorker));
        assert_eq!(
            files_of(&picks),
            [None, Some(0)],
            "the ghost's turn does not use up a file"
        );
    }

    #[test]
    fn the_tenant_limit_holds_across_one_round() {
        let state = state_with(5, &["w1", "w2", "w3"]);
        let waiting: Vec<String> = ["w1", "w2", "w3"].map(String::from).to_vec();
        let picks = picks(&state, &waiting, &BTreeMap::from([("t".to_string(), 2)]));
        assert_eq!(files_of(&picks), [Some(0), Some(1), None]);
    }
}
