//! The coordinator at population scale: lease grants and completions for exports of many
//! files and many workers, with nothing downloaded.
//!
//! `cargo bench --bench scale -- [FILES...] [--workers N] [--members 1|3] [--jobs J]`
//! (defaults: 1000 10000 files, 100 workers, one coordinator, 3 consecutive jobs each).
//!
//! For each manifest size it starts coordinator processes (release build, production
//! `snapshot_every`) and the simulated EHR in this process, exporting `Patient` with one
//! resource per file, so the manifest has exactly FILES files. N simulated workers (tasks
//! here, each registered under its own name, sharing a few gRPC connections) each loop:
//! `AcquireLease`, one `RenewLease` with a checkpoint, `CompleteLease`. Nothing is fetched.
//!
//! Baseline, measured in the same run against the same leader: a `Heartbeat` (a committed
//! raft entry, like a grant, but no lease decision). Reported per job: grant latency p50/p99
//! (calls that returned a lease) and their ratio to the heartbeat's, grants+completions per
//! second, the leader's RSS, bytes it wrote to disk per lease (`/proc/<pid>/io`), and the
//! size of its data directory, for the first and the last of the consecutive jobs, and how
//! long `fhirhaul status <job>` takes to list every file. Finished
//! jobs are archived a second after they end (`cluster.archive_after`).

// Benchmarks measure wall time and read /proc directly; clippy.toml lists what the
// simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use fhirhaul_sim::SimConfig;
use fhirhaul_testkit::group::Group;
use tonic::transport::Channel;

/// Finished jobs leave the hot state a second after their last file (production: ten
/// minutes), so consecutive jobs show whether the coordinator's memory and snapshots stay
/// flat.
const ARCHIVE: &str = "archive_after = \"1s\"\n";

struct Args {
    sizes: Vec<u64>,
    workers: usize,
    members: u64,
    jobs: usize,
}

fn args() -> Args {
    let mut args = Args {
        sizes: Vec::new(),
        workers: 100,
        members: 1,
        jobs: 3,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut number = |what: &str| -> u64 {
            words
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match word.as_str() {
            "--workers" => args.workers = number("--workers") as usize,
            "--members" => args.members = number("--members"),
            "--jobs" => args.jobs = number("--jobs") as usize,
            "--bench" => {}
            other => match other.parse() {
                Ok(size) => args.sizes.push(size),
                Err(_) => panic!("unknown argument {other}"),
            },
        }
    }
    if args.sizes.is_empty() {
        args.sizes = vec![1000, 10_000];
    }
    args
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A process's resident memory (KiB) and bytes it has written to storage.
fn process_stats(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let written = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (rss, written)
}

fn dir_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| dir_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(meta) => meta.len(),
        Err(_) => 0,
    }
}

/// Runs `fhirhaul status <job>` against the group, as an operator would, and checks it
/// listed every file (one line each after the job's line); returns its wall time.
fn cli_status(group: &Group, job_id: &str, files: u64) -> f64 {
    let started = Instant::now();
    let output = fhirhaul_testkit::processes::fhirhaul()
        .args(["status", "--coordinator", &group.addresses().join(","), job_id])
        .output()
        .expect("running fhirhaul status");
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fhirhaul status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = stdout.lines().filter(|line| line.starts_with("  ")).count() as u64;
    assert_eq!(listed, files, "fhirhaul status listed every file");
    seconds
}

/// One simulated worker: lease, checkpoint, complete, until `done`.
async fn worker(
    name: String,
    channel: Channel,
    done: Arc<AtomicBool>,
    latencies: Arc<std::sync::Mutex<Vec<Duration>>>,
    completed: Arc<AtomicU64>,
) {
    let mut client = WorkerServiceClient::new(channel);
    while !done.load(Ordering::SeqCst) {
        let asked = Instant::now();
        let answer = client
            .acquire_lease(pb::AcquireLeaseRequest {
                worker_id: name.clone(),
                wait_ms: 1000,
            })
            .await;
        let Ok(Some(lease)) = answer.map(|r| r.into_inner().lease) else {
            continue;
        };
        latencies.lock().unwrap().push(asked.elapsed());
        let checkpoint = pb::Checkpoint {
            offset: 100,
            lines: 1,
            resources: 1,
            etag: None,
            last_modified: None,
        };
        let renewed = client
            .renew_lease(pb::RenewLeaseRequest {
                worker_id: name.clone(),
                lease_id: lease.lease_id.clone(),
                generation: lease.generation,
                progress: Some(checkpoint),
                throttled: 0,
            })
            .await;
        if renewed.is_err() {
            continue;
        }
        let finished = client
            .complete_lease(pb::CompleteLeaseRequest {
                worker_id: name.clone(),
                lease_id: lease.lease_id,
                generation: lease.generation,
                bytes: 200,
                resources: 1,
                sha256: "0".repeat(64),
                location: format!("/bench/{name}"),
                issues: Vec::new(),
                ehr_errors: 0,
                throttled: 0,
            })
            .await;
        if finished.is_ok() {
            completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct JobFigures {
    files: u64,
    seconds: f64,
    grant_p50: Duration,
    grant_p99: Duration,
    rss_mib: f64,
    written_per_lease: f64,
    data_dir_mib: f64,
    /// Of which the archive of finished jobs (expected to grow: it is the record).
    archive_mib: f64,
    snapshot_mib: f64,
    /// `fhirhaul status <job>` (every file, page by page), wall time.
    status_seconds: f64,
}

#[tokio::main]
async fn main() {
    let args = args();
    println!(
        "scale: {} worker(s), {} coordinator(s), {} job(s) per size",
        args.workers, args.members, args.jobs
    );
    for &files in &args.sizes {
        let config = SimConfig {
            patients: files as u32,
            max_resources_per_file: 1,
            job_duration: Duration::from_millis(200),
            ..SimConfig::default()
        };
        let workers = args.workers;
        let group = Group::start_with(config, args.members, Some("30s"), ARCHIVE, move |toml| {
            toml.replace("concurrency = 6", &format!("concurrency = {workers}"))
                + "[tenant.request]\ntypes = [\"Patient\"]\n"
        })
        .await;
        let leader = group.leader_among(&(1..=args.members).collect::<Vec<_>>()).await;
        let pid = group.coordinators[&leader].pid();
        let data_dir = group.dir.path().join(format!("coordinator-{leader}"));
        let channels: Vec<Channel> = (0..workers.clamp(1, 16)).map(|_| group.direct(leader)).collect();

        // Register every worker, and measure the baseline: a heartbeat is one committed
        // entry through the same server, without a lease decision.
        let mut client = WorkerServiceClient::new(channels[0].clone());
        for n in 0..workers {
            client
                .register(pb::RegisterRequest {
                    name: format!("w{n}"),
                    concurrency: 1,
                })
                .await
                .expect("registering a worker");
        }
        let mut heartbeats = Vec::new();
        for _ in 0..200 {
            let sent = Instant::now();
            client
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: "w0".into(),
                    ..Default::default()
                })
                .await
                .expect("heartbeat");
            heartbeats.push(sent.elapsed());
        }
        heartbeats.sort();
        let (beat_p50, beat_p99) = (percentile(&heartbeats, 0.5), percentile(&heartbeats, 0.99));

        let mut figures = Vec::new();
        for _ in 0..args.jobs {
            let job_id = group.submit().await;
            let listed = group
                .wait_for(&job_id, "the manifest", |job| {
                    job.summary
                        .as_ref()
                        .is_some_and(|s| s.phase == pb::JobPhase::Downloading as i32)
                })
                .await;
            let listed = listed.summary.map(|s| u64::from(s.files_total));
            assert_eq!(listed, Some(files), "one file per patient");
            let (_, written_before) = process_stats(pid);
            let done = Arc::new(AtomicBool::new(false));
            let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
            let completed = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let tasks: Vec<_> = (0..workers)
                .map(|n| {
                    tokio::spawn(worker(
                        format!("w{n}"),
                        channels[n % channels.len()].clone(),
                        Arc::clone(&done),
                        Arc::clone(&latencies),
                        Arc::clone(&completed),
                    ))
                })
                .collect();
            while completed.load(Ordering::SeqCst) < files {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let seconds = started.elapsed().as_secs_f64();
            done.store(true, Ordering::SeqCst);
            for task in tasks {
                let _ = task.await;
            }
            group.wait_completed(&job_id).await;
            let (rss, written_after) = process_stats(pid);
            let status_seconds = cli_status(&group, &job_id, files);
            let mut latencies = latencies.lock().unwrap().clone();
            latencies.sort();
            figures.push(JobFigures {
                files,
                seconds,
                grant_p50: percentile(&latencies, 0.5),
                grant_p99: percentile(&latencies, 0.99),
                rss_mib: rss as f64 / 1024.0,
                written_per_lease: written_after.saturating_sub(written_before) as f64 / files as f64,
                data_dir_mib: dir_bytes(&data_dir) as f64 / (1024.0 * 1024.0),
                archive_mib: dir_bytes(&data_dir.join("archive")) as f64 / (1024.0 * 1024.0),
                snapshot_mib: std::fs::metadata(data_dir.join("raft-snapshot.bin"))
                    .map(|m| m.len())
                    .unwrap_or(0) as f64
                    / (1024.0 * 1024.0),
                status_seconds,
            });
        }
        println!(
            "\n{files} files; baseline heartbeat p50 {} p99 {}",
            ms(beat_p50),
            ms(beat_p99)
        );
        println!(
            "| job | grants+completions/s | grant p50 (× heartbeat) | grant p99 (× heartbeat) | leader RSS | written per lease | data dir (archive) | snapshot | `fhirhaul status <job>` |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (n, f) in figures.iter().enumerate() {
            println!(
                "| {} | {:.0} | {} ({:.1}×) | {} ({:.1}×) | {:.0} MiB | {:.1} KB | {:.1} MiB ({:.1}) | {:.1} MiB | {:.1} s |",
                n + 1,
                2.0 * f.files as f64 / f.seconds,
                ms(f.grant_p50),
                f.grant_p50.as_secs_f64() / beat_p50.as_secs_f64().max(1e-9),
                ms(f.grant_p99),
                f.grant_p99.as_secs_f64() / beat_p99.as_secs_f64().max(1e-9),
                f.rss_mib,
                f.written_per_lease / 1000.0,
                f.data_dir_mib,
                f.archive_mib,
                f.snapshot_mib,
                f.status_seconds,
            );
        }
        drop(group);
    }
}
