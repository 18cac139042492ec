//! Failover time: from the raft leader's death (SIGKILL) to a new leader granting a lease.
//!
//! `cargo bench --bench failover` (optionally `-- <rounds>`, default 5). It starts three
//! coordinator processes with default settings (100 ms raft tick, election timeouts of
//! 10-19 ticks spread by node id, 30 s leases) and the simulated EHR, submits an export with
//! more files than rounds, and registers itself as a worker. Each round it kills the
//! leader, then asks for a lease through the client every worker uses (which finds the
//! leader by itself) until one is granted, and reports the elapsed time; then the killed
//! coordinator is restarted and caught up before the next round.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use fhirhaul_sim::SimConfig;
use fhirhaul_testkit::group::Group;

/// Asks for a lease and, once granted, gives it straight back (released, not failed), so
/// the tenant's concurrency limit never runs out over the rounds.
async fn acquire(group: &Group, wait_ms: u64) -> Option<pb::Lease> {
    let cluster = group.cluster();
    let lease = cluster
        .call(|channel| {
            let request = cluster.request(pb::AcquireLeaseRequest {
                worker_id: "bench".into(),
                wait_ms,
            });
            async move { WorkerServiceClient::new(channel).acquire_lease(request).await }
        })
        .await
        .ok()
        .and_then(|response| response.into_inner().lease)?;
    let released = cluster
        .call(|channel| {
            let request = cluster.request(pb::FailLeaseRequest {
                worker_id: "bench".into(),
                lease_id: lease.lease_id.clone(),
                generation: lease.generation,
                category: pb::FailureCategory::Cancelled as i32,
                reason: "benchmark gives the lease back".into(),
                released: true,
                retryable: Some(true),
                throttled: 0,
            });
            async move { WorkerServiceClient::new(channel).fail_lease(request).await }
        })
        .await;
    released.expect("giving the lease back");
    Some(lease)
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    let config = SimConfig {
        patients: 200,
        max_resources_per_file: 5,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    };
    let mut group = Group::start(config, 3, None).await;
    group.leader_among(&[1, 2, 3]).await;
    let cluster = group.cluster();
    cluster
        .call(|channel| {
            let request = cluster.request(pb::RegisterRequest {
                name: "bench".into(),
                concurrency: 1,
            });
            async move { WorkerServiceClient::new(channel).register(request).await }
        })
        .await
        .expect("registering the bench worker");
    let job_id = group.submit().await;
    group
        .wait_for(&job_id, "files to lease", |job| job.files.len() > rounds * 2)
        .await;
    assert!(acquire(&group, 5_000).await.is_some(), "a lease before any failure");

    let mut elections = Vec::new();
    let mut failovers = Vec::new();
    for round in 1..=rounds {
        let leader = group.leader_among(&[1, 2, 3]).await;
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
        let killed = Instant::now();
        group.kill(leader);
        let (elected, granted) = tokio::join!(
            async {
                group.leader_among(&others).await;
                killed.elapsed()
            },
            async {
                loop {
                    if acquire(&group, 1_000).await.is_some() {
                        return killed.elapsed();
                    }
                }
            }
        );
        println!(
            "round {round}: killed coordinator {leader}; new leader after {:.2} s, first lease after {:.2} s",
            elected.as_secs_f64(),
            granted.as_secs_f64()
        );
        elections.push(elected);
        failovers.push(granted);
        group.start_coordinator(leader);
        let now_leading = group.leader_among(&others).await;
        group.wait_caught_up(leader, now_leading).await;
    }
    elections.sort();
    failovers.sort();
    let median = |v: &[Duration]| v[v.len() / 2].as_secs_f64();
    println!(
        "failover over {rounds} rounds: leader elected median {:.2} s (max {:.2} s); \
         lease granted median {:.2} s (max {:.2} s); target < 5 s",
        median(&elections),
        elections.last().unwrap().as_secs_f64(),
        median(&failovers),
        failovers.last().unwrap().as_secs_f64()
    );
}
