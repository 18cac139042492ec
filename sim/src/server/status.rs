//! The status URL: progress, the manifest (partial pages, `link` next), and DELETE.

use super::*;

pub(super) fn parse_job(job: &str) -> Option<u64> {
    job.parse().ok()
}

/// When links issued now stop working (unix ms), if links expire (`SimConfig::link_lifetime`).
pub(super) fn link_expiry(shared: &Shared) -> Option<u64> {
    let lifetime = shared.config.link_lifetime?;
    Some(unix_ms(shared.now_wall() + lifetime))
}

pub(super) fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A file's link. With expiring links it carries its expiry (`exp`, unix ms), covered by the
/// storage signature.
pub(super) fn file_url(shared: &Shared, job: u64, index: usize, exp: Option<u64>) -> String {
    if shared.config.requires_access_token {
        match exp {
            Some(exp) => format!("{}/bulkfiles/{job}/{index}?exp={exp}", shared.fhir_base),
            None => format!("{}/bulkfiles/{job}/{index}", shared.fhir_base),
        }
    } else {
        storage_url(shared, job, index, exp)
    }
}

pub(super) fn storage_signature(shared: &Shared, job: u64, index: usize, exp: Option<u64>) -> String {
    use sha2::Digest;
    let exp = exp.map(|e| e.to_string()).unwrap_or_default();
    let digest = sha2::Sha256::digest(format!("{}:{job}:{index}:{exp}", shared.storage_secret));
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

pub(super) fn storage_url(shared: &Shared, job: u64, index: usize, exp: Option<u64>) -> String {
    let signature = storage_signature(shared, job, index, exp);
    match exp {
        Some(exp) => format!(
            "{}/storage/{job}/{index}?exp={exp}&sig={signature}",
            shared.storage_origin
        ),
        None => format!("{}/storage/{job}/{index}?sig={signature}", shared.storage_origin),
    }
}

/// How the manifest states `count`: truthfully, off by some amount for one type (a lie),
/// or not at all (it is optional in the spec).
pub(super) struct Counts {
    pub lie: Option<(String, i64)>,
    pub omit: bool,
}

impl Counts {
    pub(super) fn from_faults(faults: &crate::Faults) -> Counts {
        Counts {
            lie: faults.count_off_by.clone(),
            omit: faults.omit_count,
        }
    }
}

/// The manifest's `output`, `deleted` and `error` entries.
pub(super) fn manifest_entries(
    shared: &Shared,
    job: &Job,
    files: &[&spool::SpooledFile],
    counts: &Counts,
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let (mut output, mut deleted, mut error) = (Vec::new(), Vec::new(), Vec::new());
    let exp = link_expiry(shared);
    for file in files {
        let mut entry = json!({ "url": file_url(shared, job.id, file.index, exp) });
        if let Some(kind) = &file.resource_type {
            entry["type"] = Value::String(kind.clone());
        }
        if file.kind == FileKind::Output && !counts.omit {
            let lie = counts
                .lie
                .as_ref()
                .filter(|(kind, _)| file.resource_type.as_deref() == Some(kind.as_str()))
                .map_or(0, |(_, by)| *by);
            entry["count"] = json!((file.count as i64 + lie).max(0));
        }
        match file.kind {
            FileKind::Output => output.push(entry),
            FileKind::Deleted => deleted.push(entry),
            FileKind::Error => error.push(entry),
        }
    }
    (output, deleted, error)
}

pub(super) async fn status(shared: &Arc<Shared>, job: &str, request: Request<Incoming>) -> Response<Body> {
    let headers = request.headers().clone();
    {
        let mut state = shared.lock();
        state.observed.status_requests += 1;
        state.observed.status_accept.push(header(&headers, "accept"));
    }
    let (client_id, _) = match authorize(shared, &headers) {
        Ok(found) => found,
        Err(response) => return response,
    };
    if let Some(response) = busy(shared, "status") {
        return response;
    }
    let page: usize = request
        .uri()
        .query()
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "page")
                .and_then(|(_, v)| v.parse().ok())
        })
        .unwrap_or(1);
    let mut state = shared.lock();
    if let Some(code) = state.faults.status_html {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        return respond(
            status,
            "text/html",
            format!(
                "<html><head><title>{code} Error</title></head><body><h1>{code}</h1><p>upstream proxy error</p></body></html>"
            ),
        );
    }
    if state.faults.status_429 > 0 {
        state.faults.status_429 -= 1;
        drop(state);
        return throttled(shared, StatusCode::TOO_MANY_REQUESTS);
    }
    if state.faults.status_503 > 0 {
        state.faults.status_503 -= 1;
        drop(state);
        return throttled(shared, StatusCode::SERVICE_UNAVAILABLE);
    }
    if state.faults.status_500 > 0 {
        state.faults.status_500 -= 1;
        return outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "transient",
            "database failover in progress",
        );
    }
    let never_complete = state.faults.never_complete;
    let counts = Counts::from_faults(&state.faults);
    let Some(job) = parse_job(job).and_then(|id| state.jobs.get(&id)) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such export");
    };
    if job.client_id != client_id {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such export");
    }
    if job.deleted {
        return outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            "this export was cancelled or deleted",
        );
    }
    let elapsed = job.created.elapsed();
    let duration = shared.config.job_duration;
    let in_progress = |progress: String, partial: Option<Value>| {
        let mut response = match partial {
            Some(manifest) => respond(StatusCode::ACCEPTED, "application/json", manifest.to_string()),
            None => Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(full(Bytes::new()))
                .unwrap_or_default(),
        };
        set_header(&mut response, "x-progress", &progress);
        if let Some(value) = retry_after_value(shared) {
            set_header(&mut response, "retry-after", &value);
        }
        response
    };
    if never_complete {
        return in_progress(
            "Build in progress - Status set to CANCELLED at 2024-01-01T00:00:00Z".into(),
            None,
        );
    }
    let files = match &job.state {
        JobState::Failed(reason) => return outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", reason),
        JobState::Building => return in_progress("building".into(), None),
        JobState::Ready(files) => files,
    };
    let fraction = (elapsed.as_secs_f64() / duration.as_secs_f64().max(1e-9)).min(1.0);
    let transaction_time = crate::population::instant(job.transaction_time);
    if fraction < 1.0 {
        let ready: Vec<&spool::SpooledFile> = files.iter().filter(|f| f.ready_fraction <= fraction).collect();
        let partial = (job.params.allow_partial && shared.config.partial_manifests && !ready.is_empty()).then(|| {
            let (output, deleted, error) = manifest_entries(shared, job, &ready, &counts);
            json!({
                "transactionTime": transaction_time,
                "request": job.params.request_url,
                "requiresAccessToken": shared.config.requires_access_token,
                "output": output, "deleted": deleted, "error": error,
            })
        });
        return in_progress(format!("{:.0}% complete", fraction * 100.0), partial);
    }
    let all: Vec<&spool::SpooledFile> = files.iter().collect();
    let (output, deleted, error) = manifest_entries(shared, job, &all, &counts);
    let page_size = shared.config.manifest_page_size.unwrap_or(usize::MAX).max(1);
    let pages = output.len().div_ceil(page_size).max(1);
    let page = page.clamp(1, pages);
    let page_output: Vec<Value> = output
        .into_iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .collect();
    let mut manifest = json!({
        "transactionTime": transaction_time,
        "request": job.params.request_url,
        "requiresAccessToken": shared.config.requires_access_token,
        "output": page_output,
        "error": if page == 1 { Value::Array(error) } else { json!([]) },
        "extension": {"https://example.org/sim": "fhirhaul-sim"},
    });
    if page == 1 && !deleted.is_empty() {
        manifest["deleted"] = Value::Array(deleted);
    }
    if page < pages {
        manifest["link"] = json!([{"relation": "next", "url": format!("{}/bulkstatus/{}?page={}", shared.fhir_base, job.id, page + 1)}]);
    }
    let mut response = respond(StatusCode::OK, "application/json", manifest.to_string());
    set_header(
        &mut response,
        "expires",
        &httpdate::fmt_http_date(shared.now_wall() + shared.config.link_lifetime.unwrap_or(Duration::from_secs(3600))),
    );
    response
}

pub(super) fn delete(shared: &Arc<Shared>, job: &str, request: Request<Incoming>) -> Response<Body> {
    let (client_id, _) = match authorize(shared, request.headers()) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let mut state = shared.lock();
    state.observed.deletes += 1;
    match parse_job(job).and_then(|id| state.jobs.get_mut(&id)) {
        Some(job) if job.client_id == client_id && !job.deleted => {
            job.deleted = true;
            outcome(StatusCode::ACCEPTED, "informational", "export deleted")
        }
        _ => outcome(StatusCode::NOT_FOUND, "not-found", "no such export"),
    }
}
