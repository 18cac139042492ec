use super::*;
use fhirhaul_common::kickoff::ExportRequest;

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
    let Applied::JobSubmitted { job_id } = state.apply(Command::test_submission()) else {
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
        granted_at_ms: 0,
    }) {
        Applied::LeaseGranted(grant) => grant,
        other => panic!("{other:?}"),
    }
}

fn complete(lease: &LeaseGrant) -> Command {
    complete_at(lease, 0)
}

fn complete_at(lease: &LeaseGrant, at_ms: u64) -> Command {
    Command::CompleteLease {
        lease_id: lease.lease_id,
        generation: lease.generation,
        bytes: 10,
        resources: 10,
        sha256: "abc".into(),
        location: "out/x".into(),
        issues: vec![],
        ehr_errors: 0,
        at_ms,
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
        matches!(
            state.apply(starting(1)),
            Applied::Refused(Refusal::NotAwaitingKickoff {
                phase: JobPhase::Polling,
                ..
            })
        ),
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
    // Under <tenant>/<export id>: this job was submitted without one (as log entries
    // written before export ids existed), so its job id stands in.
    assert_eq!(
        names,
        [
            "t/job-1/Patient.1.ndjson",
            "t/job-1/Patient.2.ndjson",
            "t/job-1/Patient.3.ndjson"
        ]
    );
}

#[test]
fn each_export_has_a_directory_of_its_own() {
    let mut state = State::default();
    let mut submit = |export_id: &str| {
        let Applied::JobSubmitted { job_id } = state.apply(Command::SubmitJob {
            tenant: "epic-prod".into(),
            request: ExportRequest::default(),
            max_file_attempts: 1,
            at_ms: 0,
            request_id: None,
            export_id: Some(export_id.into()),
            delete_policy: Default::default(),
        }) else {
            panic!("submitted")
        };
        job_id
    };
    let first = submit("20261202T094700Z-3fa9c01b");
    let second = submit("20261202T094700Z-77d0e412");
    assert_eq!(state.jobs[&first].output_dir(), "epic-prod/20261202T094700Z-3fa9c01b");
    assert_eq!(state.jobs[&second].output_dir(), "epic-prod/20261202T094700Z-77d0e412");
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
    assert_eq!(
        state.apply(complete(&first)),
        Applied::Refused(Refusal::LeaseNotLive {
            lease_id: first.lease_id
        }),
        "the presumed-dead worker is fenced off"
    );
    let renew = Command::RenewLease {
        lease_id: first.lease_id,
        generation: first.generation,
        progress: Checkpoint::default(),
        expires_at_ms: 5000,
    };
    assert!(matches!(state.apply(renew), Applied::Refused(refusal) if refusal.is_fencing()));
    // The same lease with an older generation (a grant the worker never heard of, say).
    let stale = complete(&LeaseGrant {
        generation: second.generation - 1,
        ..second.clone()
    });
    assert_eq!(
        state.apply(stale),
        Applied::Refused(Refusal::StaleGeneration {
            lease_id: second.lease_id,
            generation: second.generation - 1,
            current: second.generation,
        })
    );
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
        category: Category::Content,
        reason: "line 3 is not JSON".into(),
        retryable: false,
        released: false,
        at_ms: 0,
    });
    assert_eq!(
        state.jobs[&job_id].phase,
        JobPhase::Polling,
        "the manifest is not complete yet"
    );
    state.apply(Command::ManifestComplete {
        job_id: job_id.clone(),
        transaction_time: "2024-01-01T00:00:00Z".into(),
        links_expire_ms: None,
    });
    let job = &state.jobs[&job_id];
    assert_eq!(job.phase, JobPhase::Completed);
    assert_eq!(job.files[1].phase, FilePhase::Failed);
    assert_eq!(job.files[1].failure.as_ref().unwrap().0, Category::Content);
    assert_eq!(
        state.tenant_since.get("t"),
        None,
        "a failed file keeps the incremental cursor where it was"
    );
}

#[test]
fn retryable_failures_are_bounded() {
    let (mut state, job_id) = state_with_job(1);
    for attempt in 1..=3 {
        let lease = grant(&mut state, &job_id, 0, "w1");
        state.apply(Command::FailLease {
            lease_id: lease.lease_id,
            generation: lease.generation,
            category: Category::Network,
            reason: "reset".into(),
            retryable: true,
            released: false,
            at_ms: 0,
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
        granted_at_ms: 0,
    };
    let text = serde_json::to_vec(&command).unwrap();
    assert_eq!(serde_json::from_slice::<Command>(&text).unwrap(), command);
}

#[test]
fn waiting_workers_are_given_distinct_files_within_the_tenant_limit() {
    let (mut state, job_id) = state_with_job(3);
    grant(&mut state, &job_id, 2, "w1");
    state.apply(Command::RegisterWorker {
        worker_id: "w1".into(),
        concurrency: 2,
        at_ms: 50,
    });
    // w1's interrupted file 2 is kept for it even though w2 and w3 asked first.
    let picks = state.next_files_for(&["w2", "w3", "w1", "w4"], |_| 10);
    assert_eq!(
        picks,
        [
            Some((job_id.clone(), 0)),
            Some((job_id.clone(), 1)),
            Some((job_id.clone(), 2)),
            None
        ]
    );
    let limited = state.next_files_for(&["w2", "w3", "w1"], |_| 2);
    assert_eq!(
        limited,
        [Some((job_id.clone(), 0)), Some((job_id.clone(), 1)), None],
        "files handed out in one round count toward the limit"
    );
}

#[test]
fn a_grant_nobody_received_goes_back_without_counting_an_attempt() {
    let (mut state, job_id) = state_with_job(1);
    let lease = grant(&mut state, &job_id, 0, "w1");
    assert_eq!(state.jobs[&job_id].files[0].attempts, 1);
    let returned = Command::ReturnLease {
        lease_id: lease.lease_id,
        generation: lease.generation,
    };
    assert_eq!(state.apply(returned.clone()), Applied::Done);
    let file = &state.jobs[&job_id].files[0];
    assert_eq!(file.phase, FilePhase::Pending);
    assert_eq!(file.attempts, 0);
    assert_eq!(file.preferred_worker, None);
    assert!(state.leases.is_empty());
    assert!(
        matches!(state.apply(returned), Applied::Refused(Refusal::LeaseNotLive { .. })),
        "returned once only"
    );
}

/// Submits and kicks off a job from `since` with `files` files (URLs unique to the job).
fn start_job(state: &mut State, since: Option<&str>, files: u32) -> String {
    let Applied::JobSubmitted { job_id } = state.apply(Command::SubmitJob {
        tenant: "t".into(),
        request: ExportRequest {
            since: since.map(String::from),
            ..ExportRequest::default()
        },
        max_file_attempts: 1,
        at_ms: 0,
        request_id: None,
        export_id: None,
        delete_policy: Default::default(),
    }) else {
        panic!("submitted");
    };
    state.apply(Command::KickedOff {
        job_id: job_id.clone(),
        status_url: format!("https://ehr.example/status/{job_id}"),
    });
    state.apply(Command::AddFiles {
        job_id: job_id.clone(),
        files: (0..files)
            .map(|n| ManifestFile {
                url: format!("https://ehr.example/files/{job_id}/{n}").parse().unwrap(),
                ..manifest_file(n)
            })
            .collect(),
        requires_access_token: true,
    });
    state.apply(Command::RegisterWorker {
        worker_id: "w1".into(),
        concurrency: 2,
        at_ms: 0,
    });
    job_id
}

fn cursor(state: &State) -> Option<&str> {
    state.tenant_since.get("t").map(String::as_str)
}

/// Runs a whole job of `files` files from `since` to `reached`: every file downloaded,
/// except the first `fail` of them.
fn run_job(state: &mut State, since: Option<&str>, reached: &str, files: u32, fail: u32) {
    let job_id = start_job(state, since, files);
    let before = cursor(state).map(String::from);
    state.apply(Command::ManifestComplete {
        job_id: job_id.clone(),
        transaction_time: reached.into(),
        links_expire_ms: None,
    });
    if files > 0 {
        assert_eq!(cursor(state), before.as_deref(), "a manifest alone moves nothing");
    }
    for file in 0..files {
        let lease = grant(state, &job_id, file, "w1");
        if file < fail {
            state.apply(Command::FailLease {
                lease_id: lease.lease_id,
                generation: lease.generation,
                category: Category::Network,
                reason: "reset".into(),
                retryable: false,
                released: false,
                at_ms: 0,
            });
        } else {
            state.apply(complete(&lease));
        }
    }
    assert_eq!(state.jobs[&job_id].phase, JobPhase::Completed);
}

#[test]
fn the_incremental_cursor_moves_only_when_every_file_of_a_job_is_downloaded() {
    let mut state = State::default();
    run_job(&mut state, None, "2024-01-01T00:00:00Z", 2, 1);
    assert_eq!(cursor(&state), None, "a job with a failed file leaves the cursor alone");
    run_job(&mut state, None, "2024-02-01T00:00:00Z", 2, 0);
    assert_eq!(cursor(&state), Some("2024-02-01T00:00:00Z"));
    // An incremental export from the cursor moves it on.
    run_job(&mut state, Some("2024-02-01T00:00:00Z"), "2024-03-01T00:00:00Z", 1, 0);
    assert_eq!(cursor(&state), Some("2024-03-01T00:00:00Z"));
    // An older export finishing late never moves it back.
    run_job(&mut state, None, "2024-02-15T00:00:00Z", 1, 0);
    assert_eq!(cursor(&state), Some("2024-03-01T00:00:00Z"));
    // An export that started after the cursor would leave a gap: it does not move it.
    run_job(&mut state, Some("2024-03-05T00:00:00Z"), "2024-04-01T00:00:00Z", 1, 0);
    assert_eq!(cursor(&state), Some("2024-03-01T00:00:00Z"));
    // An export with no files completes at once and moves it.
    run_job(&mut state, None, "2024-05-01T00:00:00Z", 0, 0);
    assert_eq!(cursor(&state), Some("2024-05-01T00:00:00Z"));
}

#[test]
fn a_cancelled_job_never_moves_the_cursor() {
    let mut state = State::default();
    run_job(&mut state, None, "2024-01-01T00:00:00Z", 1, 0);
    let job_id = start_job(&mut state, None, 1);
    state.apply(Command::ManifestComplete {
        job_id: job_id.clone(),
        transaction_time: "2024-07-01T00:00:00Z".into(),
        links_expire_ms: None,
    });
    state.apply(Command::CancelJob { job_id });
    assert_eq!(cursor(&state), Some("2024-01-01T00:00:00Z"));
}

#[test]
fn the_cursor_rule_in_detail() {
    use super::apply::cursor_may_move;
    assert!(cursor_may_move(None, None, "2024-01-01T00:00:00Z"));
    assert!(!cursor_may_move(
        None,
        Some("2023-01-01T00:00:00Z"),
        "2024-01-01T00:00:00Z"
    ));
    assert!(cursor_may_move(
        Some("2024-01-01T00:00:00Z"),
        Some("2024-01-01T00:00:00Z"),
        "2024-02-01T00:00:00Z"
    ));
    // Offsets are compared as instants, not as text.
    assert!(cursor_may_move(
        Some("2024-01-01T01:00:00+01:00"),
        Some("2024-01-01T00:00:00Z"),
        "2024-01-02T00:00:00Z"
    ));
    assert!(!cursor_may_move(
        Some("2024-01-01T00:00:00Z"),
        None,
        "2023-12-31T00:00:00Z"
    ));
    assert!(!cursor_may_move(Some("2024-01-01T00:00:00Z"), None, "not an instant"));
}

#[test]
fn a_refusal_of_the_client_fails_the_whole_job_once_with_the_ehrs_words() {
    let (mut state, job_id) = state_with_job(3);
    let first = grant(&mut state, &job_id, 0, "w1");
    let second = grant(&mut state, &job_id, 1, "w2");
    state.apply(Command::FailLease {
        lease_id: first.lease_id,
        generation: first.generation,
        category: Category::Auth,
        reason: "invalid_client (the key was revoked)".into(),
        retryable: false,
        released: false,
        at_ms: 0,
    });
    let job = &state.jobs[&job_id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert!(job.error.as_deref().unwrap().contains("the key was revoked"));
    assert!(job.files.iter().all(|f| f.phase == FilePhase::Failed));
    assert!(job.files.iter().all(|f| {
        f.failure
            .as_ref()
            .is_some_and(|(c, r)| *c == Category::Auth && r.contains("revoked"))
    }));
    assert!(state.leases.is_empty(), "every lease ended with the job");
    assert!(
        matches!(state.apply(complete(&second)), Applied::Refused(refusal) if refusal.is_fencing()),
        "a worker still downloading is told to stop"
    );
    // A refusal that may pass (a token endpoint that is down) is retried as usual.
    let (mut state, job_id) = state_with_job(1);
    let lease = grant(&mut state, &job_id, 0, "w1");
    state.apply(Command::FailLease {
        lease_id: lease.lease_id,
        generation: lease.generation,
        category: Category::Auth,
        reason: "token endpoint answered 503".into(),
        retryable: true,
        released: false,
        at_ms: 0,
    });
    assert_eq!(state.jobs[&job_id].phase, JobPhase::Polling);
    assert_eq!(state.jobs[&job_id].files[0].phase, FilePhase::Pending);
}

#[test]
fn a_submission_retried_with_its_request_id_creates_one_job() {
    let mut state = State::default();
    let submit = |request_id: Option<&str>| Command::SubmitJob {
        tenant: "t".into(),
        request: ExportRequest::default(),
        max_file_attempts: 1,
        at_ms: 0,
        request_id: request_id.map(String::from),
        export_id: None,
        delete_policy: Default::default(),
    };
    let first = state.apply(submit(Some("cli-7f3a")));
    assert_eq!(first, Applied::JobSubmitted { job_id: "job-1".into() });
    assert_eq!(
        state.apply(submit(Some("cli-7f3a"))),
        Applied::AlreadySubmitted { job_id: "job-1".into() },
        "the retry finds the first attempt's job"
    );
    assert_eq!(state.jobs.len(), 1);
    assert_eq!(
        state.apply(submit(Some("cli-other"))),
        Applied::JobSubmitted { job_id: "job-2".into() }
    );
    assert_eq!(
        state.apply(submit(None)),
        Applied::JobSubmitted { job_id: "job-3".into() }
    );
    assert_eq!(
        state.apply(submit(None)),
        Applied::JobSubmitted { job_id: "job-4".into() }
    );
    // The ids survive a snapshot.
    let restored: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let mut restored = restored;
    assert_eq!(
        restored.apply(submit(Some("cli-7f3a"))),
        Applied::AlreadySubmitted { job_id: "job-1".into() }
    );
}

#[test]
fn the_oldest_job_is_served_first_by_submission_number_not_by_text() {
    let mut state = State::default();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(start_job(&mut state, None, 1));
    }
    assert_eq!(ids[1], "job-2");
    assert_eq!(ids[9], "job-10");
    // Jobs 1 and 3..9 have nothing left; job-10 and job-2 each have a pending file.
    for id in ids.iter().filter(|id| !["job-2", "job-10"].contains(&id.as_str())) {
        let lease = grant(&mut state, id, 0, "w1");
        state.apply(complete(&lease));
    }
    assert_eq!(state.next_file_for("w1", |_| 10), Some(("job-2".into(), 0)));
    assert_eq!(super::queries::job_number("job-10"), 10);
    assert_eq!(super::queries::job_number("other"), u64::MAX);
}

#[test]
fn the_download_phase_runs_from_the_first_lease_to_the_last_file_finished() {
    let (mut state, job_id) = state_with_job(2);
    assert_eq!(state.jobs[&job_id].download_ms(50_000), 0, "nothing leased yet");
    let mut grant_at = |file: u32, at_ms: u64| match state.apply(Command::GrantLease {
        job_id: job_id.clone(),
        file,
        worker_id: "w1".into(),
        expires_at_ms: 100_000,
        granted_at_ms: at_ms,
    }) {
        Applied::LeaseGranted(grant) => grant,
        other => panic!("{other:?}"),
    };
    let first = grant_at(0, 10_000);
    let second = grant_at(1, 12_000);
    assert_eq!(state.jobs[&job_id].download_ms(15_000), 5_000, "running: until now");
    state.apply(complete_at(&first, 14_000));
    state.apply(complete_at(&second, 18_000));
    state.apply(Command::ManifestComplete {
        job_id: job_id.clone(),
        transaction_time: "2024-01-01T00:00:00Z".into(),
        links_expire_ms: None,
    });
    let job = &state.jobs[&job_id];
    assert_eq!(job.phase, JobPhase::Completed);
    assert_eq!(job.download_ms(99_000), 8_000, "ended: until the last file");
}

#[test]
fn grants_in_one_entry_apply_in_order_and_each_is_answered() {
    let (mut state, job_id) = state_with_job(2);
    let request = |file: u32, worker: &str| LeaseRequest {
        job_id: job_id.clone(),
        file,
        worker_id: worker.into(),
        expires_at_ms: 1000,
        granted_at_ms: 10,
    };
    let Applied::Each(outcomes) = state.apply(Command::GrantLeases {
        grants: vec![request(0, "w1"), request(0, "w2"), request(1, "w2")],
    }) else {
        panic!("a batch answers each grant");
    };
    assert!(matches!(&outcomes[0], Applied::LeaseGranted(g) if g.file == 0));
    assert_eq!(
        outcomes[1],
        Applied::Refused(Refusal::FileNotPending {
            job_id: job_id.clone(),
            file: 0
        }),
        "the second grant of one file is refused, the batch goes on"
    );
    assert!(matches!(&outcomes[2], Applied::LeaseGranted(g) if g.file == 1));
    assert_eq!(state.leases_held("w2"), 1);
}

#[test]
fn a_state_loaded_from_a_snapshot_picks_and_counts_as_the_live_one_did() {
    let (mut state, job_id) = state_with_job(6);
    grant(&mut state, &job_id, 0, "w1");
    let done = grant(&mut state, &job_id, 1, "w1");
    state.apply(Command::CompleteLease {
        lease_id: done.lease_id,
        generation: done.generation,
        bytes: 1,
        resources: 1,
        sha256: "00".into(),
        location: "x".into(),
        issues: vec![],
        ehr_errors: 0,
        at_ms: 5,
    });
    grant(&mut state, &job_id, 3, "w1");
    // w1 restarts: files 0 and 3 are kept for it.
    state.apply(Command::RegisterWorker {
        worker_id: "w1".into(),
        concurrency: 2,
        at_ms: 50,
    });
    let live = state.next_files_for(&["w2", "w1", "w1", "w3"], |_| 10);
    assert_eq!(
        live,
        [
            Some((job_id.clone(), 2)),
            Some((job_id.clone(), 0)),
            Some((job_id.clone(), 3)),
            Some((job_id.clone(), 4)),
        ]
    );
    let restored: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(restored.next_files_for(&["w2", "w1", "w1", "w3"], |_| 10), live);
    assert_eq!(restored.jobs[&job_id].files_done(), 1);
    assert_eq!(state.jobs[&job_id].files_done(), 1);
}

#[test]
fn a_finished_job_is_archived_to_its_summary_and_a_running_one_is_not() {
    let mut state = State::default();
    let running = start_job(&mut state, None, 2);
    assert_eq!(
        state.apply(Command::ArchiveJob {
            job_id: running.clone(),
            at_ms: 9,
        }),
        Applied::Refused(Refusal::NotFinished(running.clone()))
    );
    run_job(&mut state, None, "2024-01-01T00:00:00Z", 3, 1);
    let finished = state.jobs.keys().find(|id| **id != running).unwrap().clone();
    let before = state.jobs[&finished].clone();
    assert_eq!(
        state.apply(Command::ArchiveJob {
            job_id: finished.clone(),
            at_ms: 9,
        }),
        Applied::Done
    );
    assert!(!state.jobs.contains_key(&finished), "it left the hot state");
    let summary = &state.archived[&finished];
    assert_eq!(
        (
            summary.phase,
            summary.files_total,
            summary.files_done,
            summary.files_failed
        ),
        (JobPhase::Completed, 3, 2, 1)
    );
    assert_eq!(summary.failures_by_category.get("network"), Some(&1));
    assert_eq!(summary.output_dir, before.output_dir());
    assert_eq!(
        state.take_archived_jobs(),
        vec![before],
        "its files go to this coordinator's archive"
    );
    assert!(state.take_archived_jobs().is_empty());
    let restored: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(restored.archived, state.archived, "the summary is in snapshots");
    assert_eq!(
        state.apply(Command::ArchiveJob {
            job_id: finished.clone(),
            at_ms: 10,
        }),
        Applied::Refused(Refusal::UnknownJob(finished))
    );
}
