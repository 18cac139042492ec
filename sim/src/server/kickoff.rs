//! `$export` kick-off: parameters from the query or a Parameters body, validation as strict as the spec, and starting the export job.

use super::*;

pub(super) fn retry_after_value(shared: &Shared) -> Option<String> {
    match shared.config.retry_after {
        RetryAfterStyle::Seconds(s) => Some(s.to_string()),
        RetryAfterStyle::HttpDate(s) => Some(httpdate::fmt_http_date(shared.now_wall() + Duration::from_secs(s))),
        RetryAfterStyle::Absent => None,
    }
}

pub(super) fn throttled(shared: &Shared, status: StatusCode) -> Response<Body> {
    let mut response = outcome(status, "throttled", "too many requests; slow down");
    if let Some(value) = retry_after_value(shared) {
        set_header(&mut response, "retry-after", &value);
    }
    response
}

pub(super) fn parse_instant(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Reads kick-off parameters from the query (GET) or a Parameters body (POST).
pub(super) async fn kickoff_params(
    method: &Method,
    request: Request<Incoming>,
) -> Result<Vec<(String, String)>, Response<Body>> {
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if *method == Method::GET {
        return Ok(query);
    }
    if !query.is_empty() {
        return Err(outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "a POST kick-off takes its parameters in the body, not the query",
        ));
    }
    let content_type = header(request.headers(), "content-type").unwrap_or_default();
    if !content_type.starts_with("application/fhir+json") {
        return Err(outcome(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid",
            &format!("POST kick-off needs Content-Type application/fhir+json, got `{content_type}`"),
        ));
    }
    let body = read_body(request, 1 << 20).await?;
    let parameters: Value = serde_json::from_slice(&body)
        .map_err(|e| outcome(StatusCode::BAD_REQUEST, "structure", &format!("body is not JSON: {e}")))?;
    if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(outcome(
            StatusCode::BAD_REQUEST,
            "structure",
            "body must be a Parameters resource",
        ));
    }
    let mut out = Vec::new();
    for entry in parameters
        .get("parameter")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let name = entry
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let value = ["valueString", "valueInstant", "valueCode", "valueUri"]
            .iter()
            .find_map(|k| entry.get(*k).and_then(Value::as_str).map(str::to_owned))
            .or_else(|| {
                entry
                    .get("valueBoolean")
                    .and_then(Value::as_bool)
                    .map(|b| b.to_string())
            })
            .or_else(|| {
                entry
                    .get("valueReference")
                    .and_then(|r| r.get("reference"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        match value {
            Some(value) => out.push((name, value)),
            None => {
                return Err(outcome(
                    StatusCode::BAD_REQUEST,
                    "structure",
                    &format!("parameter `{name}` has no value of a supported type"),
                ));
            }
        }
    }
    Ok(out)
}

pub(super) async fn kickoff(shared: &Arc<Shared>, level: Level, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let headers = request.headers().clone();
    let path = request.uri().path().to_string();
    let request_url = format!("{}{}", shared.fhir_base.trim_end_matches("/fhir"), request.uri());
    let (client_id, scopes) = match authorize(shared, &headers) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let params = match kickoff_params(&method, request).await {
        Ok(params) => params,
        Err(response) => return response,
    };
    {
        let mut state = shared.lock();
        state.observed.kickoffs.push(KickoffSeen {
            at: tokio::time::Instant::now(),
            method: method.to_string(),
            path: path.clone(),
            params: params.clone(),
            prefer: header(&headers, "prefer"),
            accept: header(&headers, "accept"),
            content_type: header(&headers, "content-type"),
        });
        if state.faults.kickoff_429 > 0 {
            state.faults.kickoff_429 -= 1;
            drop(state);
            return throttled(shared, StatusCode::TOO_MANY_REQUESTS);
        }
    }
    if let Some(response) = busy(shared, "kickoff") {
        return response;
    }
    if header(&headers, "accept").as_deref() != Some("application/fhir+json") {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "Accept: application/fhir+json is required",
        );
    }
    let prefer = header(&headers, "prefer").unwrap_or_default();
    let preferences: Vec<String> = prefer.split(',').map(|p| p.trim().to_ascii_lowercase()).collect();
    if !preferences.iter().any(|p| p == "respond-async") {
        return outcome(StatusCode::BAD_REQUEST, "invalid", "Prefer: respond-async is required");
    }
    let lenient = preferences.iter().any(|p| p == "handling=lenient");
    let validated = match validate_kickoff(shared, &level, &method, &params, lenient, request_url) {
        Ok(validated) => validated,
        Err(response) => return response,
    };
    if let Level::Group(_) = level
        && !scopes
            .iter()
            .any(|s| scope_allows_read(s, "Group") || scope_allows_read(s, "Patient"))
    {
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token's scopes do not allow reading the Group",
        );
    }
    if let Some(kind) = validated
        .types
        .iter()
        .find(|t| !scopes.iter().any(|s| scope_allows_read(s, t)))
    {
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the token's scopes do not allow reading {kind}"),
        );
    }
    let mut accepted = start_job(shared, client_id, validated);
    let mut state = shared.lock();
    if accepted.status() == StatusCode::ACCEPTED && state.faults.kickoff_drop_after_accept > 0 {
        state.faults.kickoff_drop_after_accept -= 1;
        accepted.extensions_mut().insert(DropConnection);
    }
    drop(state);
    accepted
}

pub(super) fn validate_kickoff(
    shared: &Shared,
    level: &Level,
    method: &Method,
    params: &[(String, String)],
    lenient: bool,
    request_url: String,
) -> Result<ExportParams, Response<Body>> {
    let bad = |diagnostics: String| outcome(StatusCode::BAD_REQUEST, "invalid", &diagnostics);
    let unsupported = |diagnostics: String| outcome(StatusCode::BAD_REQUEST, "not-supported", &diagnostics);
    if let Level::Group(id) = level
        && !spool::group_exists(id)
    {
        return Err(outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Group/{id} does not exist"),
        ));
    }
    let mut ignored = Vec::new();
    let mut values: Vec<(String, Vec<String>)> = Vec::new();
    for (name, value) in params {
        if !KNOWN_PARAMS.contains(&name.as_str()) {
            if lenient {
                ignored.push(format!("parameter {name} is not supported and was ignored"));
                continue;
            }
            return Err(unsupported(format!("parameter `{name}` is not supported")));
        }
        let repeated = values.iter().any(|(n, _)| n == name);
        if LIST_PARAMS.contains(&name.as_str()) {
            if repeated && shared.config.join_policy == JoinPolicy::CommaOnly {
                return Err(bad(format!(
                    "`{name}` may not be repeated here; send one comma-separated value"
                )));
            }
            if value.contains(',') && shared.config.join_policy == JoinPolicy::RepeatOnly {
                return Err(bad(format!(
                    "`{name}` may not be comma-joined here; repeat the parameter"
                )));
            }
        } else if repeated && !matches!(name.as_str(), "_typeFilter" | "patient") {
            return Err(bad(format!("`{name}` may appear only once")));
        }
        let split: Vec<String> = if LIST_PARAMS.contains(&name.as_str()) {
            value.split(',').map(|v| v.trim().to_string()).collect()
        } else {
            vec![value.clone()]
        };
        match values.iter_mut().find(|(n, _)| n == name) {
            Some((_, list)) => list.extend(split),
            None => values.push((name.clone(), split)),
        }
    }
    let get = |name: &str| {
        values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if let Some(format) = get("_outputFormat").first()
        && !SUPPORTED_FORMATS.contains(&format.as_str())
    {
        return Err(unsupported(format!("_outputFormat `{format}` is not supported")));
    }
    let instant = |name: &str| -> Result<Option<i64>, Response<Body>> {
        match get(name).first() {
            None => Ok(None),
            Some(text) => parse_instant(text)
                .map(Some)
                .ok_or_else(|| bad(format!("`{name}` `{text}` is not a FHIR instant with a timezone"))),
        }
    };
    let since = instant("_since")?;
    let until = instant("_until")?;
    let mut types = Vec::new();
    for kind in get("_type") {
        if RESOURCE_TYPES.contains(&kind.as_str()) {
            if !types.contains(&kind) {
                types.push(kind);
            }
        } else if lenient {
            ignored.push(format!("_type {kind} is not supported and was ignored"));
        } else {
            return Err(unsupported(format!("_type `{kind}` is not supported by this server")));
        }
    }
    if types.is_empty() {
        types = RESOURCE_TYPES.iter().map(|t| t.to_string()).collect();
    }
    let elements = get("_elements");
    for element in &elements {
        let (kind, name) = element.split_once('.').unwrap_or(("", element));
        if name.is_empty() || name.contains('.') || (!kind.is_empty() && !RESOURCE_TYPES.contains(&kind)) {
            return Err(bad(format!("_elements `{element}` is not `Type.element` or `element`")));
        }
    }
    let mut type_filters = Vec::new();
    for filter in get("_typeFilter") {
        let parsed = filter.split_once('?').and_then(|(kind, query)| {
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
            match pairs.as_slice() {
                [(param, value)] if param == "status" && !status_values(kind).is_empty() => Some((
                    kind.to_string(),
                    value.split(',').map(str::to_owned).collect::<Vec<_>>(),
                )),
                _ => None,
            }
        });
        match parsed {
            Some(found) => type_filters.push(found),
            None if lenient => ignored.push(format!("_typeFilter {filter} is not supported and was ignored")),
            None => {
                return Err(unsupported(format!(
                    "_typeFilter `{filter}` is not supported (only Type?status=… on Observation, Encounter, MedicationRequest)"
                )));
            }
        }
    }
    let patient_refs = get("patient");
    let patients = if patient_refs.is_empty() {
        None
    } else {
        if *method != Method::POST {
            return Err(bad("`patient` is only allowed in a POST kick-off".into()));
        }
        if *level == Level::System {
            return Err(bad("`patient` is not allowed in a system-level export".into()));
        }
        let mut list = Vec::new();
        for reference in &patient_refs {
            let index = reference
                .strip_prefix("Patient/")
                .and_then(Population::patient_index)
                .filter(|i| *i < shared.config.patients);
            match index {
                Some(index) => list.push(index),
                None => {
                    return Err(outcome(
                        StatusCode::BAD_REQUEST,
                        "not-found",
                        &format!("patient `{reference}` is not known to this server"),
                    ));
                }
            }
        }
        Some(list)
    };
    for code in get("includeAssociatedData") {
        if lenient {
            ignored.push(format!("includeAssociatedData {code} is not supported and was ignored"));
        } else {
            return Err(unsupported(format!("includeAssociatedData `{code}` is not supported")));
        }
    }
    let organize_by_patient = match get("organizeOutputBy").first().map(String::as_str) {
        None => false,
        Some("Patient") => true,
        Some(other) => {
            return Err(unsupported(format!(
                "organizeOutputBy `{other}` is not supported (only Patient)"
            )));
        }
    };
    let allow_partial = match get("allowPartialManifests").first().map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(bad(format!("allowPartialManifests `{other}` is not a boolean"))),
    };
    Ok(ExportParams {
        level: level.clone(),
        types,
        since,
        until,
        elements,
        type_filters,
        patients,
        organize_by_patient,
        allow_partial,
        ignored,
        request_url,
    })
}

pub(super) fn start_job(shared: &Arc<Shared>, client_id: String, params: ExportParams) -> Response<Body> {
    let faults = shared.lock().faults.clone();
    if faults.kickoff_200 {
        return respond(
            StatusCode::OK,
            "application/fhir+json",
            "{\"resourceType\":\"Bundle\",\"type\":\"searchset\"}",
        );
    }
    let members = spool::members(&params.level, shared.config.patients, &params.patients);
    let id = {
        let mut state = shared.lock();
        let id = state.next_job;
        state.next_job += 1;
        state.jobs.insert(
            id,
            Job {
                id,
                client_id,
                created: tokio::time::Instant::now(),
                transaction_time: shared.now_unix(),
                params: params.clone(),
                members: members.clone(),
                state: JobState::Building,
                deleted: false,
            },
        );
        id
    };
    let build_shared = Arc::clone(shared);
    let kickoff_no_location = faults.kickoff_no_location;
    let build = move || {
        let population = Population::new(build_shared.config.seed, build_shared.config.patients);
        let dir = build_shared.spool_dir.join(format!("job-{id}"));
        let result = spool::build(
            population,
            &params,
            &members,
            &dir,
            build_shared.config.max_resources_per_file,
            &faults,
            build_shared.now_wall(),
        );
        let mut state = build_shared.lock();
        if let Some(job) = state.jobs.get_mut(&id) {
            job.state = match result {
                Ok(files) => JobState::Ready(files),
                Err(e) => JobState::Failed(format!("export build failed: {e}")),
            };
        }
    };
    if shared.config.file_io == crate::FileIo::Inline {
        build();
    } else {
        tokio::task::spawn_blocking(build);
    }
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::ACCEPTED;
    if !kickoff_no_location {
        set_header(
            &mut response,
            "content-location",
            &format!("{}/bulkstatus/{id}", shared.fhir_base),
        );
    }
    response
}
