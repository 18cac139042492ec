//! Routing and handlers. Every refusal is an OperationOutcome (or, at the token endpoint, an
//! RFC 6749 error) saying exactly what was wrong, like a well-behaved EHR; the fault knobs
//! make it behave like a badly-behaved one.
//!
//! Validation helpers return the refusal itself as their `Err` (a ready `Response`), so a
//! handler can `?` its way out; the response is built once per request and never stored.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::jose::verify_assertion;
use crate::population::{Population, RESOURCE_TYPES, status_values};
use crate::spool::{self, ExportParams, FileKind, Job, JobState, Level};
use crate::{FileRequestSeen, JoinPolicy, KickoffSeen, RetryAfterStyle, Shared, TokenInfo, random_hex};

type Body = BoxBody<Bytes, std::io::Error>;

const MAX_LIFETIME_SECS: i64 = 300;
const SUPPORTED_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
const KNOWN_PARAMS: &[&str] = &[
    "_outputFormat",
    "_since",
    "_until",
    "_type",
    "_elements",
    "_typeFilter",
    "patient",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
];
const LIST_PARAMS: &[&str] = &["_type", "_elements", "includeAssociatedData"];

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, storage: bool, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, Arc::clone(&shared), storage, cancel.clone()));
    }
}

/// Serves one connection (any byte stream, so a simulated network can use it too).
pub(crate) async fn serve_connection<I>(io: I, shared: Arc<Shared>, storage: bool, cancel: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(route(&shared, storage, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = connection => {}
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// An OperationOutcome response.
fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response<Body> {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]
    });
    respond(status, "application/fhir+json", body.to_string())
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    let body = json!({"error": error, "error_description": description});
    let mut response = respond(status, "application/json", body.to_string());
    response
        .headers_mut()
        .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = value.parse() {
        response.headers_mut().insert(name, value);
    }
}

async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(outcome(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            "request body too large or broken",
        )),
    }
}

async fn route(shared: &Arc<Shared>, storage: bool, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if storage {
        return match path.strip_prefix("/storage/") {
            Some(rest) if method == Method::GET => storage_file(shared, rest, request).await,
            _ => outcome(StatusCode::NOT_FOUND, "not-found", "no such object"),
        };
    }
    if path == "/auth/token" {
        return if method == Method::POST {
            token(shared, request).await
        } else {
            oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "the token endpoint takes POST",
            )
        };
    }
    let Some(fhir_path) = path.strip_prefix("/fhir/") else {
        return outcome(StatusCode::NOT_FOUND, "not-found", &format!("no route for {path}"));
    };
    let segments: Vec<&str> = fhir_path.split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, [".well-known", "smart-configuration"]) => discovery(shared),
        (Method::GET | Method::POST, ["$export"]) => kickoff(shared, Level::System, request).await,
        (Method::GET | Method::POST, ["Patient", "$export"]) => kickoff(shared, Level::Patient, request).await,
        (Method::GET | Method::POST, ["Group", id, "$export"]) => {
            let id = percent_decode(id);
            kickoff(shared, Level::Group(id), request).await
        }
        (Method::GET, ["bulkstatus", job]) => status(shared, job, request).await,
        (Method::DELETE, ["bulkstatus", job]) => delete(shared, job, request),
        (Method::GET, ["bulkfiles", job, file]) => fhir_file(shared, job, file, request).await,
        _ => outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            &format!("{method} {path} is not supported here"),
        ),
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn discovery(shared: &Shared) -> Response<Body> {
    shared.lock().observed.discovery_requests += 1;
    let mut capabilities = vec!["client-confidential-asymmetric", "permission-v1"];
    if shared.config.permission_v2 {
        capabilities.push("permission-v2");
    }
    let body = json!({
        "token_endpoint": shared.token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.read", "system/*.rs"],
        "capabilities": capabilities,
    });
    respond(StatusCode::OK, "application/json", body.to_string())
}

/// Whether a scope string like `system/Observation.rs` allows reading `kind`.
fn scope_allows_read(scope: &str, kind: &str) -> bool {
    let Some(rest) = scope.strip_prefix("system/") else {
        return false;
    };
    let Some((resource, permissions)) = rest.split_once('.') else {
        return false;
    };
    let permissions = permissions.split('?').next().unwrap_or_default();
    let reads = permissions.eq_ignore_ascii_case("read")
        || permissions == "*"
        || (permissions.contains('r') && permissions.chars().all(|c| "cruds".contains(c)));
    reads && (resource == "*" || resource == kind)
}

fn valid_scope_syntax(scope: &str) -> bool {
    let Some(rest) = scope.strip_prefix("system/") else {
        return false;
    };
    let Some((resource, permissions)) = rest.split_once('.') else {
        return false;
    };
    let resource_ok = resource == "*" || RESOURCE_TYPES.contains(&resource) || resource == "Group";
    let permissions = permissions.split('?').next().unwrap_or_default();
    let v1 = ["read", "write", "*"]
        .iter()
        .any(|p| permissions.eq_ignore_ascii_case(p));
    let v2 = !permissions.is_empty() && {
        let order = "cruds";
        let mut last = None;
        permissions.chars().all(|c| {
            let position = order.find(c);
            let ok = position.is_some() && position > last;
            last = position;
            ok
        })
    };
    resource_ok && (v1 || v2)
}

async fn token(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let content_type = header(request.headers(), "content-type").unwrap_or_default();
    shared.lock().observed.token_requests += 1;
    let reject = |status: StatusCode, error: &str, description: String| {
        shared
            .lock()
            .observed
            .token_rejections
            .push(format!("{error}: {description}"));
        oauth_error(status, error, &description)
    };
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("Content-Type must be application/x-www-form-urlencoded, not `{content_type}`"),
        );
    }
    let body = match read_body(request, 64 * 1024).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if form.iter().filter(|(k, _)| k == "client_assertion").count() > 1 {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion given twice".into(),
        );
    }
    match get("grant_type").as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type `{other}` is not supported"),
            );
        }
        None => {
            return reject(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing".into(),
            );
        }
    }
    if get("client_assertion_type").as_deref() != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
        );
    }
    let Some(assertion) = get("client_assertion") else {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion is missing".into(),
        );
    };
    let Some(scope) = get("scope").filter(|s| !s.trim().is_empty()) else {
        return reject(StatusCode::BAD_REQUEST, "invalid_scope", "scope is required".into());
    };
    let now = shared.now_unix();
    let verified = {
        let state = shared.lock();
        verify_assertion(&assertion, &shared.token_url, now, MAX_LIFETIME_SECS, |id| {
            state.clients.get(id).cloned()
        })
    };
    let verified = match verified {
        Ok(verified) => verified,
        Err(reason) => return reject(StatusCode::UNAUTHORIZED, "invalid_client", reason),
    };
    let requested: Vec<String> = scope.split_whitespace().map(str::to_owned).collect();
    if let Some(bad) = requested.iter().find(|s| !valid_scope_syntax(s)) {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("scope `{bad}` is not a system scope this server grants"),
        );
    }
    let mut state = shared.lock();
    if !state
        .seen_jti
        .insert((verified.client_id.clone(), verified.jti.clone()))
    {
        drop(state);
        return reject(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            format!("jti `{}` was already used", verified.jti),
        );
    }
    let granted = shared.config.grant_scope.clone().unwrap_or_else(|| scope.clone());
    let access_token = random_hex(&mut state.rng, 24);
    state.tokens.insert(
        access_token.clone(),
        TokenInfo {
            client_id: verified.client_id,
            scopes: granted.split_whitespace().map(str::to_owned).collect(),
            expires: tokio::time::Instant::now() + shared.config.token_lifetime,
            uses: 0,
        },
    );
    state.observed.tokens_issued += 1;
    state.observed.scopes_requested.push(scope);
    drop(state);
    let body = json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": shared.config.token_lifetime.as_secs(),
        "scope": granted,
    });
    let mut response = respond(StatusCode::OK, "application/json", body.to_string());
    response
        .headers_mut()
        .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// Checks the bearer token; returns the client id and its scopes.
fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(String, Vec<String>), Response<Body>> {
    let unauthorized = |why: &str| {
        shared.lock().observed.unauthorized += 1;
        let mut response = outcome(StatusCode::UNAUTHORIZED, "login", why);
        set_header(&mut response, "www-authenticate", "Bearer error=\"invalid_token\"");
        response
    };
    let Some(value) = header(headers, "authorization") else {
        return Err(unauthorized("an access token is required"));
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(unauthorized("malformed Authorization header"));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized("only Bearer tokens are accepted"));
    }
    let mut state = shared.lock();
    let revoke_after = state.faults.revoke_token_after_uses;
    let Some(info) = state.tokens.get_mut(token.trim()) else {
        drop(state);
        return Err(unauthorized("unknown access token"));
    };
    if info.expires <= tokio::time::Instant::now() {
        drop(state);
        return Err(unauthorized("access token expired"));
    }
    info.uses += 1;
    if revoke_after.is_some_and(|limit| info.uses > limit) {
        drop(state);
        return Err(unauthorized("access token revoked"));
    }
    Ok((info.client_id.clone(), info.scopes.clone()))
}

fn retry_after_value(shared: &Shared) -> Option<String> {
    match shared.config.retry_after {
        RetryAfterStyle::Seconds(s) => Some(s.to_string()),
        RetryAfterStyle::HttpDate(s) => Some(httpdate::fmt_http_date(shared.now_wall() + Duration::from_secs(s))),
        RetryAfterStyle::Absent => None,
    }
}

fn throttled(shared: &Shared, status: StatusCode) -> Response<Body> {
    let mut response = outcome(status, "throttled", "too many requests; slow down");
    if let Some(value) = retry_after_value(shared) {
        set_header(&mut response, "retry-after", &value);
    }
    response
}

fn parse_instant(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Reads kick-off parameters from the query (GET) or a Parameters body (POST).
async fn kickoff_params(method: &Method, request: Request<Incoming>) -> Result<Vec<(String, String)>, Response<Body>> {
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

async fn kickoff(shared: &Arc<Shared>, level: Level, request: Request<Incoming>) -> Response<Body> {
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
    start_job(shared, client_id, validated)
}

fn validate_kickoff(
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

fn start_job(shared: &Arc<Shared>, client_id: String, params: ExportParams) -> Response<Body> {
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

fn parse_job(job: &str) -> Option<u64> {
    job.parse().ok()
}

fn file_url(shared: &Shared, job: u64, index: usize, version: u32) -> String {
    if shared.config.requires_access_token {
        format!("{}/bulkfiles/{job}/{index}", shared.fhir_base)
    } else {
        storage_url(shared, job, index, version)
    }
}

fn storage_signature(shared: &Shared, job: u64, index: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}:{job}:{index}", shared.storage_secret));
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn storage_url(shared: &Shared, job: u64, index: usize, _version: u32) -> String {
    format!(
        "{}/storage/{job}/{index}?sig={}",
        shared.storage_origin,
        storage_signature(shared, job, index)
    )
}

fn manifest_entries(shared: &Shared, job: &Job, files: &[&spool::SpooledFile]) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let (mut output, mut deleted, mut error) = (Vec::new(), Vec::new(), Vec::new());
    for file in files {
        let mut entry = json!({ "url": file_url(shared, job.id, file.index, file.version) });
        if let Some(kind) = &file.resource_type {
            entry["type"] = Value::String(kind.clone());
        }
        if file.kind == FileKind::Output {
            entry["count"] = json!(file.count);
        }
        match file.kind {
            FileKind::Output => output.push(entry),
            FileKind::Deleted => deleted.push(entry),
            FileKind::Error => error.push(entry),
        }
    }
    (output, deleted, error)
}

async fn status(shared: &Arc<Shared>, job: &str, request: Request<Incoming>) -> Response<Body> {
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
            let (output, deleted, error) = manifest_entries(shared, job, &ready);
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
    let (output, deleted, error) = manifest_entries(shared, job, &all);
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
        &httpdate::fmt_http_date(shared.now_wall() + Duration::from_secs(3600)),
    );
    response
}

fn delete(shared: &Arc<Shared>, job: &str, request: Request<Incoming>) -> Response<Body> {
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

fn record_file(shared: &Shared, job: u64, index: usize, storage: bool, headers: &HeaderMap, status: u16) {
    shared.lock().observed.file_requests.push(FileRequestSeen {
        job,
        file: index,
        storage,
        range: header(headers, "range"),
        if_range: header(headers, "if-range"),
        authorization: headers.contains_key("authorization"),
        accept: header(headers, "accept"),
        accept_encoding: header(headers, "accept-encoding"),
        status,
    });
}

async fn fhir_file(shared: &Arc<Shared>, job: &str, file: &str, request: Request<Incoming>) -> Response<Body> {
    let headers = request.headers().clone();
    let (Some(job), Some(index)) = (parse_job(job), file.parse::<usize>().ok()) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such file");
    };
    if let Err(response) = authorize(shared, &headers) {
        record_file(shared, job, index, false, &headers, 401);
        return response;
    }
    if shared.config.redirect_files {
        record_file(shared, job, index, false, &headers, 307);
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        set_header(&mut response, "location", &storage_url(shared, job, index, 0));
        return response;
    }
    serve_file(shared, job, index, false, &headers).await
}

async fn storage_file(shared: &Arc<Shared>, rest: &str, request: Request<Incoming>) -> Response<Body> {
    let headers = request.headers().clone();
    let parts: Vec<&str> = rest.split('/').collect();
    let (Some(job), Some(index)) = (
        parts.first().and_then(|j| parse_job(j)),
        parts.get(1).and_then(|i| i.parse::<usize>().ok()),
    ) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such object");
    };
    let signature = request.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "sig")
            .map(|(_, v)| v.into_owned())
    });
    if signature.as_deref() != Some(storage_signature(shared, job, index).as_str()) {
        record_file(shared, job, index, true, &headers, 403);
        return respond(
            StatusCode::FORBIDDEN,
            "application/xml",
            "<Error><Code>SignatureDoesNotMatch</Code></Error>",
        );
    }
    if headers.contains_key("authorization") {
        // Like a cloud bucket given both a signed URL and a bearer token: refuse, and count
        // the leak — a client must never send its EHR token here.
        shared.lock().observed.token_leaks += 1;
        record_file(shared, job, index, true, &headers, 400);
        return respond(
            StatusCode::BAD_REQUEST,
            "application/xml",
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
        );
    }
    serve_file(shared, job, index, true, &headers).await
}

enum RangeRequest {
    Whole,
    From(u64),
}

async fn serve_file(
    shared: &Arc<Shared>,
    job_id: u64,
    index: usize,
    storage: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let (file, faults_cut, file_500, file_html, change_after, throttle) = {
        let mut state = shared.lock();
        let file = match state.jobs.get(&job_id) {
            Some(job) if !job.deleted => match &job.state {
                JobState::Ready(files) => files.get(index).cloned(),
                _ => None,
            },
            _ => None,
        };
        let faults = &mut state.faults;
        let cut = match faults.cut_after_bytes {
            Some(bytes) if faults.cuts > 0 => {
                faults.cuts -= 1;
                Some(bytes)
            }
            _ => None,
        };
        let file_500 = if faults.file_500 > 0 {
            faults.file_500 -= 1;
            true
        } else {
            false
        };
        (
            file,
            cut,
            file_500,
            faults.file_html,
            faults.change_file_after_bytes,
            faults.throttle_bytes_per_sec,
        )
    };
    let Some(file) = file else {
        record_file(shared, job_id, index, storage, headers, 404);
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such file (expired or deleted)");
    };
    if file_500 {
        record_file(shared, job_id, index, storage, headers, 500);
        return outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "transient",
            "storage node unavailable",
        );
    }
    if file_html {
        record_file(shared, job_id, index, storage, headers, 200);
        return respond(
            StatusCode::OK,
            "text/html",
            "<html><body><h1>Session expired</h1><p>Please sign in.</p></body></html>",
        );
    }
    let etag = file.etag();
    let last_modified = httpdate::fmt_http_date(file.last_modified);
    let range = match header(headers, "range") {
        None => RangeRequest::Whole,
        Some(value) => {
            let start = value
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<u64>().ok());
            let Some(start) = start else {
                record_file(shared, job_id, index, storage, headers, 400);
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("only `bytes=N-` ranges are supported, got `{value}`"),
                );
            };
            // If-Range: the range applies only if the validator still matches (strong
            // comparison for ETags, exact match for dates); otherwise send everything.
            let still_valid = match header(headers, "if-range") {
                None => true,
                Some(validator) => validator == etag || validator == last_modified,
            };
            if still_valid {
                RangeRequest::From(start)
            } else {
                RangeRequest::Whole
            }
        }
    };
    let start = match range {
        RangeRequest::Whole => 0,
        RangeRequest::From(start) => start,
    };
    if start > file.bytes || (start == file.bytes && file.bytes > 0) {
        record_file(shared, job_id, index, storage, headers, 416);
        let mut response = respond(StatusCode::RANGE_NOT_SATISFIABLE, "application/fhir+json", Bytes::new());
        set_header(&mut response, "content-range", &format!("bytes */{}", file.bytes));
        return response;
    }
    let gzip = shared.config.compress
        && matches!(range, RangeRequest::Whole)
        && header(headers, "accept-encoding")
            .is_some_and(|v| v.split(',').any(|e| e.trim().split(';').next() == Some("gzip")));
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    record_file(shared, job_id, index, storage, headers, status.as_u16());
    let opened = if shared.config.file_io == crate::FileIo::Inline {
        std::fs::File::open(&file.path).map(SpoolFile::Here)
    } else {
        tokio::fs::File::open(&file.path).await.map(SpoolFile::Pool)
    };
    let mut handle = match opened {
        Ok(handle) => handle,
        Err(e) => {
            return outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                &format!("cannot open export file: {e}"),
            );
        }
    };
    if start > 0 && handle.seek(start).await.is_err() {
        return outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", "seek failed");
    }
    let plan = StreamPlan {
        remaining: file.bytes - start,
        sent: 0,
        cut_after: faults_cut,
        change_after: if file.kind == FileKind::Output {
            change_after
        } else {
            None
        },
        gzip: gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())),
        throttle,
        shared: Arc::clone(shared),
        job: job_id,
        index,
        done: false,
    };
    let stream = futures_util::stream::unfold((handle, plan), |(mut handle, mut plan)| async move {
        let next = plan.next_chunk(&mut handle).await?;
        Some((next, (handle, plan)))
    });
    let body = BodyExt::boxed(StreamBody::new(stream.map(|chunk| chunk.map(Frame::data))));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    set_header(&mut response, "content-type", "application/fhir+ndjson");
    set_header(&mut response, "accept-ranges", "bytes");
    set_header(&mut response, "last-modified", &last_modified);
    if gzip {
        // The gzip variant is a different representation: weak ETag, like nginx does.
        set_header(&mut response, "etag", &format!("W/{etag}"));
        set_header(&mut response, "content-encoding", "gzip");
        set_header(&mut response, "vary", "Accept-Encoding");
    } else {
        set_header(&mut response, "etag", &etag);
        set_header(&mut response, "content-length", &(file.bytes - start).to_string());
        if start > 0 {
            set_header(
                &mut response,
                "content-range",
                &format!("bytes {start}-{}/{}", file.bytes - 1, file.bytes),
            );
        }
    }
    response
}

/// An export file being served: read through tokio's blocking pool, or right here
/// (`SimConfig::file_io`).
enum SpoolFile {
    Pool(tokio::fs::File),
    Here(std::fs::File),
}

impl SpoolFile {
    async fn seek(&mut self, to: u64) -> std::io::Result<u64> {
        match self {
            SpoolFile::Pool(file) => file.seek(std::io::SeekFrom::Start(to)).await,
            SpoolFile::Here(file) => std::io::Seek::seek(file, std::io::SeekFrom::Start(to)),
        }
    }

    async fn read_exact(&mut self, buffer: &mut [u8]) -> std::io::Result<()> {
        match self {
            SpoolFile::Pool(file) => file.read_exact(buffer).await.map(|_| ()),
            SpoolFile::Here(file) => std::io::Read::read_exact(file, buffer),
        }
    }
}

struct StreamPlan {
    remaining: u64,
    sent: u64,
    cut_after: Option<u64>,
    change_after: Option<u64>,
    gzip: Option<flate2::write::GzEncoder<Vec<u8>>>,
    throttle: Option<u64>,
    shared: Arc<Shared>,
    job: u64,
    index: usize,
    done: bool,
}

const CHUNK: usize = 64 * 1024;

impl StreamPlan {
    async fn next_chunk(&mut self, handle: &mut SpoolFile) -> Option<Result<Bytes, std::io::Error>> {
        use std::io::Write;
        if self.done {
            return None;
        }
        if let Some(limit) = self.cut_after
            && self.sent >= limit
        {
            self.done = true;
            Self::let_hyper_flush().await;
            return Some(Err(std::io::Error::other("fault: connection cut")));
        }
        if let Some(limit) = self.change_after
            && self.sent >= limit
        {
            self.done = true;
            self.change_file().await;
            Self::let_hyper_flush().await;
            return Some(Err(std::io::Error::other("fault: file changed mid-download")));
        }
        if self.remaining == 0 {
            self.done = true;
            let tail = self.gzip.take().map(|encoder| encoder.finish().unwrap_or_default());
            return tail.filter(|t| !t.is_empty()).map(|t| Ok(Bytes::from(t)));
        }
        let mut want = (CHUNK as u64).min(self.remaining);
        for limit in [self.cut_after, self.change_after].into_iter().flatten() {
            if limit > self.sent {
                want = want.min(limit - self.sent);
            }
        }
        let mut buffer = vec![0u8; want as usize];
        if let Err(e) = handle.read_exact(&mut buffer).await {
            self.done = true;
            return Some(Err(e));
        }
        self.remaining -= want;
        self.sent += want;
        if let Some(rate) = self.throttle.filter(|r| *r > 0) {
            tokio::time::sleep(Duration::from_secs_f64(want as f64 / rate as f64)).await;
        }
        match &mut self.gzip {
            None => Some(Ok(Bytes::from(buffer))),
            Some(encoder) => {
                // Flush each chunk (a sync flush), as streaming servers do, so the client
                // can decode as it goes rather than at the end.
                if let Err(e) = encoder.write_all(&buffer).and_then(|()| encoder.flush()) {
                    return Some(Err(e));
                }
                Some(Ok(Bytes::from(std::mem::take(encoder.get_mut()))))
            }
        }
    }

    /// A body error makes hyper drop the connection along with whatever it still buffers.
    /// A real cut loses only what was in flight, so pause first: while the body is pending
    /// hyper writes out what it holds.
    async fn let_hyper_flush() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// The "file changed" fault: write a new version of the file, then (the caller) cut.
    async fn change_file(&mut self) {
        let shared = Arc::clone(&self.shared);
        let (job, index) = (self.job, self.index);
        let inline = shared.config.file_io == crate::FileIo::Inline;
        let respool = move || {
            let (params, members, file) = {
                let mut state = shared.lock();
                state.faults.change_file_after_bytes = None;
                let Some(job) = state.jobs.get(&job) else { return };
                let JobState::Ready(files) = &job.state else { return };
                let Some(file) = files.get(index).cloned() else { return };
                (job.params.clone(), job.members.clone(), file)
            };
            let population = Population::new(shared.config.seed, shared.config.patients);
            let dir = shared.spool_dir.join(format!("job-{job}"));
            let Ok(next) = spool::respool(population, &params, &members, &dir, &file, shared.now_wall()) else {
                return;
            };
            let mut state = shared.lock();
            if let Some(job) = state.jobs.get_mut(&job)
                && let JobState::Ready(files) = &mut job.state
                && let Some(slot) = files.get_mut(index)
            {
                *slot = next;
            }
        };
        if inline {
            respool();
        } else {
            let _ = tokio::task::spawn_blocking(respool).await;
        }
    }
}
