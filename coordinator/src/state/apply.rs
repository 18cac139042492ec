use fhirhaul_common::Category;
use fhirhaul_common::fhir::parse_instant;

use super::{
    Applied, ArchivedJob, Cleanup, Command, FilePhase, FileRecord, Job, JobPhase, LeaseGrant, LeaseIndex, Refusal,
    ReportedLeases, State, WorkerRecord,
};

fn refused(refusal: Refusal) -> Applied {
    Applied::Refused(refusal)
}

impl State {
    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Applied {
        let applied = self.apply_command(command);
        // Every change keeps the file indexes true (checked where it is cheap).
        debug_assert!(
            self.jobs
                .values()
                .filter(|job| job.files.len() <= 2_000)
                .all(|job| job.index_is_true()),
            "a job's file index no longer matches its files"
        );
        applied
    }

    fn apply_command(&mut self, command: Command) -> Applied {
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
                        holding: None,
                    },
                );
                Applied::Done
            }
            Command::Heartbeat {
                worker_id,
                at_ms,
                lease_ids,
            } => match self.workers.get_mut(&worker_id) {
                Some(worker) => {
                    worker.last_seen_ms = worker.last_seen_ms.max(at_ms);
                    if let Some(lease_ids) = lease_ids
                        && worker.holding.as_ref().is_none_or(|h| h.at_ms <= at_ms)
                    {
                        worker.holding = Some(ReportedLeases {
                            at_ms,
                            lease_ids: lease_ids.into_iter().collect(),
                        });
                    }
                    Applied::Done
                }
                None => refused(Refusal::UnknownWorker(worker_id)),
            },
            Command::SubmitJob {
                tenant,
                request,
                max_file_attempts,
                at_ms,
                request_id,
                export_id,
                delete_policy,
            } => {
                if let Some(job_id) = request_id.as_ref().and_then(|id| self.submissions.get(id)) {
                    return Applied::AlreadySubmitted { job_id: job_id.clone() };
                }
                self.next_job += 1;
                let id = format!("job-{}", self.next_job);
                if let Some(request_id) = request_id {
                    self.submissions.insert(request_id, id.clone());
                }
                self.jobs.insert(
                    id.clone(),
                    Job {
                        export_id: export_id.unwrap_or_else(|| id.clone()),
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
                        links_expire_ms: None,
                        error: None,
                        status_deleted: false,
                        delete_policy,
                        delete_failures: 0,
                        delete_error: None,
                        delete_failed_at_ms: 0,
                        progress: None,
                        progress_at_ms: None,
                        download_started_ms: None,
                        last_file_ms: None,
                        files: Default::default(),
                        names: Default::default(),
                        index: Default::default(),
                    },
                );
                Applied::JobSubmitted { job_id: id }
            }
            Command::KickoffStarting { job_id, node_id } => match self.jobs.get_mut(&job_id) {
                Some(job) if job.phase == JobPhase::Submitted => {
                    job.kickoff_by = Some(node_id);
                    Applied::Done
                }
                Some(job) => refused(Refusal::NotAwaitingKickoff {
                    job_id,
                    phase: job.phase,
                }),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::KickedOff { job_id, status_url } => match self.jobs.get_mut(&job_id) {
                Some(job) if job.phase == JobPhase::Submitted => {
                    job.status_url = Some(status_url);
                    job.phase = JobPhase::Polling;
                    Applied::Done
                }
                Some(job) => refused(Refusal::NotAwaitingKickoff {
                    job_id,
                    phase: job.phase,
                }),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::AddFiles {
                job_id,
                files,
                requires_access_token,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.requires_access_token = requires_access_token;
                    // Partial pages and the final manifest list files again: each URL once,
                    // found in constant time (not by a scan per file).
                    let mut known: std::collections::HashSet<String> =
                        job.files.iter().map(|f| f.url.clone()).collect();
                    for file in files {
                        if !known.insert(file.url.to_string()) {
                            continue;
                        }
                        let relative_path = job.relative_path(&file);
                        job.push_file(FileRecord::pending(&file, relative_path));
                    }
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::JobProgress {
                job_id,
                progress,
                at_ms,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    if progress.is_some() {
                        job.progress = progress;
                    }
                    job.progress_at_ms = Some(job.progress_at_ms.unwrap_or(0).max(at_ms));
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::ManifestComplete {
                job_id,
                transaction_time,
                links_expire_ms,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.manifest_complete = true;
                    job.transaction_time = Some(transaction_time.clone());
                    job.links_expire_ms = links_expire_ms;
                    job.phase = JobPhase::Downloading;
                    self.settle(&job_id);
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::RenewLinks {
                job_id,
                links,
                links_expire_ms,
            } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    for (index, url) in links {
                        if let Some(file) = job.files.get_mut(index as usize)
                            && file.phase != FilePhase::Done
                        {
                            file.url = url;
                        }
                    }
                    job.links_expire_ms = links_expire_ms;
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::JobFailed { job_id, reason } => match self.jobs.get_mut(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    job.phase = JobPhase::Failed;
                    job.error = Some(reason);
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::CancelJob { job_id } => match self.jobs.get(&job_id) {
                Some(job) if !job.phase.is_final() => {
                    self.end_job(
                        &job_id,
                        JobPhase::Cancelled,
                        Category::Cancelled,
                        "the export was cancelled",
                    );
                    Applied::Done
                }
                Some(_) => refused(Refusal::JobEnded(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::GrantLease {
                job_id,
                file,
                worker_id,
                expires_at_ms,
                granted_at_ms,
            } => {
                if !self.workers.contains_key(&worker_id) {
                    return refused(Refusal::UnknownWorker(worker_id));
                }
                let Some(job) = self.jobs.get_mut(&job_id) else {
                    return refused(Refusal::UnknownJob(job_id));
                };
                if job.phase.is_final() {
                    return refused(Refusal::JobEnded(job_id));
                }
                let Some(record) = job.files.get(file as usize) else {
                    return refused(Refusal::NoSuchFile { job_id, file });
                };
                if record.phase != FilePhase::Pending {
                    return refused(Refusal::FileNotPending { job_id, file });
                }
                if granted_at_ms > 0 && job.download_started_ms.is_none() {
                    job.download_started_ms = Some(granted_at_ms);
                }
                self.next_lease += 1;
                let lease_id = self.next_lease;
                let mut generation = 0;
                job.change_file(file, |record| {
                    record.generation += 1;
                    record.attempts += 1;
                    record.phase = FilePhase::Leased {
                        lease_id,
                        worker_id,
                        expires_at_ms,
                        granted_at_ms,
                    };
                    generation = record.generation;
                });
                self.leases.insert(
                    lease_id,
                    LeaseIndex {
                        job_id: job_id.clone(),
                        file,
                    },
                );
                Applied::LeaseGranted(LeaseGrant {
                    lease_id,
                    generation,
                    job_id,
                    file,
                    expires_at_ms,
                })
            }
            Command::GrantLeases { grants } => Applied::Each(
                grants
                    .into_iter()
                    .map(|grant| {
                        self.apply(Command::GrantLease {
                            job_id: grant.job_id,
                            file: grant.file,
                            worker_id: grant.worker_id,
                            expires_at_ms: grant.expires_at_ms,
                            granted_at_ms: grant.granted_at_ms,
                        })
                    })
                    .collect(),
            ),
            Command::RenewLease {
                lease_id,
                generation,
                progress,
                expires_at_ms,
            } => {
                if let Err(refusal) = self.current_lease(lease_id, generation) {
                    return refusal;
                }
                self.change_lease_file(lease_id, |record| {
                    if let FilePhase::Leased {
                        expires_at_ms: expiry, ..
                    } = &mut record.phase
                    {
                        *expiry = expires_at_ms;
                    }
                    record.progress = progress;
                });
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
                ehr_errors,
                at_ms,
            } => {
                if let Err(refusal) = self.current_lease(lease_id, generation) {
                    return refusal;
                }
                self.change_lease_file(lease_id, |record| {
                    record.progress.offset = bytes;
                    record.progress.resources = resources;
                    record.sha256 = Some(sha256);
                    record.location = Some(location);
                    record.issues = issues;
                    record.ehr_errors = ehr_errors;
                    record.phase = FilePhase::Done;
                    record.preferred_worker = None;
                });
                self.file_finished_at(lease_id, at_ms);
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
                at_ms,
            } => {
                let record = match self.current_lease(lease_id, generation) {
                    Ok(record) => record,
                    Err(refusal) => return refusal,
                };
                if released {
                    record.attempts = record.attempts.saturating_sub(1);
                }
                record.failure = Some((category, reason.clone()));
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
                let job_id = self.leases.get(&lease_id).map(|at| at.job_id.clone());
                if released || (retryable && attempts < job_max) {
                    self.release(lease_id, if released { worker } else { None });
                } else if category == Category::Auth
                    && let Some(job_id) = job_id
                {
                    // The EHR refuses the client itself: no other file of this export can
                    // be fetched either. The export fails once, with the EHR's words.
                    let reason = format!("the EHR refused the client: {reason}");
                    self.end_job(&job_id, JobPhase::Failed, Category::Auth, &reason);
                    if let Some(job) = self.jobs.get_mut(&job_id) {
                        job.error = Some(reason);
                    }
                } else {
                    self.change_lease_file(lease_id, |record| record.phase = FilePhase::Failed);
                    self.file_finished_at(lease_id, at_ms);
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
            Command::ReturnLease { lease_id, generation } => {
                let record = match self.current_lease(lease_id, generation) {
                    Ok(record) => record,
                    Err(refusal) => return refusal,
                };
                record.attempts = record.attempts.saturating_sub(1);
                self.release(lease_id, None);
                Applied::Done
            }
            Command::ForgetAbsentWorkers { stale_before_ms } => {
                self.forget_preferences_of_absent_workers(stale_before_ms);
                Applied::Done
            }
            Command::ArchiveJob { job_id, at_ms } => match self.jobs.get(&job_id) {
                Some(job) if job.phase.is_final() && !matches!(job.cleanup(), Cleanup::Due { .. }) => {
                    if let Some(job) = self.jobs.remove(&job_id) {
                        self.archived.insert(job_id, ArchivedJob::of(&job, at_ms));
                        self.archive_outbox.push(job);
                    }
                    Applied::Done
                }
                Some(_) => refused(Refusal::NotFinished(job_id)),
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::SetCoordinatorAddress { node_id, address } => {
                self.coordinators.insert(node_id, address);
                Applied::Done
            }
            Command::StatusDeleteFailed { job_id, reason, at_ms } => match self.jobs.get_mut(&job_id) {
                Some(job) => {
                    job.delete_failures += 1;
                    job.delete_error = Some(reason);
                    job.delete_failed_at_ms = at_ms;
                    Applied::Done
                }
                None => refused(Refusal::UnknownJob(job_id)),
            },
            Command::StatusDeleted { job_id } => match self.jobs.get_mut(&job_id) {
                Some(job) => {
                    job.status_deleted = true;
                    Applied::Done
                }
                None => refused(Refusal::UnknownJob(job_id)),
            },
        }
    }

    pub(super) fn file(&self, at: &LeaseIndex) -> Option<&FileRecord> {
        self.jobs.get(&at.job_id)?.files.get(at.file as usize)
    }

    fn lease_file_mut(&mut self, lease_id: u64) -> Option<&mut FileRecord> {
        let at = self.leases.get(&lease_id)?;
        self.jobs.get_mut(&at.job_id)?.files.get_mut(at.file as usize)
    }

    /// Changes the file a lease is on through `change`, keeping its job's index true.
    fn change_lease_file(&mut self, lease_id: u64, change: impl FnOnce(&mut FileRecord)) {
        if let Some(at) = self.leases.get(&lease_id)
            && let Some(job) = self.jobs.get_mut(&at.job_id)
        {
            job.change_file(at.file, change);
        }
    }

    /// The file a live lease is on, if `generation` is its current one (fencing).
    fn current_lease(&mut self, lease_id: u64, generation: u64) -> Result<&mut FileRecord, Applied> {
        let Some(record) = self.lease_file_mut(lease_id) else {
            return Err(refused(Refusal::LeaseNotLive { lease_id }));
        };
        match &record.phase {
            FilePhase::Leased { lease_id: current, .. } if *current == lease_id && record.generation == generation => {
                Ok(record)
            }
            _ => Err(refused(Refusal::StaleGeneration {
                lease_id,
                generation,
                current: record.generation,
            })),
        }
    }

    /// Puts a leased file back to pending.
    fn release(&mut self, lease_id: u64, preferred_worker: Option<String>) {
        self.change_lease_file(lease_id, |record| {
            record.phase = FilePhase::Pending;
            record.preferred_worker = preferred_worker;
        });
        self.leases.remove(&lease_id);
    }

    /// Records that a file of the lease's job finished (done or failed) at `at_ms`.
    fn file_finished_at(&mut self, lease_id: u64, at_ms: u64) {
        if at_ms == 0 {
            return;
        }
        if let Some(job) = self.leases.get(&lease_id).and_then(|at| self.jobs.get_mut(&at.job_id)) {
            job.last_file_ms = Some(job.last_file_ms.unwrap_or(0).max(at_ms));
        }
    }

    fn finish_lease(&mut self, lease_id: u64) {
        if let Some(at) = self.leases.remove(&lease_id) {
            self.settle(&at.job_id);
        }
    }

    /// Ends an unfinished job as `phase`: every file still pending or leased fails with
    /// `category` and `reason` (files already done or failed keep theirs), and the leases
    /// end.
    fn end_job(&mut self, job_id: &str, phase: JobPhase, category: Category, reason: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.phase = phase;
        let leases = &mut self.leases;
        job.change_all_files(|file| {
            if let FilePhase::Leased { lease_id, .. } = file.phase {
                leases.remove(&lease_id);
            }
            if matches!(file.phase, FilePhase::Leased { .. } | FilePhase::Pending) {
                file.phase = FilePhase::Failed;
                file.failure = Some((category, reason.to_string()));
            }
        });
    }

    /// Completes the job once its manifest is complete and every file is settled; a job
    /// that completed with every file downloaded moves its tenant's incremental cursor.
    fn settle(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if !job.settle() || job.files_failed() > 0 {
            return;
        }
        let (Some(reached), tenant, since) = (
            job.transaction_time.clone(),
            job.tenant.clone(),
            job.request.since.clone(),
        ) else {
            return;
        };
        let cursor = self.tenant_since.get(&tenant).cloned();
        if cursor_may_move(cursor.as_deref(), since.as_deref(), &reached) {
            self.tenant_since_job.insert(tenant.clone(), job_id.to_string());
            self.tenant_since.insert(tenant, reached);
        }
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
        if absent.is_empty() {
            return;
        }
        for job in self.jobs.values_mut() {
            let kept_for_absent: Vec<u32> = job
                .index()
                .preferred
                .iter()
                .filter(|(worker, _)| absent.contains(worker))
                .flat_map(|(_, files)| files.iter().copied())
                .collect();
            for position in kept_for_absent {
                job.change_file(position, |file| file.preferred_worker = None);
            }
        }
    }
}

/// Whether a tenant's incremental cursor may move from `cursor` to `reached`, the
/// `transactionTime` of a job that downloaded every file of its export from `since` on.
/// Only forwards, and only when the job left no gap: it must have started at or before the
/// cursor (or from the beginning), or the data between the cursor and its `since` would be
/// skipped by the next incremental export. Unreadable instants never move it.
pub(super) fn cursor_may_move(cursor: Option<&str>, since: Option<&str>, reached: &str) -> bool {
    let Some(reached) = parse_instant(reached) else {
        return false;
    };
    let Some(cursor) = cursor else {
        // No cursor yet: only an export from the beginning sets it.
        return since.is_none();
    };
    let Some(cursor) = parse_instant(cursor) else {
        return false;
    };
    let no_gap = match since {
        None => true,
        Some(since) => parse_instant(since).is_some_and(|since| since <= cursor),
    };
    no_gap && reached > cursor
}
