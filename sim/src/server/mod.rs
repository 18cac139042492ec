//! Routing and handlers. Every refusal is an OperationOutcome (or, at the token endpoint, an
//! RFC 6749 error) saying exactly what was wrong, like a well-behaved EHR; the fault knobs
//! make it behave like a badly-behaved one.
//!
//! Validation helpers return the refusal itself as their `Err` (a ready `Response`), so a
//! handler can `?` its way out; the response is built once per request and never stored.
#![allow(clippy::result_large_err)]

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
mod auth;
mod files;
mod kickoff;
mod status;

use self::auth::*;
use self::files::*;
use self::kickoff::*;
use self::status::*;
use crate::{FileRequestSeen, JoinPolicy, KickoffSeen, RetryAfterStyle, Shared, TokenInfo, random_hex};

type Body = BoxBody<Bytes, std::io::Error>;

/// Marks a response that must not be sent: the connection is dropped instead.
#[derive(Clone, Copy)]
pub(crate) struct DropConnection;

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
        async move {
            let response = route(&shared, storage, request).await;
            if response.extensions().get::<DropConnection>().is_some() {
                // An error from the service makes hyper close the connection unanswered.
                return Err(std::io::Error::other("dropping the connection (planted fault)"));
            }
            Ok(response)
        }
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

/// `Faults::busy_for`: the 429 a request of `kind` gets while the EHR's rate limiter blocks
/// that kind, or `None` once the block has passed.
fn busy(shared: &Shared, kind: &'static str) -> Option<Response<Body>> {
    let mut state = shared.lock();
    let window = state.faults.busy_for?;
    let now = tokio::time::Instant::now();
    let since = *state.busy_since.entry(kind).or_insert(now);
    let left = (since + window).checked_duration_since(now).filter(|d| !d.is_zero())?;
    *state.observed.busy_refusals.entry(kind).or_default() += 1;
    drop(state);
    let mut response = outcome(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        "rate limit exceeded: this client is blocked for a while",
    );
    let wait = left.min(Duration::from_secs(60)).as_secs_f64().ceil().max(1.0) as u64;
    set_header(&mut response, "retry-after", &wait.to_string());
    Some(response)
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
