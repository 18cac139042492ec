//! What a leader's death costs an export, and how soon a submitted job reaches the EHR.
//!
//! `cargo bench --bench stall -- [KILLS] [--baseline N]` (defaults: 20 kills, 5 baseline
//! exports).
//!
//! Three coordinator processes (release build, production lease of 30 s), two worker
//! processes of two slots, and the simulated EHR in this process, serving each file
//! response at a capped rate so one export's downloads take several seconds. Baseline,
//! in the same run: undisturbed exports, submit → completed. Then, per kill: an export is
//! submitted, and once three files are done the leader is SIGKILLed (and restarted, as a
//! supervisor would); the export's completion is compared with the baseline median.
//! A new leader that waited for an orphaned lease to expire would add up to a lease
//! period (30 s); one that reclaims leases no live worker reports holding adds about a
//! heartbeat. Also reported: submit → the EHR's kick-off, for every export.

// Benchmarks measure wall time and read /proc directly; clippy.toml lists what the
// simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use fhirhaul_sim::SimConfig;
use fhirhaul_testkit::group::Group;

struct Args {
    kills: usize,
    baseline: usize,
}

fn args() -> Args {
    let mut args = Args { kills: 20, baseline: 5 };
    let mut given = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = given.next() {
        match arg.as_str() {
            "--baseline" => args.baseline = given.next().and_then(|n| n.parse().ok()).unwrap_or(args.baseline),
            other => {
                if let Ok(kills) = other.parse() {
                    args.kills = kills;
                }
            }
        }
    }
    args
}

/// One export: submit → the EHR's kick-off, and submit → completed.
struct Run {
    to_kickoff: Duration,
    to_complete: Duration,
}

/// Submits an export; `during` runs once three of its files are done. Returns the timings.
async fn export(group: &mut Group, during: impl AsyncFnOnce(&mut Group)) -> Run {
    let kickoffs_before = group.sim.observed().kickoffs.len();
    let submitted = Instant::now();
    let submitted_tokio = tokio::time::Instant::now();
    let job_id = group.submit().await;
    group
        .wait_for(&job_id, "three files done", |job| {
            job.summary.as_ref().is_some_and(|s| s.files_done >= 3)
        })
        .await;
    during(group).await;
    group.wait_completed(&job_id).await;
    let to_complete = submitted.elapsed();
    let kickoff = group.sim.observed().kickoffs[kickoffs_before].at;
    Run {
        to_kickoff: kickoff.saturating_duration_since(submitted_tokio),
        to_complete,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let args = args();
    let config = SimConfig {
        patients: 120,
        max_resources_per_file: 10,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    };
    let mut group = Group::start(config, 3, Some("30s")).await;
    group.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(50_000));
    group.leader_among(&[1, 2, 3]).await;
    for name in ["w1", "w2"] {
        group.start_worker(name);
    }

    let mut baseline = Vec::new();
    let mut to_kickoff = Vec::new();
    for n in 1..=args.baseline {
        let run = export(&mut group, async |_| {}).await;
        println!(
            "baseline {n}: completed in {}, kick-off after {:.1} ms",
            secs(run.to_complete),
            run.to_kickoff.as_secs_f64() * 1000.0
        );
        baseline.push(run.to_complete);
        to_kickoff.push(run.to_kickoff);
    }
    baseline.sort();
    let undisturbed = percentile(&baseline, 0.5);

    let mut delays = Vec::new();
    for n in 1..=args.kills {
        let run = export(&mut group, async |group| {
            let leader = group.leader_among(&[1, 2, 3]).await;
            group.kill(leader);
            group.start_coordinator(leader);
        })
        .await;
        let delay = run.to_complete.saturating_sub(undisturbed);
        println!(
            "kill {n}: completed in {} ({} over the baseline median)",
            secs(run.to_complete),
            secs(delay)
        );
        delays.push(delay);
        to_kickoff.push(run.to_kickoff);
        // Let the restarted coordinator catch up before the next round.
        let leader = group.leader_among(&[1, 2, 3]).await;
        for id in [1, 2, 3].into_iter().filter(|id| *id != leader) {
            group.wait_caught_up(id, leader).await;
        }
    }
    delays.sort();
    to_kickoff.sort();
    let spread = baseline.last().copied().unwrap_or_default() - baseline.first().copied().unwrap_or_default();
    println!("\n| measure | value |\n|---|---|");
    println!(
        "| undisturbed export, median of {} (spread) | {} ({}) |",
        baseline.len(),
        secs(undisturbed),
        secs(spread)
    );
    if !delays.is_empty() {
        println!(
            "| leader killed mid-download, {} kills: added delay p50 / p99 / max | {} / {} / {} |",
            delays.len(),
            secs(percentile(&delays, 0.5)),
            secs(percentile(&delays, 0.99)),
            secs(*delays.last().unwrap())
        );
    }
    println!(
        "| submit → the EHR's kick-off, {} exports: p50 / max | {:.1} ms / {:.1} ms |",
        to_kickoff.len(),
        percentile(&to_kickoff, 0.5).as_secs_f64() * 1000.0,
        to_kickoff.last().unwrap().as_secs_f64() * 1000.0
    );
}
