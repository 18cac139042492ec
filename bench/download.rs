//! Download throughput with full validation against a plain download of the same bytes.
//!
//! `cargo bench --bench download` (optionally `-- <megabytes>`, default 1100). It starts the
//! simulated EHR on loopback with one Observation file of about that size (uncompressed),
//! then alternates, twice each:
//!
//! - **plain**: GET the file and write it to disk, nothing else (the ceiling);
//! - **fhirhaul**: the client core's `download_file`: every line parsed as a JSON object,
//!   its `resourceType` checked, counted, SHA-256 hashed, written to `.part`, synced and
//!   renamed.
//!
//! It prints the best throughput of each, their ratio, and the peak resident memory during
//! each fhirhaul download of a small and of the large file (Linux `VmHWM`, reset before
//! each run through `/proc/self/clear_refs`), to show memory does not grow with file size.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirhaul_common::client::{Auth, FhirClient};
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_common::download::{DownloadOptions, DownloadSettings, download_file};
use fhirhaul_common::http::{HttpRequest, ReqwestTransport, TransportSettings};
use fhirhaul_common::kickoff::{ExportRequest, ServerProfile};
use fhirhaul_common::manifest::ManifestFile;
use fhirhaul_common::status::{PollSettings, Poller};
use fhirhaul_sim::{SimConfig, SimEhr};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// Observation bytes per patient in the synthetic population (measured: ~4 KB).
const BYTES_PER_PATIENT: u64 = 4_100;

struct Fixture {
    _sim: SimEhr,
    client: FhirClient,
    file: ManifestFile,
    bytes: u64,
    _keys: tempfile::TempDir,
}

async fn fixture(megabytes: u64, spool: &std::path::Path) -> Fixture {
    let patients = (megabytes * 1_000_000 / BYTES_PER_PATIENT) as u32;
    let sim = SimEhr::start(SimConfig {
        patients,
        max_resources_per_file: u64::MAX,
        job_duration: Duration::ZERO,
        compress: false,
        spool_dir: Some(spool.to_path_buf()),
        ..SimConfig::default()
    })
    .await
    .expect("simulated EHR");
    let credentials = sim.new_client("ES384");
    let keys = tempfile::tempdir().unwrap();
    let tenant = fhirhaul_testkit::tenant::sim_tenant("bench", sim.base_url(), &credentials, keys.path());
    let transport = Arc::new(ReqwestTransport::new(&TransportSettings::default()).unwrap());
    let client = tenant
        .connect(
            transport,
            Arc::new(SystemClock),
            Entropy::from_os(),
            CancellationToken::new(),
        )
        .unwrap();
    let request = ExportRequest {
        types: vec!["Observation".into()],
        ..Default::default()
    };
    let mut backoff =
        fhirhaul_common::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(1), Entropy::from_os());
    let accepted = fhirhaul_common::kickoff::kick_off(
        &client,
        &request,
        &ServerProfile::default(),
        fhirhaul_common::kickoff::KickoffRetries {
            max_attempts: 3,
            retry_ambiguous: false,
            throttled_at_most: Duration::from_secs(60),
        },
        &mut backoff,
    )
    .await
    .unwrap();
    let poll = PollSettings {
        min_interval: Duration::from_millis(200),
        max_interval: Duration::from_secs(1),
        ..PollSettings::default()
    };
    let started = Instant::now();
    let export = Poller::new(poll, &client)
        .run(&client, &accepted.status_url, &CancellationToken::new(), |_| {})
        .await
        .unwrap();
    eprintln!(
        "spooled {} patients in {:.1}s",
        patients,
        started.elapsed().as_secs_f64()
    );
    let file = export.files.into_iter().next().expect("one file");
    let bytes = sim.served_files(1)[0].bytes;
    Fixture {
        _sim: sim,
        client,
        file,
        bytes,
        _keys: keys,
    }
}

/// The ceiling: same request path, same token, bytes straight to disk.
async fn plain(fixture: &Fixture, dest: &std::path::Path) -> u64 {
    let request =
        HttpRequest::new(http::Method::GET, fixture.file.url.clone()).header(http::header::ACCEPT_ENCODING, "identity");
    let response = fixture.client.send(request, Auth::Bearer).await.unwrap();
    assert_eq!(response.status.as_u16(), 200);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dest).unwrap());
    let mut body = response.body;
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        total += chunk.len() as u64;
        out.write_all(&chunk).unwrap();
    }
    out.flush().unwrap();
    out.get_ref().sync_all().unwrap();
    total
}

async fn validated(fixture: &Fixture, dest: &std::path::Path) -> u64 {
    let _ = std::fs::remove_file(dest);
    let outcome = download_file(
        &fixture.client,
        &fixture.file,
        true,
        dest,
        &DownloadSettings::default(),
        DownloadOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(outcome.resources, fixture.file.count.unwrap());
    outcome.bytes
}

/// CPU seconds this process has used (user + system), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let megabytes: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let work = tempfile::tempdir().unwrap();
        let small = fixture(megabytes / 8, &work.path().join("spool-small")).await;
        let large = fixture(megabytes, &work.path().join("spool-large")).await;
        let dest = work.path().join("download.ndjson");
        let mut best_plain = 0f64;
        let mut best_validated = 0f64;
        let mut peak_large = 0f64;
        for round in 1..=2 {
            let started = Instant::now();
            let cpu = cpu_seconds();
            let bytes = plain(&large, &dest).await;
            let plain_rate = bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
            let plain_cores = (cpu_seconds() - cpu) / started.elapsed().as_secs_f64();
            std::fs::remove_file(&dest).unwrap();
            reset_peak_rss();
            let started = Instant::now();
            let cpu = cpu_seconds();
            let bytes = validated(&large, &dest).await;
            let validated_rate = bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
            let validated_cores = (cpu_seconds() - cpu) / started.elapsed().as_secs_f64();
            peak_large = peak_large.max(peak_rss_mb());
            std::fs::remove_file(&dest).unwrap();
            eprintln!(
                "round {round}: plain {plain_rate:.0} MB/s using {plain_cores:.2} cores, fhirhaul {validated_rate:.0} MB/s using {validated_cores:.2} cores"
            );
            best_plain = best_plain.max(plain_rate);
            best_validated = best_validated.max(validated_rate);
        }
        reset_peak_rss();
        validated(&small, &dest).await;
        let peak_small = peak_rss_mb();
        // The CPU cost of the checks alone, in memory on one core: a ceiling for the checks.
        let sample = std::fs::read(&large._sim.served_files(1)[0].path).unwrap();
        let sample = &sample[..sample.len().min(200_000_000)];
        let started = Instant::now();
        let mut checker = fhirhaul_common::ndjson::LineChecker::new(
            fhirhaul_common::ndjson::Expect::Type("Observation".into()),
            1 << 26,
        );
        let mut sink = |_: &[u8]| Ok(());
        for chunk in sample.chunks(64 * 1024) {
            checker.feed(chunk, &mut sink).unwrap();
        }
        let check_rate = sample.len() as f64 / started.elapsed().as_secs_f64() / 1e6;
        let started = Instant::now();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(sample);
        let hash_rate = sample.len() as f64 / started.elapsed().as_secs_f64() / 1e6;
        std::hint::black_box(digest);
        println!(
            "file: {:.0} MB Observation NDJSON ({} resources), loopback, uncompressed",
            large.bytes as f64 / 1e6,
            large.file.count.unwrap_or(0)
        );
        println!("plain download (no validation):    {best_plain:.0} MB/s");
        println!("fhirhaul download (full checks):   {best_validated:.0} MB/s");
        println!("ratio:                             {:.2}", best_validated / best_plain);
        println!("line checks alone, one core:       {check_rate:.0} MB/s");
        println!("SHA-256 alone, one core:           {hash_rate:.0} MB/s");
        println!(
            "peak RSS, {:.0} MB file:             {peak_small:.0} MB",
            small.bytes as f64 / 1e6
        );
        println!(
            "peak RSS, {:.0} MB file:            {peak_large:.0} MB",
            large.bytes as f64 / 1e6
        );
    });
}
