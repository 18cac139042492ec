//! Export files, from the FHIR server (token required) or the storage origin (signed URL, token refused): Range, If-Range, validators, gzip, planted faults.

use super::*;

pub(super) fn record_file(shared: &Shared, job: u64, index: usize, storage: bool, headers: &HeaderMap, status: u16) {
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

pub(super) async fn fhir_file(
    shared: &Arc<Shared>,
    job: &str,
    file: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let headers = request.headers().clone();
    let (Some(job), Some(index)) = (parse_job(job), file.parse::<usize>().ok()) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such file");
    };
    if let Err(response) = authorize(shared, &headers) {
        record_file(shared, job, index, false, &headers, 401);
        return response;
    }
    if let Err(why) = link_alive(shared, query_value(&request, "exp")) {
        record_file(shared, job, index, false, &headers, 404);
        return outcome(StatusCode::NOT_FOUND, "not-found", why);
    }
    if let Some(response) = busy(shared, "file") {
        record_file(shared, job, index, false, &headers, 429);
        return response;
    }
    if shared.config.redirect_files {
        record_file(shared, job, index, false, &headers, 307);
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        set_header(
            &mut response,
            "location",
            &storage_url(shared, job, index, link_expiry(shared)),
        );
        return response;
    }
    serve_file(shared, job, index, false, &headers).await
}

pub(super) async fn storage_file(shared: &Arc<Shared>, rest: &str, request: Request<Incoming>) -> Response<Body> {
    let headers = request.headers().clone();
    let parts: Vec<&str> = rest.split('/').collect();
    let (Some(job), Some(index)) = (
        parts.first().and_then(|j| parse_job(j)),
        parts.get(1).and_then(|i| i.parse::<usize>().ok()),
    ) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such object");
    };
    let signature = query_value(&request, "sig");
    let exp = query_value(&request, "exp");
    let exp_ms = exp.as_deref().and_then(|e| e.parse::<u64>().ok());
    if signature.as_deref() != Some(storage_signature(shared, job, index, exp_ms).as_str()) {
        record_file(shared, job, index, true, &headers, 403);
        return respond(
            StatusCode::FORBIDDEN,
            "application/xml",
            "<Error><Code>SignatureDoesNotMatch</Code></Error>",
        );
    }
    if let Err(why) = link_alive(shared, exp) {
        record_file(shared, job, index, true, &headers, 403);
        return respond(
            StatusCode::FORBIDDEN,
            "application/xml",
            format!("<Error><Code>AccessDenied</Code><Message>{why}</Message></Error>"),
        );
    }
    if let Some(response) = busy(shared, "file") {
        record_file(shared, job, index, true, &headers, 429);
        return response;
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

fn query_value(request: &Request<Incoming>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Whether a link with this `exp` still works (`SimConfig::link_lifetime`).
fn link_alive(shared: &Shared, exp: Option<String>) -> Result<(), &'static str> {
    if shared.config.link_lifetime.is_none() {
        return Ok(());
    }
    let exp = exp
        .and_then(|e| e.parse::<u64>().ok())
        .ok_or("link has no valid expiry")?;
    if unix_ms(shared.now_wall()) > exp {
        return Err("Request has expired");
    }
    Ok(())
}

pub(super) enum RangeRequest {
    Whole,
    From(u64),
}

pub(super) async fn serve_file(
    shared: &Arc<Shared>,
    job_id: u64,
    index: usize,
    storage: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let in_flight = match InFlight::enter(shared) {
        Ok(in_flight) => in_flight,
        Err(response) => {
            record_file(shared, job_id, index, storage, headers, 429);
            return response;
        }
    };
    let (file, faults_cut, file_500, file_html, change_after, throttle, unframed, line_cut) = {
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
            faults.close_delimited,
            faults.cut_at_line_boundary,
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
        cut_at_line_boundary: line_cut,
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
        _in_flight: in_flight,
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
    if unframed {
        // HTTP/1.0 without a length: hyper ends the body by closing the connection.
        *response.version_mut() = http::Version::HTTP_10;
    }
    if gzip {
        // The gzip variant is a different representation: weak ETag, like nginx does.
        set_header(&mut response, "etag", &format!("W/{etag}"));
        set_header(&mut response, "content-encoding", "gzip");
        set_header(&mut response, "vary", "Accept-Encoding");
    } else if unframed {
        set_header(&mut response, "etag", &etag);
        if start > 0 {
            set_header(
                &mut response,
                "content-range",
                &format!("bytes {start}-{}/{}", file.bytes - 1, file.bytes),
            );
        }
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
pub(super) enum SpoolFile {
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

pub(super) struct StreamPlan {
    remaining: u64,
    sent: u64,
    cut_after: Option<u64>,
    cut_at_line_boundary: bool,
    change_after: Option<u64>,
    gzip: Option<flate2::write::GzEncoder<Vec<u8>>>,
    throttle: Option<u64>,
    shared: Arc<Shared>,
    job: u64,
    index: usize,
    done: bool,
    /// Counts this body as being served until it ends or the connection drops.
    _in_flight: InFlight,
}

/// One file body being served (`Faults::max_concurrent_files`).
pub(super) struct InFlight(Arc<Shared>);

impl InFlight {
    /// Counts a new download, or refuses it with 429 when the EHR is at its limit.
    fn enter(shared: &Arc<Shared>) -> Result<InFlight, Response<Body>> {
        let mut state = shared.lock();
        if let Some(max) = state.faults.max_concurrent_files
            && state.files_in_flight >= max
        {
            state.observed.concurrency_refusals += 1;
            drop(state);
            let mut response = outcome(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                &format!("at most {max} downloads at once"),
            );
            set_header(&mut response, "retry-after", "1");
            return Err(response);
        }
        state.files_in_flight += 1;
        state.observed.max_files_in_flight = state.observed.max_files_in_flight.max(state.files_in_flight);
        Ok(InFlight(Arc::clone(shared)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.files_in_flight = state.files_in_flight.saturating_sub(1);
    }
}

pub(super) const CHUNK: usize = 64 * 1024;

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
        if self.cut_at_line_boundary
            && self.cut_after == Some(self.sent + want)
            && let Some(newline) = buffer.iter().rposition(|b| *b == b'\n')
        {
            // The cut comes right after this chunk: end the chunk at its last whole line
            // (what follows is never sent; the cut comes next).
            buffer.truncate(newline + 1);
            want = buffer.len() as u64;
            self.cut_after = Some(self.sent + want);
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
