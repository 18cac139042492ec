//! What the leader does next, decided without I/O: [`plan`] looks at committed state and
//! at what this term already runs, and returns [`Action`]s for the leader term to carry
//! out (start or stop a job driver, DELETE a status URL, expire a lease, let files of an
//! absent worker go to anyone). Run on every tick; each action it returns is either
//! idempotent or guarded by `running`, so planning twice never does a thing twice.

use std::collections::BTreeSet;

use crate::state::{Cleanup, FilePhase, JobPhase, State};

/// One thing for the leader to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Kick off (or resume polling) the job.
    StartDriver { job_id: String },
    /// The job no longer needs its driver (it finished, failed or was cancelled).
    StopDriver { job_id: String },
    /// DELETE the job's status URL at the EHR.
    DeleteStatus { job_id: String },
    /// The lease ran out: its file goes back to pending.
    ExpireLease { lease_id: u64, generation: u64 },
    /// Files waiting for a worker not seen since then may go to anyone.
    ForgetAbsentWorkers { stale_before_ms: u64 },
    /// The job has finished and been quiet for a while: move it out of the hot state.
    ArchiveJob { job_id: String },
}

/// What this term runs already.
#[derive(Debug, Default, Clone)]
pub struct Running {
    /// Jobs with a live driver.
    pub drivers: BTreeSet<String>,
    /// Jobs whose status URL DELETE was started this term.
    pub deleting: BTreeSet<String>,
}

/// The leader's fixed inputs for a term.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    /// A lease not renewed for this long goes back to pending.
    pub lease_ms: u64,
    /// When this node took over: it cannot know when an inherited lease was last renewed,
    /// so every lease gets a full period of grace from here.
    pub term_since_ms: u64,
    /// How long after a grant a worker's heartbeat must list the lease (one heartbeat
    /// period): a report at least this much later that leaves it out means the worker
    /// never got it.
    pub report_grace_ms: u64,
    /// A finished job (nothing left to DELETE) is archived once quiet this long.
    pub archive_after_ms: u64,
}

/// Decides what the leader does now.
pub fn plan(state: &State, running: &Running, now_ms: u64, settings: &PlanSettings) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut wanted_drivers = BTreeSet::new();
    for job in state.jobs.values() {
        // The job's own policy says whether its export is DELETEd (a failed file may be
        // fetched again from the EHR, which may purge it after a DELETE); a failed DELETE
        // waits before the next try.
        let delete_due =
            !running.deleting.contains(&job.id) && matches!(job.cleanup(), Cleanup::Due { at_ms } if now_ms >= at_ms);
        if delete_due {
            actions.push(Action::DeleteStatus { job_id: job.id.clone() });
        }
        let archive_due = job.phase.is_final()
            && !running.deleting.contains(&job.id)
            && !matches!(job.cleanup(), Cleanup::Due { .. })
            && now_ms >= job.last_activity_ms().saturating_add(settings.archive_after_ms);
        if archive_due {
            actions.push(Action::ArchiveJob { job_id: job.id.clone() });
        }
        match job.phase {
            JobPhase::Submitted | JobPhase::Polling => {
                wanted_drivers.insert(job.id.as_str());
                if !running.drivers.contains(&job.id) {
                    actions.push(Action::StartDriver { job_id: job.id.clone() });
                }
            }
            JobPhase::Downloading | JobPhase::Cancelled | JobPhase::Completed | JobPhase::Failed => {}
        }
    }
    for job_id in &running.drivers {
        if !wanted_drivers.contains(job_id.as_str()) {
            actions.push(Action::StopDriver { job_id: job_id.clone() });
        }
    }
    // A lease its holder's latest heartbeat leaves out, a heartbeat period after the
    // grant: the grant's answer never reached the worker (lost, or sent by a leader that
    // died first). It goes back to pending now, not a lease period from now.
    let mut reclaimed = BTreeSet::new();
    for (lease_id, at) in &state.leases {
        let Some(file) = state
            .jobs
            .get(&at.job_id)
            .and_then(|job| job.files.get(at.file as usize))
        else {
            continue;
        };
        let FilePhase::Leased {
            worker_id,
            granted_at_ms,
            ..
        } = &file.phase
        else {
            continue;
        };
        let reported = state.workers.get(worker_id).and_then(|w| w.holding.as_ref());
        if let Some(report) = reported
            && report.at_ms >= granted_at_ms.saturating_add(settings.report_grace_ms)
            && !report.lease_ids.contains(lease_id)
        {
            reclaimed.insert(*lease_id);
            actions.push(Action::ExpireLease {
                lease_id: *lease_id,
                generation: file.generation,
            });
        }
    }
    // Lease expiry, with a full lease period of grace after this node took over.
    if now_ms >= settings.term_since_ms.saturating_add(settings.lease_ms) {
        for (lease_id, generation) in state.expired_leases(now_ms) {
            if !reclaimed.contains(&lease_id) {
                actions.push(Action::ExpireLease { lease_id, generation });
            }
        }
        let stale_before_ms = now_ms.saturating_sub(settings.lease_ms);
        // Pending files kept for a worker, from the jobs' indexes (not a walk of every file).
        let waits_for_absent_worker = state
            .jobs
            .values()
            .flat_map(|job| job.index().preferred.keys())
            .any(|w| state.workers.get(w).is_none_or(|w| w.last_seen_ms < stale_before_ms));
        if waits_for_absent_worker {
            actions.push(Action::ForgetAbsentWorkers { stale_before_ms });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use fhirhaul_common::kickoff::ExportRequest;
    use fhirhaul_common::manifest::{FileKind, ManifestFile};

    use super::*;
    use crate::state::{Applied, Command, DeletePolicy};

    const LEASE_MS: u64 = 30_000;
    const REPORT_GRACE_MS: u64 = 10_000;
    const ARCHIVE_AFTER_MS: u64 = 600_000;

    fn settings() -> PlanSettings {
        PlanSettings {
            lease_ms: LEASE_MS,
            term_since_ms: 1_000,
            report_grace_ms: REPORT_GRACE_MS,
            archive_after_ms: ARCHIVE_AFTER_MS,
        }
    }

    /// A job of `tenant`: tenant "deletes" DELETEs exports that completed whole, "deletes-all"
    /// also those with failures, any other keeps them.
    fn submit(state: &mut State, tenant: &str) -> String {
        match state.apply(Command::SubmitJob {
            tenant: tenant.into(),
            request: ExportRequest::default(),
            max_file_attempts: 3,
            at_ms: 0,
            request_id: None,
            export_id: None,
            delete_policy: DeletePolicy {
                when_done: tenant.starts_with("deletes"),
                after_failure: tenant == "deletes-all",
            },
        }) {
            Applied::JobSubmitted { job_id } => job_id,
            other => panic!("{other:?}"),
        }
    }

    fn kicked_off(state: &mut State, job_id: &str) {
        state.apply(Command::KickedOff {
            job_id: job_id.into(),
            status_url: format!("https://ehr.example/status/{job_id}"),
        });
    }

    fn with_file(state: &mut State, job_id: &str) {
        state.apply(Command::AddFiles {
            job_id: job_id.into(),
            files: vec![ManifestFile {
                kind: FileKind::Output,
                resource_type: Some("Patient".into()),
                url: format!("https://ehr.example/files/{job_id}").parse().unwrap(),
                count: None,
            }],
            requires_access_token: true,
        });
    }

    fn running(drivers: &[&str], deleting: &[&str]) -> Running {
        Running {
            drivers: drivers.iter().map(|d| d.to_string()).collect(),
            deleting: deleting.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn start(job_id: &str) -> Action {
        Action::StartDriver { job_id: job_id.into() }
    }

    #[test]
    fn a_submitted_or_polling_job_gets_one_driver() {
        let mut state = State::default();
        let submitted = submit(&mut state, "t");
        let polling = submit(&mut state, "t");
        kicked_off(&mut state, &polling);
        let actions = plan(&state, &Running::default(), 2_000, &settings());
        assert_eq!(actions, [start(&submitted), start(&polling)]);
        let actions = plan(&state, &running(&[&submitted, &polling], &[]), 2_000, &settings());
        assert!(actions.is_empty(), "a running driver is not started twice: {actions:?}");
    }

    #[test]
    fn a_finished_job_is_archived_once_quiet_and_never_before_its_delete() {
        let mut state = State::default();
        let kept = submit(&mut state, "t");
        kicked_off(&mut state, &kept);
        state.apply(Command::JobFailed {
            job_id: kept.clone(),
            reason: "refused".into(),
        });
        let deleted = submit(&mut state, "deletes-all");
        kicked_off(&mut state, &deleted);
        state.apply(Command::CancelJob {
            job_id: deleted.clone(),
        });
        let running_job = submit(&mut state, "t");
        kicked_off(&mut state, &running_job);
        let archive = |state: &State, now_ms: u64| -> Vec<Action> {
            plan(state, &running(&[&running_job], &[]), now_ms, &settings())
                .into_iter()
                .filter(|a| matches!(a, Action::ArchiveJob { .. }))
                .collect()
        };
        assert!(
            archive(&state, ARCHIVE_AFTER_MS - 1).is_empty(),
            "not quiet long enough"
        );
        assert_eq!(
            archive(&state, ARCHIVE_AFTER_MS),
            [Action::ArchiveJob { job_id: kept.clone() }],
            "the cancelled job waits for its DELETE; the running one stays"
        );
        state.apply(Command::StatusDeleted {
            job_id: deleted.clone(),
        });
        assert_eq!(
            archive(&state, ARCHIVE_AFTER_MS),
            [
                Action::ArchiveJob { job_id: kept },
                Action::ArchiveJob { job_id: deleted }
            ]
        );
    }

    #[test]
    fn a_driver_stops_when_its_job_leaves_polling() {
        let mut state = State::default();
        let cancelled = submit(&mut state, "t");
        state.apply(Command::CancelJob {
            job_id: cancelled.clone(),
        });
        let failed = submit(&mut state, "t");
        state.apply(Command::JobFailed {
            job_id: failed.clone(),
            reason: "refused".into(),
        });
        let actions = plan(
            &state,
            &running(&[&cancelled, &failed, "job-99"], &[]),
            2_000,
            &settings(),
        );
        assert_eq!(
            actions,
            [
                Action::StopDriver { job_id: cancelled },
                Action::StopDriver { job_id: failed },
                Action::StopDriver {
                    job_id: "job-99".into()
                },
            ]
        );
    }

    #[test]
    fn a_cancelled_export_is_deleted_at_the_ehr_once() {
        let mut state = State::default();
        let job = submit(&mut state, "t");
        kicked_off(&mut state, &job);
        state.apply(Command::CancelJob { job_id: job.clone() });
        let delete = [Action::DeleteStatus { job_id: job.clone() }];
        assert_eq!(plan(&state, &Running::default(), 2_000, &settings()), delete);
        assert!(plan(&state, &running(&[], &[&job]), 2_000, &settings()).is_empty());
        state.apply(Command::StatusDeleted { job_id: job.clone() });
        assert!(plan(&state, &Running::default(), 2_000, &settings()).is_empty());
        // Cancelled before the kick-off: there is nothing to DELETE.
        let never_sent = submit(&mut state, "t");
        state.apply(Command::CancelJob { job_id: never_sent });
        assert!(plan(&state, &Running::default(), 2_000, &settings()).is_empty());
    }

    #[test]
    fn a_completed_export_is_deleted_only_where_the_tenant_asks() {
        let mut state = State::default();
        let keeps = submit(&mut state, "keeps");
        let deletes = submit(&mut state, "deletes");
        for job in [&keeps, &deletes] {
            kicked_off(&mut state, job);
            state.apply(Command::ManifestComplete {
                job_id: job.to_string(),
                transaction_time: "2024-01-01T00:00:00Z".into(),
                links_expire_ms: None,
            });
            assert_eq!(state.jobs[job.as_str()].phase, JobPhase::Completed);
        }
        assert_eq!(
            plan(&state, &Running::default(), 2_000, &settings()),
            [Action::DeleteStatus { job_id: deletes }]
        );
    }

    /// A completed job of `tenant` whose one file failed.
    fn completed_with_a_failed_file(state: &mut State, tenant: &str) -> String {
        let job = submit(state, tenant);
        kicked_off(state, &job);
        with_file(state, &job);
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 1,
            at_ms: 0,
        });
        let Applied::LeaseGranted(grant) = state.apply(Command::GrantLease {
            job_id: job.clone(),
            file: 0,
            worker_id: "w1".into(),
            expires_at_ms: 100_000,
            granted_at_ms: 0,
        }) else {
            panic!("granted");
        };
        state.apply(Command::FailLease {
            lease_id: grant.lease_id,
            generation: grant.generation,
            category: fhirhaul_common::Category::Content,
            reason: "line 2 is not JSON".into(),
            retryable: false,
            released: false,
            at_ms: 0,
        });
        state.apply(Command::ManifestComplete {
            job_id: job.clone(),
            transaction_time: "2024-01-01T00:00:00Z".into(),
            links_expire_ms: None,
        });
        assert_eq!(state.jobs[&job].phase, JobPhase::Completed);
        job
    }

    #[test]
    fn a_completed_export_with_a_failed_file_is_kept_at_the_ehr_unless_the_policy_says_otherwise() {
        let mut state = State::default();
        let kept = completed_with_a_failed_file(&mut state, "deletes");
        assert!(plan(&state, &Running::default(), 2_000, &settings()).is_empty());
        assert_eq!(state.jobs[&kept].cleanup(), Cleanup::Kept);
        let deleted = completed_with_a_failed_file(&mut state, "deletes-all");
        assert_eq!(
            plan(&state, &Running::default(), 2_000, &settings()),
            [Action::DeleteStatus { job_id: deleted }]
        );
    }

    #[test]
    fn a_failed_delete_is_tried_again_later_and_at_most_three_times() {
        let mut state = State::default();
        let job = submit(&mut state, "t");
        kicked_off(&mut state, &job);
        state.apply(Command::CancelJob { job_id: job.clone() });
        let delete = [Action::DeleteStatus { job_id: job.clone() }];
        let mut now = 2_000;
        for failures in 1..=3u64 {
            assert_eq!(plan(&state, &Running::default(), now, &settings()), delete);
            state.apply(Command::StatusDeleteFailed {
                job_id: job.clone(),
                reason: "HTTP 500".into(),
                at_ms: now,
            });
            if failures < 3 {
                let pause = 10_000 * failures;
                assert!(
                    plan(&state, &Running::default(), now + pause - 1, &settings()).is_empty(),
                    "not again before the pause"
                );
                now += pause;
            }
        }
        assert_eq!(
            plan(&state, &Running::default(), now + 3_600_000, &settings()),
            [Action::ArchiveJob { job_id: job.clone() }],
            "no fourth DELETE; in time the job is archived"
        );
        assert_eq!(state.jobs[&job].cleanup(), Cleanup::Failed("HTTP 500".into()));
    }

    #[test]
    fn leases_expire_only_after_a_full_period_of_this_term() {
        let mut state = State::default();
        let job = submit(&mut state, "t");
        kicked_off(&mut state, &job);
        with_file(&mut state, &job);
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 1,
            at_ms: 0,
        });
        let Applied::LeaseGranted(grant) = state.apply(Command::GrantLease {
            job_id: job.clone(),
            file: 0,
            worker_id: "w1".into(),
            expires_at_ms: 500,
            granted_at_ms: 0,
        }) else {
            panic!("granted");
        };
        let drivers = running(&[&job], &[]);
        // Expired by its own clock, but this leader took over at 1 000 ms and cannot know
        // when the lease was last renewed.
        assert!(plan(&state, &drivers, 1_000 + LEASE_MS - 1, &settings()).is_empty());
        assert_eq!(
            plan(&state, &drivers, 1_000 + LEASE_MS, &settings()),
            [Action::ExpireLease {
                lease_id: grant.lease_id,
                generation: grant.generation
            }]
        );
    }

    #[test]
    fn files_kept_for_an_absent_worker_are_let_go() {
        let mut state = State::default();
        let job = submit(&mut state, "t");
        kicked_off(&mut state, &job);
        with_file(&mut state, &job);
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 1,
            at_ms: 0,
        });
        state.apply(Command::GrantLease {
            job_id: job.clone(),
            file: 0,
            worker_id: "w1".into(),
            expires_at_ms: 100_000,
            granted_at_ms: 0,
        });
        // w1 restarts: its lease goes back to pending, kept for it.
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 1,
            at_ms: 40_000,
        });
        let drivers = running(&[&job], &[]);
        assert!(
            plan(&state, &drivers, 40_000 + LEASE_MS - 1, &settings()).is_empty(),
            "w1 was seen within a lease period"
        );
        assert_eq!(
            plan(&state, &drivers, 40_001 + LEASE_MS, &settings()),
            [Action::ForgetAbsentWorkers {
                stale_before_ms: 40_001
            }]
        );
    }

    #[test]
    fn a_lease_its_worker_does_not_report_a_heartbeat_after_the_grant_is_reclaimed_at_once() {
        let mut state = State::default();
        let job = submit(&mut state, "t");
        kicked_off(&mut state, &job);
        with_file(&mut state, &job);
        with_file_named(&mut state, &job, "second");
        state.apply(Command::RegisterWorker {
            worker_id: "w1".into(),
            concurrency: 2,
            at_ms: 0,
        });
        let grant = |state: &mut State, file: u32| {
            let Applied::LeaseGranted(grant) = state.apply(Command::GrantLease {
                job_id: job.clone(),
                file,
                worker_id: "w1".into(),
                expires_at_ms: 200_000,
                granted_at_ms: 50_000,
            }) else {
                panic!("granted");
            };
            grant
        };
        let (held, lost) = (grant(&mut state, 0), grant(&mut state, 1));
        let heartbeat = |state: &mut State, at_ms: u64, leases: &[u64]| {
            state.apply(Command::Heartbeat {
                worker_id: "w1".into(),
                at_ms,
                lease_ids: Some(leases.to_vec()),
            });
        };
        let drivers = running(&[&job], &[]);
        // A report sent before the worker could have heard of the grants proves nothing.
        heartbeat(&mut state, 50_000 + REPORT_GRACE_MS - 1, &[]);
        assert!(plan(&state, &drivers, 60_000, &settings()).is_empty());
        // A heartbeat period later it lists one of them: the other's answer was lost.
        heartbeat(&mut state, 50_000 + REPORT_GRACE_MS, &[held.lease_id]);
        assert_eq!(
            plan(&state, &drivers, 60_000, &settings()),
            [Action::ExpireLease {
                lease_id: lost.lease_id,
                generation: lost.generation
            }],
            "reclaimed long before its expiry at 200 s"
        );
        // A worker that does not report leases keeps them until they expire.
        state.apply(Command::Heartbeat {
            worker_id: "w1".into(),
            at_ms: 70_000,
            lease_ids: None,
        });
        assert_eq!(
            plan(&state, &drivers, 60_000, &settings()).len(),
            1,
            "the last report still counts"
        );
    }

    fn with_file_named(state: &mut State, job_id: &str, name: &str) {
        state.apply(Command::AddFiles {
            job_id: job_id.into(),
            files: vec![ManifestFile {
                kind: FileKind::Output,
                resource_type: Some("Patient".into()),
                url: format!("https://ehr.example/files/{job_id}/{name}").parse().unwrap(),
                count: None,
            }],
            requires_access_token: true,
        });
    }
}
