//! The client core against a hostile simulated EHR: every fault knob, and what the user sees.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use fhirhaul_common::Error;
use fhirhaul_common::client::Auth;
use fhirhaul_common::download::part_path;
use fhirhaul_common::http::HttpRequest;
use fhirhaul_common::kickoff::{ExportLevel, ExportRequest};
use fhirhaul_common::status::{PollStep, delete_export, poll_once};
use fhirhaul_sim::SimConfig;
use support::{harness, harness_with, sim_config};

fn one_type(kind: &str) -> ExportRequest {
    ExportRequest {
        types: vec![kind.into()],
        ..Default::default()
    }
}

/// A single big Observation file, so faults land mid-body.
fn big_file_config() -> SimConfig {
    SimConfig {
        patients: 60,
        max_resources_per_file: 100_000,
        ..sim_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_429_waits_and_retries_then_succeeds() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.kickoff_429 = 2);
    let report = h.export(&one_type("Patient")).await.unwrap();
    h.assert_identical(&report);
    assert_eq!(
        h.sim.observed().kickoffs.len(),
        3,
        "two throttled kick-offs, then the accepted one"
    );
    assert_eq!(h.sim.jobs().len(), 1, "only one export exists at the EHR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kickoff_whose_connection_broke_after_sending_is_not_sent_again() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.kickoff_drop_after_accept = 1);
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(matches!(error, Error::AmbiguousKickoff { .. }), "{error:?}");
    assert!(error.to_string().contains("orphan export"), "{error}");
    assert_eq!(h.sim.observed().kickoffs.len(), 1, "sent once");
    assert_eq!(h.sim.jobs().len(), 1, "the EHR holds the one export it accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_kickoff_is_retried_only_when_configured() {
    let h = harness_with(sim_config(), "ES384", |tenant| {
        tenant.export.kickoff_retry_ambiguous = true;
    })
    .await;
    h.sim.set_faults(|f| f.kickoff_drop_after_accept = 1);
    let report = h.export(&one_type("Patient")).await.unwrap();
    h.assert_identical(&report);
    assert_eq!(h.sim.observed().kickoffs.len(), 2);
    assert_eq!(
        h.sim.jobs().len(),
        2,
        "as the setting warns: the first export is an orphan"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_unsent_so_a_kickoff_may_retry_it() {
    // A port nobody listens on: every attempt is refused before anything is sent.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let base: url::Url = format!("http://127.0.0.1:{port}/fhir").parse().unwrap();
    let request = one_type("Patient").build(&base, &Default::default()).unwrap();
    let transport = fhirhaul_common::http::ReqwestTransport::new(&Default::default()).unwrap();
    let error = fhirhaul_common::http::HttpTransport::send(&transport, request)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Unsent { .. }),
        "a refused connection never sent anything: {error:?}"
    );
    assert!(error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_protocol_violations_and_refusals_are_clear_errors() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.kickoff_200 = true);
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(matches!(error, Error::Protocol { .. }));
    assert!(error.to_string().contains("kick-off answered 200"), "{error}");

    h.sim.set_faults(|f| {
        f.kickoff_200 = false;
        f.kickoff_no_location = true;
    });
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(error.to_string().contains("202 without a Content-Location"), "{error}");

    h.sim.set_faults(|f| f.kickoff_no_location = false);
    let error = h.export(&one_type("Medication")).await.unwrap_err();
    assert!(matches!(error, Error::Http { status: 400, .. }));
    assert!(
        error
            .to_string()
            .contains("error not-supported: _type `Medication` is not supported by this server"),
        "{error}"
    );

    let error = h
        .export(&ExportRequest {
            level: ExportLevel::Group("nope".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("HTTP 404") && error.to_string().contains("Group/nope does not exist"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_with_a_retry_after_never_counts_toward_giving_up() {
    let config = SimConfig {
        job_duration: Duration::from_millis(100),
        ..sim_config()
    };
    // Three transient failures in a row would end the export; forty throttled answers in
    // a row, each with its Retry-After, do not, and neither do throttled kick-offs beyond
    // the attempt limit.
    let h = harness_with(config, "ES384", |tenant| {
        tenant.export.poll.max_consecutive_errors = 3;
        tenant.export.kickoff_attempts = 2;
        tenant.export.poll.min_retry_after = Duration::from_millis(5);
        tenant.export.poll.max_retry_after = Duration::from_millis(5);
    })
    .await;
    h.sim.set_faults(|f| {
        f.kickoff_429 = 6;
        f.status_429 = 40;
    });
    let report = h.export(&one_type("Condition")).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert_eq!(
        observed.kickoffs.len(),
        7,
        "six throttled kick-offs waited out, then one accepted"
    );
    assert_eq!(h.sim.jobs().len(), 1);
    assert!(observed.status_requests > 40);
    // Transient failures still count.
    h.sim.set_faults(|f| f.status_500 = 10);
    let error = h.export(&one_type("Condition")).await.unwrap_err();
    assert!(error.is_retryable(), "it gave up on transient errors: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_503_and_transient_500_slow_down_without_failing() {
    let config = SimConfig {
        job_duration: Duration::from_millis(100),
        ..sim_config()
    };
    let h = harness(config).await;
    h.sim.set_faults(|f| {
        f.status_429 = 3;
        f.status_503 = 2;
        f.status_500 = 2;
    });
    let (report, events) = h.export_collecting(&one_type("Condition")).await;
    h.assert_identical(&report.unwrap());
    assert!(h.sim.observed().status_requests >= 8);
    assert!(
        events.iter().any(|e| e.contains("slow down")),
        "throttling shows in the events"
    );
    assert!(
        events.iter().any(|e| e.contains("database failover in progress")),
        "the EHR's words show: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_error_page_on_status_ends_the_export_with_the_raw_text() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.status_html = Some(403));
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(matches!(error, Error::Http { status: 403, .. }));
    let text = error.to_string();
    assert!(
        text.contains("non-FHIR body (text/html)") && text.contains("upstream proxy error"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_202_is_stopped_by_the_watchdog_and_the_deadline() {
    let h = harness_with(sim_config(), "ES384", |t| {
        t.export.poll.stall_timeout = Duration::from_millis(800)
    })
    .await;
    h.sim.set_faults(|f| f.never_complete = true);
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(matches!(error, Error::Stalled { .. }), "{error}");
    assert!(
        error.to_string().contains("CANCELLED"),
        "the last X-Progress is in the error: {error}"
    );

    let h = harness_with(sim_config(), "ES384", |t| {
        t.export.poll.deadline = Duration::from_millis(600)
    })
    .await;
    h.sim.set_faults(|f| f.never_complete = true);
    let error = h.export(&one_type("Patient")).await.unwrap_err();
    assert!(matches!(error, Error::Deadline { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_and_a_second_delete_still_counts_as_done() {
    let config = SimConfig {
        job_duration: Duration::from_secs(30),
        ..sim_config()
    };
    let h = harness(config).await;
    let mut backoff = fhirhaul_common::retry::Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(50),
        h.client.entropy().clone(),
    );
    let accepted = fhirhaul_common::kickoff::kick_off(
        &h.client,
        &one_type("Patient"),
        &Default::default(),
        fhirhaul_common::kickoff::KickoffRetries {
            max_attempts: 3,
            retry_ambiguous: false,
            throttled_at_most: Duration::from_secs(60),
        },
        &mut backoff,
    )
    .await
    .unwrap();
    assert!(matches!(
        poll_once(&h.client, &accepted.status_url).await.unwrap(),
        PollStep::InProgress { .. }
    ));
    delete_export(&h.client, &accepted.status_url).await.unwrap();
    let error = poll_once(&h.client, &accepted.status_url).await.unwrap_err();
    assert!(matches!(error, Error::Http { status: 404, .. }), "{error}");
    assert!(error.to_string().contains("cancelled or deleted"));
    delete_export(&h.client, &accepted.status_url).await.unwrap();
    assert_eq!(h.sim.observed().deletes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_resume_from_the_last_whole_line() {
    let h = harness(big_file_config()).await;
    h.sim.set_faults(|f| {
        f.cut_after_bytes = Some(20_000);
        f.cuts = 3;
    });
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    let file = &report.files[0].outcome;
    assert!(file.resumes >= 1, "{file:?}");
    assert_eq!(
        file.restarts, 0,
        "a resume never starts over when the file is unchanged"
    );
    let observed = h.sim.observed();
    let served = std::fs::read(&h.sim.served_files(1)[0].path).unwrap();
    let ranged: Vec<_> = observed.file_requests.iter().filter(|r| r.range.is_some()).collect();
    assert!(!ranged.is_empty());
    for request in ranged {
        let offset: usize = request
            .range
            .as_deref()
            .unwrap()
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap();
        assert!(
            offset > 0 && served[offset - 1] == b'\n',
            "resume offset {offset} is at a line boundary"
        );
        assert!(request.if_range.is_some(), "If-Range guards the resume");
        assert_eq!(
            request.accept_encoding.as_deref(),
            Some("identity"),
            "ranges are over identity bytes"
        );
        assert_eq!(request.status, 206);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_gzip_download_resumes_on_identity_bytes_with_last_modified() {
    // The first response is gzip (weak ETag), so the resume's If-Range uses Last-Modified.
    let h = harness(big_file_config()).await;
    h.sim.set_faults(|f| {
        f.cut_after_bytes = Some(30_000);
        f.cuts = 1;
    });
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert_eq!(observed.file_requests[0].accept_encoding.as_deref(), Some("gzip"));
    let resume = observed
        .file_requests
        .iter()
        .find(|r| r.range.is_some())
        .expect("a ranged resume");
    assert!(
        resume.if_range.as_deref().unwrap().ends_with("GMT"),
        "If-Range is the Last-Modified date: {resume:?}"
    );
    assert_eq!(resume.status, 206);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changes_mid_download_restarts_from_zero_and_ends_as_the_new_version() {
    let h = harness(big_file_config()).await;
    h.sim.set_faults(|f| f.change_file_after_bytes = Some(25_000));
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    assert_eq!(h.sim.served_files(1)[0].version, 2, "the EHR did change the file");
    assert_eq!(report.files[0].outcome.restarts, 1);
    // The new version may carry the same Last-Modified second as the old one, so the EHR may
    // honour the If-Range and send a 206 of the new bytes; the client must notice the ETag
    // change and start over rather than stitch two versions together (the identity check
    // above proves it did).
    assert!(
        h.sim.observed().file_requests.iter().any(|r| r.range.is_some()),
        "a resume was attempted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_5xx_is_retried() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.file_500 = 3);
    let report = h.export(&ExportRequest::default()).await.unwrap();
    h.assert_identical(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_line_fails_that_file_only_and_names_the_line() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.malformed_line = Some(("Observation".into(), 7)));
    let report = h
        .export(&ExportRequest {
            types: vec!["Patient".into(), "Observation".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    let failed = &report.failed[0];
    assert_eq!(failed.category, fhirhaul_common::Category::Content);
    assert!(
        failed.error.contains("line 7: is not a JSON object"),
        "{}",
        failed.error
    );
    let first_observation = h.out().join("Observation.1.ndjson");
    assert!(
        !first_observation.exists(),
        "an invalid file is never published under its final name"
    );
    assert!(
        part_path(&first_observation).exists(),
        "the partial download is kept for inspection"
    );
    // Everything else arrived intact.
    let served = h.sim.served_files(1);
    for saved in &report.files {
        assert!(served.iter().any(|s| s.sha256 == saved.outcome.sha256));
    }
    assert!(
        report
            .files
            .iter()
            .any(|f| f.resource_type.as_deref() == Some("Patient"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_the_wrong_type_is_reported_with_file_and_line() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.wrong_type_line = Some(("Encounter".into(), 3)));
    let report = h.export(&one_type("Encounter")).await.unwrap();
    let failed = &report.failed[0];
    assert!(failed.url.contains("/bulkfiles/1/0"), "{}", failed.url);
    assert!(
        failed
            .error
            .contains("line 3: is a Patient resource in a file the manifest says holds Encounter"),
        "{}",
        failed.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_instead_of_ndjson_is_refused() {
    let h = harness(sim_config()).await;
    h.sim.set_faults(|f| f.file_html = true);
    let report = h.export(&one_type("Patient")).await.unwrap();
    assert_eq!(report.files.len(), 0);
    assert!(
        report.failed[0]
            .error
            .contains("served an HTML page where NDJSON was promised"),
        "{}",
        report.failed[0].error
    );
    assert!(report.failed[0].error.contains("Session expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_storage_never_carries_the_token() {
    let h = harness(SimConfig {
        redirect_files: true,
        ..sim_config()
    })
    .await;
    let report = h.export(&ExportRequest::default()).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert_eq!(observed.token_leaks, 0);
    assert!(
        observed
            .file_requests
            .iter()
            .any(|r| r.status == 307 && r.authorization)
    );
    assert!(
        observed
            .file_requests
            .iter()
            .filter(|r| r.storage)
            .all(|r| !r.authorization)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_urls_get_no_token_at_all() {
    let h = harness(SimConfig {
        requires_access_token: false,
        ..sim_config()
    })
    .await;
    let report = h.export(&ExportRequest::default()).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert_eq!(observed.token_leaks, 0);
    assert!(observed.file_requests.iter().all(|r| r.storage && !r.authorization));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_never_sent_to_a_foreign_origin() {
    let h = harness(sim_config()).await;
    let foreign = format!("{}/storage/1/0?sig=x", h.sim.storage_origin()).parse().unwrap();
    let error = h
        .client
        .send(HttpRequest::new(http::Method::GET, foreign), Auth::Bearer)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ForeignOrigin { .. }));
    assert!(
        error.to_string().contains("storage/1/0?…"),
        "the URL is named without its query: {error}"
    );
    assert_eq!(h.sim.observed().file_requests.len(), 0, "nothing was sent");
}

/// [`big_file_config`] served in identity encoding: the body's end is only its framing.
fn identity_config() -> SimConfig {
    SimConfig {
        compress: false,
        ..big_file_config()
    }
}

/// The ranged requests the EHR saw for the export's files, with their answers.
fn ranged_requests(h: &support::Harness) -> Vec<(String, u16)> {
    h.sim
        .observed()
        .file_requests
        .iter()
        .filter_map(|r| Some((r.range.clone()?, r.status)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_length_is_confirmed_with_a_range_request_when_there_is_no_count() {
    let h = harness(identity_config()).await;
    h.sim.set_faults(|f| {
        f.close_delimited = true;
        f.omit_count = true;
    });
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    let served = h.sim.served_files(1)[0].bytes;
    assert_eq!(
        ranged_requests(&h),
        vec![(format!("bytes={served}-"), 416)],
        "one Range request at the end confirms it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_length_whose_count_matches_needs_no_confirmation() {
    let h = harness(identity_config()).await;
    h.sim.set_faults(|f| f.close_delimited = true);
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    assert_eq!(ranged_requests(&h), vec![], "the manifest's count confirmed the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_length_cut_at_a_line_boundary_is_not_taken_for_the_whole_file() {
    for omit_count in [true, false] {
        let h = harness(identity_config()).await;
        h.sim.set_faults(|f| {
            f.close_delimited = true;
            f.omit_count = omit_count;
            f.cut_after_bytes = Some(50_000);
            f.cut_at_line_boundary = true;
            f.cuts = 2;
        });
        let report = h.export(&one_type("Observation")).await.unwrap();
        h.assert_identical(&report);
        let ranged = ranged_requests(&h);
        assert!(
            ranged.iter().filter(|(_, status)| *status == 206).count() >= 2,
            "each cut continued with a Range request (count given: {}): {ranged:?}",
            !omit_count
        );
        let served = std::fs::read(&h.sim.served_files(1)[0].path).unwrap();
        for (range, _) in &ranged {
            let offset: usize = range
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap();
            assert_eq!(served[offset - 1], b'\n', "the cut landed at a line boundary: {range}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_body_without_length_cut_short_resumes_instead_of_failing() {
    let h = harness(big_file_config()).await;
    h.sim.set_faults(|f| {
        f.close_delimited = true;
        f.omit_count = true;
        f.cut_after_bytes = Some(30_000);
        f.cuts = 1;
    });
    let report = h.export(&one_type("Observation")).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert_eq!(observed.file_requests[0].accept_encoding.as_deref(), Some("gzip"));
    assert!(
        ranged_requests(&h).iter().any(|(_, status)| *status == 206),
        "the missing gzip trailer showed the cut; the rest came by Range"
    );
}
