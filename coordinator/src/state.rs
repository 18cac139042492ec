//! The replicated state machine: tenants' incremental cursors, export jobs, their files,
//! file leases and workers. It changes only by [`State::apply`]ing committed [`Command`]s,
//! a pure function over ordered maps: the same log gives the same state on every node.
//! Times and ids inside commands come from the proposer, never from the applier's clock.

use std::collections::BTreeMap;

use fhirhaul_common::download::Checkpoint;
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_common::manifest::{FileKind, ManifestFile};
use serde::{Deserialize, Serialize};

/// A change to replicated state. Proposed by the leader, applied by every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A worker joined (or re-joined after a restart: its old leases go back to pending,
    /// marked as preferring it so it can resume its own partial files).
    RegisterWorker {
        worker_id: String,
        concurrency: u32,
        at_ms: u64,
    },
    /// A worker is alive.
    Heartbeat {
        worker_id: String,
        at_ms: u64,
    },
    /// A new export job; nothing has been sent to the EHR yet.
    SubmitJob {
        tenant: String,
        request: ExportRequest,
        max_file_attempts: u32,
        at_ms: u64,
    },
    /// The leader `node_id` is about to send the job's kick-off. A later leader that finds
    /// this and no status URL asks that node what came of it before kicking off itself.
    KickoffStarting {
        job_id: String,
        node_id: u64,
    },
    /// The EHR accepted the kick-off: from now on the job is polled, never kicked off again.
    KickedOff {
        job_id: String,
        status_url: String,
    },
    /// Files from a (partial or final) manifest page. Already-known URLs are ignored.
    AddFiles {
        job_id: String,
        files: Vec<ManifestFile>,
        requires_access_token: bool,
    },
    /// The final manifest (every page) has been added.
    ManifestComplete {
        job_id: String,
        transaction_time: String,
    },
    /// Kick-off or polling failed for good.
    JobFailed {
        job_id: String,
        reason: String,
    },
    CancelJob {
        job_id: String,
    },
    /// Give a pending file to a worker.
    GrantLease {
        job_id: String,
        file: u32,
        worker_id: String,
        expires_at_ms: u64,
    },
    RenewLease {
        lease_id: u64,
        generation: u64,
        progress: Checkpoint,
        expires_at_ms: u64,
    },
    CompleteLease {
        lease_id: u64,
        generation: u64,
        bytes: u64,
        resources: u64,
        sha256: String,
        location: String,
        issues: Vec<String>,
    },
    FailLease {
        lease_id: u64,
        generation: u64,
        category: String,
        reason: String,
        retryable: bool,
        /// Given back unfinished (worker shutting down): not counted as an attempt.
        released: bool,
    },
    /// The lease ran out without renewal: the file goes back to pending.
    ExpireLease {
        lease_id: u64,
        generation: u64,
    },
    /// The EHR's status URL was DELETEd after completion.
    StatusDeleted {
        job_id: String,
    },
    /// Files waiting for a worker not seen since this time may go to anyone.
    ForgetAbsentWorkers {
        stale_before_ms: u64,
    },
    /// Records where a coordinator listens, so the address book is in the log (and in
    /// snapshots) and not only in each node's configuration.
    SetCoordinatorAddress {
        node_id: u64,
        address: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    Submitted,
    Polling,
    Downloading,
    Completed,
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_final(self) -> bool {
        matches!(self, JobPhase::Completed | JobPhase::Failed | JobPhase::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilePhase {
    Pending,
    Leased {
        lease_id: u64,
        worker_id: String,
        expires_at_ms: u64,
    },
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub url: String,
    pub kind: FileKind,
    pub resource_type: Option<String>,
    pub count: Option<u64>,
    /// Where the file goes under the output root: `<job>/<Type>.<n>.ndjson`, `…/deleted/…`.
    pub relative_path: String,
    pub phase: FilePhase,
    /// Bumped on every grant; a lease call must carry the current one (fencing).
    pub generation: u64,
    pub attempts: u32,
    pub progress: Checkpoint,
    pub sha256: Option<String>,
    pub location: Option<String>,
    pub failure: Option<(String, String)>,
    pub issues: Vec<String>,
    /// The worker that last held it, while its partial download may still be on that
    /// worker's disk.
    pub preferred_worker: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub request: ExportRequest,
    pub max_file_attempts: u32,
    pub submitted_ms: u64,
    pub phase: JobPhase,
    pub status_url: Option<String>,
    /// The coordinator that last started the kick-off, while no status URL is committed.
    #[serde(default)]
    pub kickoff_by: Option<u64>,
    pub requires_access_token: bool,
    pub manifest_complete: bool,
    pub transaction_time: Option<String>,
    pub error: Option<String>,
    pub status_deleted: bool,
    pub files: Vec<FileRecord>,
    names: BTreeMap<String, u32>,
}

impl Job {
    pub fn files_done(&self) -> usize {
        self.files.iter().filter(|f| f.phase == FilePhase::Done).count()
    }

    pub fn files_failed(&self) -> usize {
        self.files.iter().filter(|f| f.phase == FilePhase::Failed).count()
    }

    pub fn bytes_done(&self) -> u64 {
        self.files.iter().map(|f| f.progress.offset).sum()
    }

    fn relative_path(&mut self, file: &ManifestFile) -> String {
        let kind = file.resource_type.clone().unwrap_or_else(|| "Organized".into());
        let folder = match file.kind {
            FileKind::Output => "",
            FileKind::Deleted => "deleted/",
            FileKind::Error => "error/",
        };
        let counter = self.names.entry(format!("{folder}{kind}")).or_default();
        *counter += 1;
        format!("{}/{folder}{kind}.{counter}.ndjson", self.id)
    }

    fn settle(&mut self) {
        if self.phase.is_final() || !self.manifest_complete {
            return;
        }
        if self
            .files
            .iter()
            .all(|f| matches!(f.phase, FilePhase::Done | FilePhase::Failed))
        {
            self.phase = JobPhase::Completed;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub concurrency: u32,
    pub last_seen_ms: u64,
}

/// A lease as handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease_id: u64,
    pub generation: u64,
    pub job_id: String,
    pub file: u32,
    pub expires_at_ms: u64,
}

/// What applying a command produced, for the proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    Done,
    JobSubmitted {
        job_id: String,
    },
    LeaseGranted(LeaseGrant),
    /// The command was valid when proposed but not when applied (a stale lease, a job
    /// already finished); state is unchanged.
    Refused {
        reason: String,
    },
}

/// Where a lease lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseIndex {
    pub job_id: String,
    pub file: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub jobs: BTreeMap<String, Job>,
    pub workers: BTreeMap<String, WorkerRecord>,
    pub leases: BTreeMap<u64, LeaseIndex>,
    /// Each tenant's last `transactionTime`: the `_since` of its next incremental export.
    pub tenant_since: BTreeMap<String, String>,
    /// Each coordinator's gRPC address, by raft node id (from membership changes and
    /// [`Command::SetCoordinatorAddress`]).
    #[serde(default)]
    pub coordinators: BTreeMap<u64, String>,
    next_job: u64,
    next_lease: u64,
}

fn refused(reason: impl Into<String>) -> Applied {
    Applied::Refused { reason: reason.into() }
}

impl State {
    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Applied {
        match command {
            Command::RegisterWorker {
                worker_id,
                concurrency,
                at_ms,
            } => {
                // A re-registration means the worker restarted: whatever it held is not being
                // worked on any more. Give it back, preferring this worker for a resume.
                let held: Vec<u64> = self
                    .leases
                    .iter()
                    .filter(|(_, at)| {
                        self.file(at).is_some_and(
                            |f| matches!(&f.phase, FilePhase::Leased { worker_id: w, .. } if *w == worker_id),
                        )
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for lease_id in held {
                    self.release(lease_id, Some(worker_id.clone()));
                }
                self.workers.insert(
                    worker_id.clone(),
                    WorkerRecord {
                        id: worker_id,
                        concurrency,
                        last_seen_ms: at_ms,
                    },
                );
                Applied::Done
            }
            Command::Heartbeat { worker_id, at_ms } => match self.workers.get_mut(&worker_id) {
                Some(worker) => {
                    worker.last_seen_ms = worker.last_seen_ms.max(at_ms);
                    Applied::Done
                }
                None => refused(format!("unknown worker {worker_id}")),
            },
            Command::SubmitJob {
                tenant,
                request,
                max_file_attempts,
                at_ms,
            } => {
                self.next_job += 1;
                let id = format!("job-{}", self.next_job);
                self.jobs.insert(
                    id.clone(),
                    Job {
                        id: id.clone(),
                        tenant,
                        request,
                        max_file_attempts: max_file_attempts.max(1),
                        submitted_ms: at_ms,
                        phase: JobPhase::Submitted,
                        status_url: None,
                        kickoff_by: None,
                        requires_access_token: true,
                        manifest_complete: false,
                        transaction_time: None,
                        error: None,
                        status_deleted: false,
                        files: Vec::new(),
                        names: BTreeMap::new(),
                    },
                );
                Applied::JobSubmitted { job_id: id }
            }
            Command::KickoffStarting { job_id, node_id } => match self.jobs.get_mut(&job_id) {
                Some(job) if job.phase == JobPhase::Submitted => {
                    job.kickoff_by = Some(node_id);
                    Applied::Done
                }
                Some(job) => refused(format!("{job_id} is {:?}, not waiting for a kick-off", job.phase)),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::KickedOff { job_id, status_url } => match self.jobs.get_mut(&job_id) {
                Some(job) if job.phase == JobPhase::Submitted => {
                    job.status_url = Some(status_url);
                    job.phase = JobPhase::Polling;
                    Applied::Done
                }
                Some(job) => refused(format!("{job_id} is {:?}, not waiting for a kick-off", job.phase)),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::AddFiles {
                job_id,
                files,
                requires_access_token,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.requires_access_token = requires_access_token;
                    for file in files {
                        let url = file.url.to_string();
                        if job.files.iter().any(|f| f.url == url) {
                            continue;
                        }
                        let relative_path = job.relative_path(&file);
                        job.files.push(FileRecord {
                            url,
                            kind: file.kind,
                            resource_type: file.resource_type,
                            count: file.count,
                            relative_path,
                            phase: FilePhase::Pending,
                            generation: 0,
                            attempts: 0,
                            progress: Checkpoint::default(),
                            sha256: None,
                            location: None,
                            failure: None,
                            issues: Vec::new(),
                            preferred_worker: None,
                        });
                    }
                    Applied::Done
                }
                Some(_) => refused(format!("{job_id} has ended")),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::ManifestComplete {
                job_id,
                transaction_time,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.manifest_complete = true;
                    job.transaction_time = Some(transaction_time.clone());
                    job.phase = JobPhase::Downloading;
                    self.tenant_since.insert(job.tenant.clone(), transaction_time);
                    job.settle();
                    Applied::Done
                }
                Some(_) => refused(format!("{job_id} has ended")),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::JobFailed { job_id, reason } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.phase = JobPhase::Failed;
                    job.error = Some(reason);
                    Applied::Done
                }
                Some(_) => refused(format!("{job_id} has ended")),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::CancelJob { job_id } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.phase = JobPhase::Cancelled;
                    let leased: Vec<u64> = job
                        .files
                        .iter()
                        .filter_map(|f| match &f.phase {
                            FilePhase::Leased { lease_id, .. } => Some(*lease_id),
                            _ => None,
                        })
                        .collect();
                    for file in &mut job.files {
                        if matches!(file.phase, FilePhase::Leased { .. } | FilePhase::Pending) {
                            file.phase = FilePhase::Failed;
                            file.failure = Some(("cancelled".into(), "the export was cancelled".into()));
                        }
                    }
                    for lease in leased {
                        self.leases.remove(&lease);
                    }
                    Applied::Done
                }
                Some(_) => refused(format!("{job_id} has ended")),
                None => refused(format!("unknown job {job_id}")),
            },
            Command::GrantLease {
                job_id,
                file,
                worker_id,
                expires_at_ms,
            } => {
                if !self.workers.contains_key(&worker_id) {
                    return refused(format!("unknown worker {worker_id}"));
                }
                let Some(job) = self.jobs.get_mut(&job_id) else {
                    return refused(format!("unknown job {job_id}"));
                };
                if job.phase.is_final() {
                    return refused(format!("{job_id} has ended"));
                }
                let Some(record) = job.files.get_mut(file as usize) else {
                    return refused(format!("{job_id} has no file {file}"));
                };
                if record.phase != FilePhase::Pending {
                    return refused(format!("file {file} of {job_id} is not pending"));
                }
                self.next_lease += 1;
                let lease_id = self.next_lease;
                record.generation += 1;
                record.attempts += 1;
                record.phase = FilePhase::Leased {
                    lease_id,
                    worker_id,
                    expires_at_ms,
                };
                self.leases.insert(
                    lease_id,
                    LeaseIndex {
                        job_id: job_id.clone(),
                        file,
                    },
                );
                Applied::LeaseGranted(LeaseGrant {
                    lease_id,
                    generation: record.generation,
                    job_id,
                    file,
                    expires_at_ms,
                })
            }
            Command::RenewLease {
                lease_id,
                generation,
                progress,
                expires_at_ms,
            } => {
                let record = match self.current_lease(lease_id, generation) {
                    Ok(record) => record,
                    Err(refusal) => return refusal,
                };
                if let FilePhase::Leased {
                    expires_at_ms: expiry, ..
                } = &mut record.phase
                {
                    *expiry = expires_at_ms;
                }
                record.progress = progress;
                Applied::Done
            }
            Command::CompleteLease {
                lease_id,
                generation,
                bytes,
                resources,
                sha256,
                location,
                issues,
            } => {
                let record = match self.current_lease(lease_id, generation) {
                    Ok(record) => record,
                    Err(refusal) => return refusal,
                };
                record.phase = FilePhase::Done;
                record.progress.offset = bytes;
                record.progress.resources = resources;
                record.sha256 = Some(sha256);
                record.location = Some(location);
                record.issues = issues;
                record.preferred_worker = None;
                self.finish_lease(lease_id);
                Applied::Done
            }
            Command::FailLease {
                lease_id,
                generation,
                category,
                reason,
                retryable,
                released,
            } => {
                let record = match self.current_lease(lease_id, generation) {
                    Ok(record) => record,
                    Err(refusal) => return refusal,
                };
                if released {
                    record.attempts = record.attempts.saturating_sub(1);
                }
                record.failure = Some((category, reason));
                let worker = match &record.phase {
                    FilePhase::Leased { worker_id, .. } => Some(worker_id.clone()),
                    _ => None,
                };
                let attempts = record.attempts;
                let job_max = self
                    .leases
                    .get(&lease_id)
                    .and_then(|at| self.jobs.get(&at.job_id))
                    .map(|j| j.max_file_attempts)
                    .unwrap_or(1);
                if released || (retryable && attempts < job_max) {
                    self.release(lease_id, if released { worker } else { None });
                } else {
                    if let Some(record) = self.lease_file_mut(lease_id) {
                        record.phase = FilePhase::Failed;
                    }
                    self.finish_lease(lease_id);
                }
                Applied::Done
            }
            Command::ExpireLease { lease_id, generation } => {
                if let Err(refusal) = self.current_lease(lease_id, generation) {
                    return refusal;
                }
                // The worker may be alive but cut off; its partial file is not reachable.
                self.release(lease_id, None);
                Applied::Done
            }
            Command::ForgetAbsentWorkers { stale_before_ms } => {
                self.forget_preferences_of_absent_workers(stale_before_ms);
                Applied::Done
            }
            Command::SetCoordinatorAddress { node_id, address } => {
                self.coordinators.insert(node_id, address);
                Applied::Done
            }
            Command::StatusDeleted { job_id } => match self.jobs.get_mut(&job_id) {
                Some(job) => {
                    job.status_deleted = true;
                    Applied::Done
                }
                None => refused(format!("unknown job {job_id}")),
            },
        }
    }

    fn file(&self, at: &LeaseIndex) -> Option<&FileRecord> {
        self.jobs.get(&at.job_id)?.files.get(at.file as usize)
    }

    fn lease_file_mut(&mut self, lease_id: u64) -> Option<&mut FileRecord> {
        let at = self.leases.get(&lease_id)?;
        self.jobs.get_mut(&at.job_id)?.files.get_mut(at.file as usize)
    }

    /// The file a live lease is on, if `generation` is its current one (fencing).
    fn current_lease(&mut self, lease_id: u64, generation: u64) -> Result<&mut FileRecord, Applied> {
        let Some(record) = self.lease_file_mut(lease_id) else {
            return Err(refused(format!(
                "lease {lease_id} is not live (expired, finished or unknown)"
            )));
        };
        match &record.phase {
            FilePhase::Leased { lease_id: current, .. } if *current == lease_id && record.generation == generation => {
                Ok(record)
            }
            _ => Err(refused(format!(
                "lease {lease_id} generation {generation} is stale (the file is at generation {})",
                record.generation
            ))),
        }
    }

    /// Puts a leased file back to pending.
    fn release(&mut self, lease_id: u64, preferred_worker: Option<String>) {
        if let Some(record) = self.lease_file_mut(lease_id) {
            record.phase = FilePhase::Pending;
            record.preferred_worker = preferred_worker;
        }
        self.leases.remove(&lease_id);
    }

    fn finish_lease(&mut self, lease_id: u64) {
        if let Some(at) = self.leases.remove(&lease_id)
            && let Some(job) = self.jobs.get_mut(&at.job_id)
        {
            job.settle();
        }
    }

    /// Leases held by each worker right now.
    pub fn leases_held(&self, worker_id: &str) -> usize {
        self.leases
            .values()
            .filter(|at| matches!(self.file(at).map(|f| &f.phase), Some(FilePhase::Leased { worker_id: w, .. }) if w == worker_id))
            .count()
    }

    /// Leases whose expiry has passed at `now_ms`: (lease id, generation).
    pub fn expired_leases(&self, now_ms: u64) -> Vec<(u64, u64)> {
        self.leases
            .iter()
            .filter_map(|(id, at)| {
                let file = self.file(at)?;
                match &file.phase {
                    FilePhase::Leased { expires_at_ms, .. } if *expires_at_ms <= now_ms => Some((*id, file.generation)),
                    _ => None,
                }
            })
            .collect()
    }

    /// The next file to give `worker_id`: its own interrupted files first (it can resume
    /// them), then files nobody prefers, oldest job first; never more than
    /// `per_tenant_limit` leases at once for one tenant.
    pub fn next_file_for(&self, worker_id: &str, per_tenant_limit: impl Fn(&str) -> usize) -> Option<(String, u32)> {
        let mut leased_per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
        for at in self.leases.values() {
            if let Some(job) = self.jobs.get(&at.job_id) {
                *leased_per_tenant.entry(job.tenant.as_str()).or_default() += 1;
            }
        }
        let candidates = self.jobs.values().filter(|job| {
            matches!(job.phase, JobPhase::Polling | JobPhase::Downloading)
                && leased_per_tenant.get(job.tenant.as_str()).copied().unwrap_or(0) < per_tenant_limit(&job.tenant)
        });
        let mut fallback = None;
        for job in candidates {
            for (index, file) in job.files.iter().enumerate() {
                if file.phase != FilePhase::Pending {
                    continue;
                }
                match file.preferred_worker.as_deref() {
                    Some(preferred) if preferred == worker_id => return Some((job.id.clone(), index as u32)),
                    Some(_) => {}
                    None => {
                        if fallback.is_none() {
                            fallback = Some((job.id.clone(), index as u32));
                        }
                    }
                }
            }
        }
        fallback
    }

    /// Lets files that prefer a worker which has not been seen since `stale_before_ms` go
    /// to anyone.
    fn forget_preferences_of_absent_workers(&mut self, stale_before_ms: u64) {
        let absent: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.last_seen_ms < stale_before_ms)
            .map(|w| w.id.clone())
            .collect();
        for job in self.jobs.values_mut() {
            for file in &mut job.files {
                if file.preferred_worker.as_ref().is_some_and(|w| absent.contains(w)) {
                    file.preferred_worker = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_file(n: u32) -> ManifestFile {
        ManifestFile {
            kind: FileKind::Output,
            resource_type: Some("Patient".into()),
            url: format!("https://ehr.example/files/{n}").parse().unwrap(),
            count: Some(10),
        }
    }

    /// A state with one job, submitted and not yet kicked off.
    fn state_with_submitted_job() -> (State, String) {
        let mut state = State::default();
        let Applied::JobSubmitted { job_id } = state.apply(Command::SubmitJob {
            tenant: "t".into(),
            request: ExportRequest::default(),
            max_file_attempts: 3,
            at_ms: 0,
        }) else {
            panic!()
        };
        (state, job_id)
    }

    fn state_with_job(files: u32) -> (State, String) {
        let (mut state, job_id) = state_with_submitted_job();
        state.apply(Command::KickedOff {
            job_id: job_id.clone(),
            status_url: "https://ehr.example/status/1".into(),
        });
        state.apply(Command::AddFiles {
            job_id: job_id.clone(),
            files: (0..files).map(manifest_file).collect(),
            requires_access_token: true,
        });
        for worker in ["w1", "w2"] {
            state.apply(Command::RegisterWorker {
                worker_id: worker.into(),
                concurrency: 2,
                at_ms: 0,
            });
        }
        (state, job_id)
    }

    fn grant(state: &mut State, job_id: &str, file: u32, worker: &str) -> LeaseGrant {
        match state.apply(Command::GrantLease {
            job_id: job_id.into(),
            file,
            worker_id: worker.into(),
            expires_at_ms: 1000,
        }) {
            Applied::LeaseGranted(grant) => grant,
            other => panic!("{other:?}"),
        }
    }

    fn complete(lease: &LeaseGrant) -> Command {
        Command::CompleteLease {
            lease_id: lease.lease_id,
            generation: lease.generation,
            bytes: 10,
            resources: 10,
            sha256: "abc".into(),
            location: "out/x".into(),
            issues: vec![],
        }
    }

    #[test]
    fn a_kickoff_is_marked_with_its_sender_until_the_status_url_is_committed() {
        let (mut state, job_id) = state_with_submitted_job();
        let starting = |node_id| Command::KickoffStarting {
            job_id: job_id.clone(),
            node_id,
        };
        assert_eq!(state.apply(starting(2)), Applied::Done);
        // A later leader that gave up asking node 2 marks its own attempt.
        assert_eq!(state.apply(starting(3)), Applied::Done);
        assert_eq!(state.jobs[&job_id].kickoff_by, Some(3));
        state.apply(Command::KickedOff {
            job_id: job_id.clone(),
            status_url: "https://ehr.example/status/1".into(),
        });
        assert!(
            matches!(state.apply(starting(1)), Applied::Refused { .. }),
            "a job with a committed status URL is never kicked off again"
        );
        // Snapshots written before the field existed still load.
        let mut json: serde_json::Value = serde_json::to_value(&state).unwrap();
        json["jobs"][&job_id].as_object_mut().unwrap().remove("kickoff_by");
        let old: State = serde_json::from_value(json).unwrap();
        assert_eq!(old.jobs[&job_id].kickoff_by, None);
    }

    #[test]
    fn files_get_stable_names_and_duplicates_are_ignored() {
        let (mut state, job_id) = state_with_job(2);
        state.apply(Command::AddFiles {
            job_id: job_id.clone(),
            files: vec![manifest_file(1), manifest_file(2)],
            requires_access_token: true,
        });
        let job = &state.jobs[&job_id];
        let names: Vec<&str> = job.files.iter().map(|f| f.relative_path.as_str()).collect();
        assert_eq!(
            names,
            [
                "job-1/Patient.1.ndjson",
                "job-1/Patient.2.ndjson",
                "job-1/Patient.3.ndjson"
            ]
        );
    }

    #[test]
    fn a_stale_generation_cannot_complete_or_renew() {
        let (mut state, job_id) = state_with_job(1);
        let first = grant(&mut state, &job_id, 0, "w1");
        assert_eq!(
            state.apply(Command::ExpireLease {
                lease_id: first.lease_id,
                generation: first.generation
            }),
            Applied::Done
        );
        let second = grant(&mut state, &job_id, 0, "w2");
        assert_eq!(second.generation, first.generation + 1);
        assert!(
            matches!(state.apply(complete(&first)), Applied::Refused { .. }),
            "the presumed-dead worker is fenced off"
        );
        let renew = Command::RenewLease {
            lease_id: first.lease_id,
            generation: first.generation,
            progress: Checkpoint::default(),
            expires_at_ms: 5000,
        };
        assert!(matches!(state.apply(renew), Applied::Refused { .. }));
        assert_eq!(state.apply(complete(&second)), Applied::Done);
        assert_eq!(state.jobs[&job_id].files[0].phase, FilePhase::Done);
    }

    #[test]
    fn job_completes_when_the_manifest_is_complete_and_every_file_is_settled() {
        let (mut state, job_id) = state_with_job(2);
        let a = grant(&mut state, &job_id, 0, "w1");
        let b = grant(&mut state, &job_id, 1, "w2");
        state.apply(complete(&a));
        state.apply(Command::FailLease {
            lease_id: b.lease_id,
            generation: b.generation,
            category: "content".into(),
            reason: "line 3 is not JSON".into(),
            retryable: false,
            released: false,
        });
        assert_eq!(
            state.jobs[&job_id].phase,
            JobPhase::Polling,
            "the manifest is not complete yet"
        );
        state.apply(Command::ManifestComplete {
            job_id: job_id.clone(),
            transaction_time: "2024-01-01T00:00:00Z".into(),
        });
        let job = &state.jobs[&job_id];
        assert_eq!(job.phase, JobPhase::Completed);
        assert_eq!(job.files[1].phase, FilePhase::Failed);
        assert_eq!(job.files[1].failure.as_ref().unwrap().0, "content");
        assert_eq!(state.tenant_since["t"], "2024-01-01T00:00:00Z");
    }

    #[test]
    fn retryable_failures_are_bounded() {
        let (mut state, job_id) = state_with_job(1);
        for attempt in 1..=3 {
            let lease = grant(&mut state, &job_id, 0, "w1");
            state.apply(Command::FailLease {
                lease_id: lease.lease_id,
                generation: lease.generation,
                category: "network".into(),
                reason: "reset".into(),
                retryable: true,
                released: false,
            });
            let phase = &state.jobs[&job_id].files[0].phase;
            if attempt < 3 {
                assert_eq!(*phase, FilePhase::Pending);
            } else {
                assert_eq!(*phase, FilePhase::Failed, "three attempts and it is recorded as failed");
            }
        }
    }

    #[test]
    fn a_restarted_worker_gets_its_own_files_back_first() {
        let (mut state, job_id) = state_with_job(3);
        grant(&mut state, &job_id, 2, "w1");
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 2,
            at_ms: 50,
        });
        assert_eq!(state.jobs[&job_id].files[2].phase, FilePhase::Pending);
        assert_eq!(state.next_file_for("w1", |_| 10), Some((job_id.clone(), 2)));
        assert_eq!(
            state.next_file_for("w2", |_| 10),
            Some((job_id.clone(), 0)),
            "others take other files"
        );
        state.apply(Command::ForgetAbsentWorkers { stale_before_ms: 100 });
        assert_eq!(state.jobs[&job_id].files[2].preferred_worker, None);
    }

    #[test]
    fn per_tenant_limit_and_expiry() {
        let (mut state, job_id) = state_with_job(3);
        grant(&mut state, &job_id, 0, "w1");
        assert_eq!(state.next_file_for("w2", |_| 1), None, "the tenant is at its limit");
        assert_eq!(state.expired_leases(999), vec![]);
        assert_eq!(state.expired_leases(1000).len(), 1);
    }

    #[test]
    fn commands_round_trip_through_json() {
        let command = Command::GrantLease {
            job_id: "job-1".into(),
            file: 3,
            worker_id: "w".into(),
            expires_at_ms: 9,
        };
        let text = serde_json::to_vec(&command).unwrap();
        assert_eq!(serde_json::from_slice::<Command>(&text).unwrap(), command);
    }
}
