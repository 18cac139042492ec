//! The client core against the simulated EHR over loopback: complete exports, every
//! kick-off form and parameter, partial manifests, paging, gzip.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use fhirhaul_common::Error;
use fhirhaul_common::kickoff::{ExportLevel, ExportRequest, KickoffMethod, ServerProfile, ValueJoin};
use fhirhaul_common::manifest::FileKind;
use fhirhaul_sim::{JoinPolicy, RetryAfterStyle, SimConfig};
use support::{harness, harness_with, sim_config};

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es384_export_is_byte_identical_with_counts_matching() {
    let h = harness(sim_config()).await;
    let report = h.export(&ExportRequest::default()).await.unwrap();
    assert!(report.files.len() >= 5, "one file per type at least");
    h.assert_identical(&report);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.out().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["files"].as_array().unwrap().len(), report.files.len());
    assert!(
        fhirhaul_common::fhir::parse_instant(&report.transaction_time).is_some(),
        "transactionTime kept for the next _since"
    );
    let observed = h.sim.observed();
    assert_eq!(observed.kickoffs.len(), 1);
    let kickoff = &observed.kickoffs[0];
    assert_eq!(kickoff.accept.as_deref(), Some("application/fhir+json"));
    assert_eq!(kickoff.prefer.as_deref(), Some("respond-async"));
    assert!(
        observed
            .status_accept
            .iter()
            .all(|a| a.as_deref() == Some("application/json"))
    );
    for request in &observed.file_requests {
        assert_eq!(request.accept.as_deref(), Some("application/fhir+ndjson"));
        assert_eq!(
            request.accept_encoding.as_deref(),
            Some("gzip"),
            "first requests offer gzip"
        );
        assert!(request.authorization, "requiresAccessToken=true files carry the token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs384_client_authenticates_and_exports() {
    let h = harness_with(sim_config(), "RS384", |_| {}).await;
    let report = h
        .export(&ExportRequest {
            types: vec!["Patient".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    h.assert_identical(&report);
    assert_eq!(h.sim.observed().tokens_issued, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_kickoff_sends_every_parameter_and_the_ehr_applies_them() {
    let h = harness(sim_config()).await;
    let request = ExportRequest {
        level: ExportLevel::Group("even".into()),
        output_format: Some("application/ndjson".into()),
        since: Some("2021-01-01T00:00:00Z".into()),
        until: Some("2030-01-01T00:00:00+02:00".into()),
        types: vec!["Patient".into(), "Observation".into(), "Condition".into()],
        elements: vec!["Patient.gender".into()],
        type_filters: vec!["Observation?status=final".into()],
        ..Default::default()
    };
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
    let kickoff = &h.sim.observed().kickoffs[0];
    assert_eq!(kickoff.method, "GET");
    assert_eq!(kickoff.path, "/fhir/Group/even/$export");
    let param = |name: &str| {
        kickoff
            .params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(param("_type"), ["Patient,Observation,Condition"]);
    assert_eq!(param("_since"), ["2021-01-01T00:00:00Z"]);
    assert_eq!(param("_until"), ["2029-12-31T22:00:00Z"]);
    assert_eq!(param("_typeFilter"), ["Observation?status=final"]);
    assert_eq!(param("_outputFormat"), ["application/ndjson"]);
    let since =
        time::OffsetDateTime::parse("2021-01-01T00:00:00Z", &time::format_description::well_known::Rfc3339).unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for file in &report.files {
        if file.kind != FileKind::Output {
            continue;
        }
        for resource in lines(&file.outcome.path) {
            let kind = resource["resourceType"].as_str().unwrap().to_string();
            let updated = time::OffsetDateTime::parse(
                resource["meta"]["lastUpdated"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            assert!(updated > since, "_since applied");
            match kind.as_str() {
                "Patient" => {
                    assert!(
                        resource.get("name").is_none() && resource.get("gender").is_some(),
                        "_elements applied"
                    );
                    let index: u32 = resource["id"].as_str().unwrap()[1..].parse().unwrap();
                    assert_eq!(index % 2, 0, "Group/even members only");
                }
                "Observation" => assert_eq!(resource["status"], "final", "_typeFilter applied"),
                _ => {}
            }
            kinds.insert(kind);
        }
    }
    assert!(
        kinds
            .iter()
            .all(|k| ["Patient", "Observation", "Condition"].contains(&k.as_str())),
        "_type applied: {kinds:?}"
    );
    assert!(
        report.files.iter().any(|f| f.kind == FileKind::Deleted),
        "_since exports list deletions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_parameter_posts_a_parameters_body() {
    let h = harness(sim_config()).await;
    let request = ExportRequest {
        level: ExportLevel::Group("all".into()),
        types: vec!["Patient".into(), "Encounter".into()],
        patients: vec!["Patient/p3".into(), "Patient/p7".into()],
        ..Default::default()
    };
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
    let kickoff = &h.sim.observed().kickoffs[0];
    assert_eq!(kickoff.method, "POST");
    assert_eq!(kickoff.content_type.as_deref(), Some("application/fhir+json"));
    let patients: Vec<_> = kickoff
        .params
        .iter()
        .filter(|(k, _)| k == "patient")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(patients, ["Patient/p3", "Patient/p7"]);
    let patient_file = report
        .files
        .iter()
        .find(|f| f.resource_type.as_deref() == Some("Patient"))
        .unwrap();
    assert_eq!(patient_file.outcome.resources, 2, "only the listed patients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_join_follows_the_server_profile() {
    let config = SimConfig {
        join_policy: JoinPolicy::RepeatOnly,
        ..sim_config()
    };
    let h = harness(config).await;
    let request = ExportRequest {
        types: vec!["Patient".into(), "Condition".into()],
        ..Default::default()
    };
    let error = h.export(&request).await.unwrap_err();
    assert!(matches!(error, Error::Http { status: 400, .. }), "{error}");
    assert!(
        error.to_string().contains("may not be comma-joined"),
        "the EHR's words are kept: {error}"
    );

    let h = harness_with(
        SimConfig {
            join_policy: JoinPolicy::RepeatOnly,
            ..sim_config()
        },
        "ES384",
        |t| {
            t.profile = ServerProfile {
                value_join: ValueJoin::Repeat,
                method: KickoffMethod::Post,
                lenient: false,
            };
        },
    )
    .await;
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
    let kickoff = &h.sim.observed().kickoffs[0];
    assert_eq!(kickoff.method, "POST");
    assert_eq!(kickoff.params.iter().filter(|(k, _)| k == "_type").count(), 2);

    let h = harness(SimConfig {
        join_policy: JoinPolicy::CommaOnly,
        ..sim_config()
    })
    .await;
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_handling_reports_ignored_parameters_in_the_error_file() {
    let h = harness_with(sim_config(), "ES384", |t| t.profile.lenient = true).await;
    let request = ExportRequest {
        types: vec!["Patient".into()],
        include_associated_data: vec!["LatestProvenanceResources".into()],
        ..Default::default()
    };
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
    assert_eq!(
        h.sim.observed().kickoffs[0].prefer.as_deref(),
        Some("respond-async, handling=lenient")
    );
    let error_file = report
        .files
        .iter()
        .find(|f| f.kind == FileKind::Error)
        .expect("an error file");
    assert!(error_file.outcome.path.starts_with(h.out().join("error")));
    assert_eq!(
        error_file.outcome.issues,
        ["warning not-supported: includeAssociatedData LatestProvenanceResources is not supported and was ignored"]
    );

    let strict = harness(sim_config()).await;
    let error = strict.export(&request).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("includeAssociatedData `LatestProvenanceResources` is not supported"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organize_output_by_patient_yields_untyped_files_with_headers() {
    let h = harness(sim_config()).await;
    let request = ExportRequest {
        types: vec!["Patient".into(), "Condition".into()],
        organize_output_by: Some("Patient".into()),
        ..Default::default()
    };
    let report = h.export(&request).await.unwrap();
    h.assert_identical(&report);
    let file = &report.files[0];
    assert_eq!(file.resource_type, None);
    assert!(
        file.outcome
            .path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Organized.")
    );
    let first = &lines(&file.outcome.path)[0];
    assert_eq!(first["resourceType"], "Parameters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_manifest_files_download_while_polling_continues() {
    let config = SimConfig {
        job_duration: Duration::from_millis(1500),
        ..sim_config()
    };
    let h = harness(config).await;
    let request = ExportRequest {
        allow_partial_manifests: true,
        ..Default::default()
    };
    let (report, events) = h.export_collecting(&request).await;
    let report = report.unwrap();
    h.assert_identical(&report);
    let partial_at = events
        .iter()
        .position(|e| e.contains("PartialFiles"))
        .expect("a partial manifest arrived");
    let manifest_at = events.iter().position(|e| e.starts_with("manifest")).unwrap();
    assert!(partial_at < manifest_at);
    let kickoff = &h.sim.observed().kickoffs[0];
    assert!(
        kickoff
            .params
            .contains(&("allowPartialManifests".into(), "true".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_link_pages_are_followed_without_duplicates() {
    let config = SimConfig {
        manifest_page_size: Some(2),
        ..sim_config()
    };
    let h = harness(config).await;
    let report = h.export(&ExportRequest::default()).await.unwrap();
    h.assert_identical(&report);
    let pages: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.out().join("manifest.json")).unwrap()).unwrap();
    assert!(pages.as_array().unwrap().len() >= 3, "several pages were fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_as_seconds_and_as_http_date_is_honoured() {
    for (style, at_least) in [(RetryAfterStyle::Seconds(1), 0.99), (RetryAfterStyle::HttpDate(2), 0.9)] {
        let config = SimConfig {
            job_duration: Duration::from_millis(1200),
            retry_after: style,
            ..sim_config()
        };
        // Our own backoff would wait 15 s at least; the EHR's hint is what counts.
        let h = harness_with(config, "ES384", |t| {
            t.export.poll.min_interval = Duration::from_secs(15);
            t.export.poll.max_interval = Duration::from_secs(30);
            t.export.poll.min_retry_after = Duration::from_secs(1);
            t.export.poll.max_retry_after = Duration::from_secs(3);
        })
        .await;
        let (report, events) = h
            .export_collecting(&ExportRequest {
                types: vec!["Patient".into()],
                ..Default::default()
            })
            .await;
        report.unwrap();
        let waits: Vec<f64> = events
            .iter()
            .filter_map(|e| e.split("delay: ").nth(1))
            .filter_map(|rest| rest.split('s').next())
            .filter_map(|n| n.parse::<f64>().ok())
            .collect();
        assert!(!waits.is_empty(), "{events:?}");
        assert!(waits.iter().all(|w| *w >= at_least), "{style:?}: waited {waits:?}");
        assert!(
            waits.iter().all(|w| *w <= 3.0),
            "{style:?}: the EHR's hint, not min_interval, sets the wait: {waits:?}"
        );
        assert!(events.iter().any(|e| e.contains("Progress(")), "X-Progress surfaced");
    }
}
