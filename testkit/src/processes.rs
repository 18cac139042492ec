//! What the cross-process tests and benches share: child processes that die with the
//! test, the `fhirhaul` binary (a coordinator or a worker started and waited for), free
//! ports, waiting for a job, output hashing, and a TCP link that can be cut.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fhirhaul_proto::v1 as pb;
use sha2::Digest;

/// A child process that is killed when dropped.
pub struct Process(pub Child);

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill_hard(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The `fhirhaul` binary cargo built beside the running test or bench
/// (`target/<profile>/fhirhaul`; the test itself runs from `target/<profile>/deps/`).
pub fn fhirhaul_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let binary = profile_dir.join(format!("fhirhaul{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: run through cargo test/bench, which builds it",
        binary.display()
    );
    binary
}

/// A `fhirhaul` command whose log level follows `FHIRHAUL_TEST_LOG` (default: errors).
pub fn fhirhaul() -> Command {
    let mut command = Command::new(fhirhaul_binary());
    // FHIRHAUL_TEST_LOG=warn shows what the processes say when a test fails.
    command.env(
        "RUST_LOG",
        std::env::var("FHIRHAUL_TEST_LOG").unwrap_or_else(|_| "error".into()),
    );
    command
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every file under `dir` but the export directories' ownership markers.
pub fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n == fhirhaul_worker::sink::EXPORT_MARKER)
        {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls `fetch` (the job as the admin API shows it; `None` while unreachable) every 100 ms
/// until `done` holds; panics after `limit`, naming `what` and the last state seen.
pub async fn wait_for_job<F, Fut>(
    mut fetch: F,
    what: &str,
    limit: std::time::Duration,
    done: impl Fn(&pb::GetJobResponse) -> bool,
) -> pb::GetJobResponse
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<pb::GetJobResponse>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // A call that never answers must not outlast the limit either.
        let job = tokio::time::timeout_at(deadline, fetch()).await.ok().flatten();
        if let Some(job) = &job
            && done(job)
        {
            return job.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            job.map(|j| j.summary)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The job has completed, failed or been cancelled.
pub fn has_ended(job: &pb::GetJobResponse) -> bool {
    job.summary.as_ref().is_some_and(|s| {
        [pb::JobPhase::Completed, pb::JobPhase::Failed, pb::JobPhase::Cancelled]
            .iter()
            .any(|phase| s.phase == *phase as i32)
    })
}

/// The job completed and no file failed (the failures are named otherwise).
pub fn assert_completed(job: &pb::GetJobResponse) {
    let summary = job.summary.clone().expect("a job summary");
    assert_eq!(summary.phase, pb::JobPhase::Completed as i32, "{summary:?}");
    assert_eq!(
        summary.files_failed,
        0,
        "failed files: {:?}",
        job.files.iter().filter_map(|f| f.failure.clone()).collect::<Vec<_>>()
    );
}

/// Starts the simulated EHR, registers a client with a fresh key in `dir`, and returns
/// the EHR and the `[[tenant]]` TOML (tenant `sim`, test-sized polling and backoff) for it.
pub async fn sim_with_tenant(config: fhirhaul_sim::SimConfig, dir: &Path) -> (fhirhaul_sim::SimEhr, String) {
    let sim = fhirhaul_sim::SimEhr::start(config).await.unwrap();
    let credentials = sim.new_client("ES384");
    let tenant = crate::tenant::sim_tenant_toml(sim.base_url(), &credentials, dir);
    (sim, tenant)
}

/// Starts `fhirhaul coordinator` with `config` on 127.0.0.1:`port` and waits until it
/// says it listens. `extra` are further arguments (`--lease-duration 3s`, say).
pub fn spawn_coordinator(config: &Path, port: u16, data_dir: &Path, extra: &[&str]) -> Process {
    let mut child = fhirhaul()
        .arg("coordinator")
        .arg("--config")
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read on a thread, so a coordinator that never says it listens fails the test after a
    // minute instead of hanging it.
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = said.send(line);
    });
    let line = heard.recv_timeout(std::time::Duration::from_secs(60));
    let process = Process(child);
    assert!(
        line.as_ref()
            .is_ok_and(|line| line.contains("coordinator listening on")),
        "the coordinator on port {port} did not start within a minute: {line:?}"
    );
    process
}

/// Starts `fhirhaul worker` `name` (two slots, 16 KiB checkpoints) against
/// `coordinators` (comma-separated), publishing under `out`. `extra` are further
/// arguments (TLS files, say).
pub fn spawn_worker(coordinators: &str, name: &str, out: &Path, state_dir: &Path, extra: &[String]) -> Process {
    let child = fhirhaul()
        .arg("worker")
        .args([
            "--coordinator",
            coordinators,
            "--name",
            name,
            "--concurrency",
            "2",
            "--checkpoint-every",
            "16384",
        ])
        .args(extra)
        .arg("--out")
        .arg(out)
        .arg("--state-dir")
        .arg(state_dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Process(child)
}

/// Where a job's files are: its export's directory under the output root `out`.
pub fn export_dir(out: &Path, job: &pb::GetJobResponse) -> PathBuf {
    let dir = job.summary.as_ref().map(|s| s.output_dir.clone()).unwrap_or_default();
    assert!(!dir.is_empty(), "the job names its output directory: {job:?}");
    out.join(dir)
}

/// Every file the EHR served for its latest export is under `dir` exactly once,
/// byte-identical, and nothing else is there. Returns the number of files.
pub fn assert_output_identical(sim: &fhirhaul_sim::SimEhr, dir: &Path) -> usize {
    let served = sim.served_files(*sim.jobs().last().expect("the EHR ran an export"));
    let mut saved = Vec::new();
    collect_files(dir, &mut saved);
    // `fhirhaul run` writes the export's summary beside its files.
    saved.retain(|path| path.file_name().is_none_or(|n| n != "summary.json"));
    let parts: Vec<_> = saved
        .iter()
        .filter(|p| p.extension().is_none_or(|e| e != "ndjson"))
        .collect();
    assert!(parts.is_empty(), "only finished files are published: {parts:?}");
    let mut hashes: Vec<String> = saved
        .iter()
        .map(|p| hex(&sha2::Sha256::digest(std::fs::read(p).unwrap())))
        .collect();
    hashes.sort();
    let mut expected: Vec<String> = served.iter().map(|f| f.sha256.clone()).collect();
    expected.sort();
    assert_eq!(hashes, expected, "the output is exactly the served files");
    served.len()
}

/// A one-way TCP link on 127.0.0.1 (one coordinator's route to another) that a test can
/// cut: a cut link closes its connections and refuses new ones until it is healed.
pub struct Link {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Connections being copied right now.
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Bumped on every cut, so connections opened before it end at once.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Link {
    pub async fn start(to_port: u16) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let accept_cut = Arc::clone(&cut);
        let accept_epoch = epoch.clone();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept_open = Arc::clone(&open);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if accept_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cuts = accept_epoch.subscribe();
                let open = Arc::clone(&accept_open);
                open.fetch_add(1, Ordering::SeqCst);
                let was_cut = Arc::clone(&accept_cut);
                tokio::spawn(async move {
                    // A cut between the accept and the subscription above is seen here.
                    let live = !was_cut.load(Ordering::SeqCst);
                    if live && let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to_port)).await {
                        // Like the coordinators' own sockets: a proxy that delays small
                        // writes (Nagle) would add ~40 ms to every raft round trip.
                        let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = cuts.changed() => {}
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Link { port, cut, open, epoch }
    }

    /// Cuts the link and returns once every connection through it has ended (a condition,
    /// not a fixed wait, so a busy machine cannot make the cut late).
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|epoch| *epoch += 1);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the link's connections did not end"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
