//! Three (then four) coordinator processes in one raft group on 127.0.0.1, with workers and
//! the simulated EHR (in this process, so its observations can be asserted); see
//! [`fhirhaul_testkit::group::Group`].

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_client::AdminServiceClient;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use fhirhaul_sim::SimConfig;
use fhirhaul_testkit::group::{Group, address};
use fhirhaul_testkit::processes::{self, assert_output_identical, export_dir, free_port};

fn phase(job: &pb::GetJobResponse) -> i32 {
    job.summary.as_ref().map(|s| s.phase).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_while_polling_and_again_while_downloading_loses_nothing() {
    let config = SimConfig {
        patients: 100,
        max_resources_per_file: 12,
        job_duration: Duration::from_secs(4),
        ..SimConfig::default()
    };
    let mut group = Group::start(config, 3, Some("3s")).await;
    let first = group.leader_among(&[1, 2, 3]).await;
    for name in ["w1", "w2", "w3"] {
        group.start_worker(name);
    }
    let job_id = group.submit().await;
    group
        .wait_for(&job_id, "polling", |job| phase(job) == pb::JobPhase::Polling as i32)
        .await;
    assert_eq!(group.sim.observed().kickoffs.len(), 1);

    // The leader dies while the EHR is still preparing the export.
    group.kill(first);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != first).collect();
    let second = group.leader_among(&others).await;
    group.start_coordinator(first);

    // And the next one dies in the middle of the downloads.
    group.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(200_000));
    group
        .wait_for(&job_id, "downloads under way", |job| {
            let summary = job.summary.clone().unwrap_or_default();
            phase(job) == pb::JobPhase::Downloading as i32 && summary.files_done >= 3
        })
        .await;
    group.kill(second);
    group.sim.set_faults(|f| f.throttle_bytes_per_sec = None);
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != second).collect();
    let third = group.leader_among(&survivors).await;

    let job = group.wait_completed(&job_id).await;
    assert_eq!(
        group.sim.observed().kickoffs.len(),
        1,
        "two leader failures, one kick-off: the new leaders polled the committed status URL"
    );
    let files = assert_output_identical(&group.sim, &export_dir(&group.dir.path().join("out"), &job));
    assert!(files >= 50, "only {files} files");
    assert_eq!(job.files.len(), files);

    // The coordinator killed second comes back and catches up with the one leading now.
    group.start_coordinator(second);
    group.wait_caught_up(second, third).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_coordinator_cannot_grant_leases_or_change_state_and_catches_up() {
    let config = SimConfig {
        patients: 30,
        max_resources_per_file: 10,
        job_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let group = Group::start(config, 3, Some("3s")).await;
    let isolated = group.leader_among(&[1, 2, 3]).await;
    // An export with files waiting (there are no workers), and a worker that may lease them.
    let job_id = group.submit().await;
    group
        .wait_for(&job_id, "files waiting", |job| {
            phase(job) == pb::JobPhase::Downloading as i32
        })
        .await;
    let cluster = group.cluster();
    cluster
        .call(|channel| {
            let request = cluster.request(pb::RegisterRequest {
                name: "probe".into(),
                concurrency: 1,
            });
            async move { WorkerServiceClient::new(channel).register(request).await }
        })
        .await
        .unwrap();

    // Cut the leader off from both others, both ways.
    for ((from, to), link) in &group.links {
        if *from == isolated || *to == isolated {
            link.cut().await;
        }
    }
    let mut worker = WorkerServiceClient::new(group.direct(isolated));
    let lease = worker
        .acquire_lease(pb::AcquireLeaseRequest {
            worker_id: "probe".into(),
            wait_ms: 2_000,
        })
        .await;
    assert!(
        lease.as_ref().map(|r| r.get_ref().lease.is_none()).unwrap_or(true),
        "an isolated coordinator granted a lease: {lease:?}"
    );
    let submitted = AdminServiceClient::new(group.direct(isolated))
        .submit_export(pb::SubmitExportRequest {
            tenant: "sim".into(),
            request_json: String::new(),
            incremental: false,
            request_id: String::new(),
        })
        .await;
    assert!(
        submitted.is_err(),
        "an isolated coordinator accepted an export: {submitted:?}"
    );
    let isolated_status = group.status_of(isolated).await.unwrap();
    assert_ne!(isolated_status.role, "leader", "it stepped down without a quorum");

    // The other two elect a leader and go on.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != isolated).collect();
    let leader = group.leader_among(&others).await;
    let second_job = group.submit().await;
    assert_ne!(second_job, job_id);

    for link in group.links.values() {
        link.heal();
    }
    let caught_up = group.wait_caught_up(isolated, leader).await;
    assert!(caught_up.term > isolated_status.term || caught_up.term >= 2);
    let cluster = group.cluster();
    let jobs = cluster
        .call(|channel| {
            let request = cluster.request(pb::ListJobsRequest {});
            async move { AdminServiceClient::new(channel).list_jobs(request).await }
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(
        ids,
        [job_id.as_str(), second_job.as_str()],
        "only the majority's exports exist"
    );
    let job = group.job(&job_id).await.unwrap();
    assert!(
        job.files.iter().all(|f| f.worker_id.as_deref() != Some("probe")),
        "no lease from the isolated coordinator survived"
    );
    group
        .wait_for(&second_job, "the majority's export to be kicked off", |job| {
            phase(job) != pb::JobPhase::Submitted as i32
        })
        .await;
    assert_eq!(group.sim.observed().kickoffs.len(), 2, "one kick-off per export");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_added_at_run_time_catches_up_from_a_snapshot_and_can_lead() {
    let config = SimConfig {
        patients: 60,
        max_resources_per_file: 12,
        job_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let mut group = Group::start(config, 3, Some("3s")).await;
    let leader = group.leader_among(&[1, 2, 3]).await;
    for name in ["w1", "w2"] {
        group.start_worker(name);
    }
    let first_job = group.submit().await;
    group.wait_completed(&first_job).await;
    let before = group.status_of(leader).await.unwrap();
    assert!(before.snapshot_index > 0, "the log was compacted: {before:?}");

    // Coordinator 4 starts empty, waiting to be added; workers were told only of 1-3.
    group.ports.insert(4, free_port());
    group.write_config(4, true);
    group.start_coordinator(4);
    let cluster = group.cluster();
    let members = cluster
        .call(|channel| {
            let request = cluster.request(pb::AddCoordinatorRequest {
                node_id: 4,
                address: address(group.ports[&4]),
            });
            async move { AdminServiceClient::new(channel).add_coordinator(request).await }
        })
        .await
        .unwrap()
        .into_inner()
        .coordinators;
    assert!(members.iter().any(|m| m.node_id == 4 && m.voter), "{members:?}");
    let joined = group.wait_caught_up(4, leader).await;
    assert!(
        joined.snapshot_index >= before.snapshot_index,
        "coordinator 4 started from a snapshot: {joined:?}"
    );
    assert_eq!(joined.voters.len(), 4);

    cluster
        .call(|channel| {
            let request = cluster.request(pb::TransferLeadershipRequest { node_id: 4 });
            async move { AdminServiceClient::new(channel).transfer_leadership(request).await }
        })
        .await
        .unwrap();
    assert_eq!(group.leader_among(&[4]).await, 4);

    // Workers find the new leader through redirects and the next export completes under it.
    let second_job = group.submit().await;
    let second = group.wait_completed(&second_job).await;
    assert_output_identical(&group.sim, &export_dir(&group.dir.path().join("out"), &second));
    assert_eq!(group.status_of(4).await.unwrap().role, "leader");
    assert_eq!(group.sim.observed().kickoffs.len(), 2);

    // The operator's view, and retiring coordinator 1 from the group.
    let output = processes::fhirhaul()
        .args(["cluster", "status", "--coordinator", &group.addresses().join(",")])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{shown}");
    assert_eq!(shown.matches("is leader").count(), 1, "{shown}");
    assert!(shown.contains("coordinator 4 is leader"), "{shown}");
    let output = processes::fhirhaul()
        .args([
            "cluster",
            "remove",
            "--node-id",
            "1",
            "--coordinator",
            &address(group.ports[&2]),
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut remaining = group.status_of(4).await.unwrap().voters;
    remaining.sort();
    assert_eq!(remaining, ["2", "3", "4"], "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_leaves_the_hot_state_and_still_answers_with_its_files_then_its_summary() {
    let config = SimConfig {
        patients: 40,
        max_resources_per_file: 12,
        job_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let mut group = Group::start_with(
        config,
        3,
        Some("3s"),
        "snapshot_every = 20\narchive_after = \"1s\"\n",
        |toml| toml,
    )
    .await;
    group.leader_among(&[1, 2, 3]).await;
    for name in ["w1", "w2"] {
        group.start_worker(name);
    }
    let job_id = group.submit().await;
    let finished = group.wait_completed(&job_id).await;
    assert!(finished.files.len() > 3);

    // Every coordinator writes the archived job's files to its own archive.
    let archived = |id: u64| {
        group
            .dir
            .path()
            .join(format!("coordinator-{id}"))
            .join("archive")
            .join(format!("{job_id}.json"))
    };
    for _ in 0..200 {
        if (1..=3).all(|id| archived(id).exists()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!((1..=3).all(|id| archived(id).exists()), "archived on every coordinator");

    let after = group.job(&job_id).await.expect("an archived job still answers");
    assert_eq!(after.summary, finished.summary, "the same summary");
    assert_eq!(after.files, finished.files, "and the same files, from the archive");
    let listed = AdminServiceClient::new(group.direct(group.leader_among(&[1, 2, 3]).await))
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed, vec![finished.summary.clone().unwrap()], "listed by its summary");

    // A coordinator without the archived files (one that caught up from a later snapshot)
    // answers with the summary alone, never with an empty job.
    for id in 1..=3 {
        std::fs::remove_file(archived(id)).unwrap();
    }
    let summary_only = group.job(&job_id).await.expect("the summary still answers");
    assert_eq!(summary_only.summary, finished.summary);
    assert!(summary_only.files.is_empty() && summary_only.next_file_offset.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ehr_that_throttles_is_given_fewer_files_at_once_and_the_export_still_completes() {
    let config = SimConfig {
        patients: 30,
        max_resources_per_file: 2,
        job_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    // The tenant may download six files at once (three workers of two slots each)...
    let mut group = Group::start(config, 1, Some("10s")).await;
    // ...but the EHR serves two at a time, slowly, and answers 429 to the rest.
    group.sim.set_faults(|f| {
        f.max_concurrent_files = Some(2);
        f.throttle_bytes_per_sec = Some(8_000);
    });
    let leader = group.leader_among(&[1]).await;
    for name in ["w1", "w2", "w3"] {
        group.start_worker(name);
    }
    let job_id = group.submit().await;
    let concurrency = || async {
        group
            .status_of(leader)
            .await
            .and_then(|status| status.tenant_concurrency.get("sim").copied())
    };
    assert_eq!(concurrency().await, Some(6), "it starts at the configured value");
    let mut lowered = None;
    for _ in 0..600 {
        if let Some(now) = concurrency().await
            && now <= 2
        {
            lowered = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let observed = group.sim.observed();
    assert!(
        lowered.is_some(),
        "the limit came down to the EHR's ({} refusals so far)",
        observed.concurrency_refusals
    );
    assert!(observed.concurrency_refusals > 0, "the EHR did throttle");
    let job = group.wait_completed(&job_id).await;
    assert!(job.summary.unwrap().files_failed == 0);
}
