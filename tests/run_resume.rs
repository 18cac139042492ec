//! `fhirhaul run` as a user interrupts it: Ctrl-C (SIGINT) while the export is polled and
//! again while its files download. Each interrupted run stops within 2 s keeping its
//! state; the same command then carries on with the same export (no new kick-off,
//! partial files resumed with Range) and ends with files identical to what the EHR served.

// Tests set up files and measure wall time directly; clippy.toml lists what the simulated
// crates may not call.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fhirhaul_sim::{SimConfig, SimEhr};
use fhirhaul_testkit::processes::{assert_output_identical, fhirhaul, sim_with_tenant};

fn start_run(config: &Path, out: &Path) -> Child {
    fhirhaul()
        .args(["run", "--workers", "2", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends SIGINT and returns how long the run took to exit, and its exit code.
async fn interrupt(mut child: Child) -> (Duration, Option<i32>, String) {
    let sent = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the interrupted run did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = sent.elapsed();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    (took, status.code(), stdout)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn export_dirs(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out.join("sim"))
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.file_name().is_some_and(|n| n != ".fhirhaul"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_resumes_the_same_export_without_a_second_kickoff() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, tenant) = sim_with_tenant(
        SimConfig {
            patients: 120,
            max_resources_per_file: 1000,
            job_duration: Duration::from_secs(3),
            // Identity bytes, so a throttled body yields whole lines as it comes.
            compress: false,
            ..SimConfig::default()
        },
        dir.path(),
    )
    .await;
    let config = dir.path().join("fhirhaul.toml");
    std::fs::write(&config, &tenant).unwrap();
    let out = dir.path().join("out");

    // 1. Interrupted while the export is being polled.
    let run = start_run(&config, &out);
    wait_until("the kick-off", Duration::from_secs(30), || {
        !sim.observed().kickoffs.is_empty()
    })
    .await;
    let (took, code, stdout) = interrupt(run).await;
    assert!(took < Duration::from_secs(2), "stopping took {took:?}: {stdout}");
    assert_eq!(code, Some(130), "{stdout}");
    assert!(stdout.contains("Run the same command again to resume"), "{stdout}");

    // 2. Interrupted again while files download (slowly).
    // Files of a few hundred KB sent in 64 KiB chunks at 150 KB/s: each takes seconds, so
    // the interrupt finds them half-way.
    sim.set_faults(|f| f.throttle_bytes_per_sec = Some(150_000));
    let run = start_run(&config, &out);
    wait_until("downloads", Duration::from_secs(60), || {
        sim.observed().file_requests.iter().filter(|r| r.status < 300).count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (took, code, stdout) = interrupt(run).await;
    assert!(stdout.contains("no new kick-off"), "the second run resumed: {stdout}");
    assert!(took < Duration::from_secs(2), "stopping took {took:?}: {stdout}");
    assert_eq!(code, Some(130), "{stdout}");
    let requests_before = sim.observed().file_requests.len();

    // 3. The same command once more finishes the export.
    sim.set_faults(|f| f.throttle_bytes_per_sec = None);
    let finished = fhirhaul()
        .args(["run", "--workers", "2", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&finished.stdout);
    assert!(
        finished.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(stdout.contains("no new kick-off"), "{stdout}");
    let observed = sim.observed();
    assert_eq!(observed.kickoffs.len(), 1, "one export at the EHR across three runs");
    assert!(
        observed.file_requests[requests_before..]
            .iter()
            .any(|r| r.range.is_some()),
        "partial files continued with Range requests"
    );
    let exports = export_dirs(&out);
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_output_identical(&sim, &exports[0]);
    assert!(exports[0].join("summary.json").is_file());
    drop::<SimEhr>(sim);
}

/// A simulated EHR of `patients` whose exports are ready in 200 ms, and its tenant (TOML).
async fn quick_sim(patients: u32, dir: &Path) -> (SimEhr, String) {
    let config = SimConfig {
        patients,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    };
    sim_with_tenant(config, dir).await
}

/// Runs `fhirhaul run` to its end against `sim` with `tenant` (TOML), returning its exit
/// code and output.
fn run_to_end(tenant: &str, dir: &Path, name: &str) -> (Option<i32>, String) {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, tenant).unwrap();
    let finished = fhirhaul()
        .args(["run", "--workers", "2", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.join(name))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&finished.stdout).into_owned();
    (finished.status.code(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_sends_the_exports_delete_before_it_exits_and_only_when_every_file_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, tenant) = quick_sim(20, dir.path()).await;
    let tenant = tenant.replace("concurrency = 6", "concurrency = 6\ndelete_when_done = true");

    let (code, stdout) = run_to_end(&tenant, dir.path(), "whole");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(sim.observed().deletes, 1, "DELETE sent before the run exited: {stdout}");
    assert!(stdout.contains("the export was DELETEd at the EHR"), "{stdout}");

    // A file fails: the export stays at the EHR, so that file can still be fetched.
    sim.set_faults(|f| f.malformed_line = Some(("Patient".into(), 3)));
    let (code, stdout) = run_to_end(&tenant, dir.path(), "with-a-failure");
    assert_eq!(code, Some(2), "some files failed: {stdout}");
    assert_eq!(sim.observed().deletes, 1, "no DELETE for an export with a failed file");
    assert!(stdout.contains("delete_after_failure is off"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_the_ehr_reports_are_printed_counted_apart_and_change_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, tenant) = quick_sim(20, dir.path()).await;
    sim.set_faults(|f| f.unexported_resources = 2);
    let (code, stdout) = run_to_end(&tenant, dir.path(), "reported");
    assert_eq!(
        code,
        Some(3),
        "every file arrived, but the EHR reports errors: {stdout}"
    );
    assert!(stdout.contains("the EHR reports 2 error(s)"), "{stdout}");
    assert!(
        stdout.contains("Observation/unreadable-1 could not be exported"),
        "{stdout}"
    );
    assert!(stdout.contains(", 2 EHR error record(s)"), "{stdout}");
    let exported: u64 = sim
        .served_files(1)
        .iter()
        .filter(|f| f.kind == "output")
        .map(|f| f.count)
        .sum();
    assert!(
        stdout.contains(&format!(" {exported} resources,")),
        "resources count only output files ({exported}): {stdout}"
    );
    // Everything the run wrote (files, summary, state) only its owner can open.
    let mut checked = 0;
    let mut pending = vec![dir.path().join("reported")];
    while let Some(path) = pending.pop() {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o077;
        if meta.is_dir() {
            assert_eq!(mode, 0, "{} is open to others", path.display());
            // The state directory is closed; what sled makes inside it is sled's.
            if path.file_name().is_some_and(|n| n != ".fhirhaul") {
                pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "ndjson" || e == "json" || e == "pem")
        {
            assert_eq!(mode, 0, "{} is open to others", path.display());
            checked += 1;
        }
    }
    assert!(checked > 3, "exported files, summary and key were checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_run_logged_at_trace_shows_no_token_assertion_cluster_token_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, tenant) = quick_sim(10, dir.path()).await;
    let config = dir.path().join("trace.toml");
    std::fs::write(&config, &tenant).unwrap();
    let cluster_token = "cluster-token-that-must-never-be-logged-7f3a";
    let finished = fhirhaul()
        .args(["run", "--workers", "2", "--log", "trace", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("out"))
        .env("FHIRHAUL_CLUSTER_TOKEN", cluster_token)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&finished.stdout),
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(finished.status.success(), "{}", &log[log.len().saturating_sub(3000)..]);
    assert!(log.lines().count() > 100, "the run logged at trace level");
    let secrets = sim.observed().secrets_seen;
    assert!(secrets.len() >= 2, "an assertion and a token at least");
    let key = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pem"))
        .expect("the client's key");
    let key = std::fs::read_to_string(key).unwrap();
    let key_lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for (what, secret) in secrets
        .iter()
        .map(|s| ("an access token or assertion", s.as_str()))
        .chain([("the cluster token", cluster_token)])
        .chain(key_lines.iter().map(|l| ("a line of the private key", *l)))
    {
        // A JWT's signature alone identifies it; a token is short and random.
        let needle = secret.rsplit('.').next().unwrap_or(secret);
        assert!(!log.contains(needle), "{what} appears in the trace log");
    }
}
