//! The one HTTP seam. The client logic builds [`HttpRequest`]s and reads [`HttpResponse`]s;
//! an [`HttpTransport`] moves them. [`ReqwestTransport`] is production (one pooled client for
//! every request, proxy variables honoured, timeouts); the simulation supplies a hyper-over-
//! turmoil implementation. Transports never follow redirects and never decode
//! `Content-Encoding`: the client does both itself, so the rules about where a token may go
//! and which byte offset a resume starts from live in one place for every transport.

use std::pin::Pin;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, StatusCode};
use url::Url;

use crate::error::{Error, Result};
use crate::url_util::SafeUrl;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// A request as the client logic sees it. Its `Debug` shows the URL without its query
/// (signed storage URLs carry credentials there), header names with the values of
/// `Authorization` redacted, and only the body's length (a token request's body holds the
/// signed client assertion).
#[derive(Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(name, value)| {
                if name == http::header::AUTHORIZATION || value.is_sensitive() {
                    format!("{name}: <redacted>")
                } else {
                    format!("{name}: {}", value.to_str().unwrap_or("<binary>"))
                }
            })
            .collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &SafeUrl::from(&self.url).to_string())
            .field("headers", &headers)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl HttpRequest {
    pub fn new(method: Method, url: Url) -> Self {
        HttpRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header. Names and values here are program constants or already-validated
    /// values; an invalid one is a bug, reported as a protocol error rather than a panic.
    pub fn header(mut self, name: http::header::HeaderName, value: &str) -> Self {
        match http::HeaderValue::from_str(value) {
            Ok(mut value) => {
                // `http` prints a sensitive value as "Sensitive" in any Debug.
                if name == http::header::AUTHORIZATION {
                    value.set_sensitive(true);
                }
                self.headers.append(name, value);
            }
            Err(_) => tracing::warn!(header = %name, "dropping header with invalid characters"),
        }
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// A response whose body has not been read yet.
pub struct HttpResponse {
    pub status: StatusCode,
    /// The HTTP version the server answered with (framing rules differ by version).
    pub version: http::Version,
    pub headers: HeaderMap,
    /// The URL this response came from.
    pub url: Url,
    pub body: BodyStream,
}

impl std::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("url", &SafeUrl::from(&self.url))
            .finish_non_exhaustive()
    }
}

impl HttpResponse {
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.header_str("content-type")
    }

    /// Whether the body ends only where the server closes the connection (HTTP/1 with
    /// neither `Content-Length` nor chunked transfer coding, RFC 9112 §6.3 rule 8). Such a
    /// body looks complete when it was cut, so its end must be confirmed some other way.
    pub fn close_delimited(&self) -> bool {
        let chunked = self
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("chunked")));
        self.version <= http::Version::HTTP_11 && !chunked && !self.headers.contains_key(http::header::CONTENT_LENGTH)
    }

    /// Reads the whole body, refusing more than `limit` bytes (manifests, token responses and
    /// error bodies are small; NDJSON is never read this way).
    pub async fn read_limited(mut self, limit: usize) -> Result<Bytes> {
        let mut collected = Vec::new();
        while let Some(chunk) = self.body.next().await {
            let chunk = chunk?;
            if collected.len() + chunk.len() > limit {
                return Err(Error::Protocol {
                    url: SafeUrl::from(&self.url),
                    reason: format!("response body is larger than the {limit} bytes allowed here"),
                });
            }
            collected.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(collected))
    }
}

/// Moves one request to a server and returns its response head with a streaming body.
#[async_trait::async_trait]
pub trait HttpTransport: Send + Sync + 'static {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse>;
}

/// Timeouts for [`ReqwestTransport`].
#[derive(Debug, Clone)]
pub struct TransportSettings {
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (a stalled download fails after this).
    pub read_timeout: Duration,
    pub user_agent: String,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(120),
            user_agent: format!("fhirhaul/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Production transport: one reqwest client (one connection pool) for every request.
/// Proxy settings come from the usual `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` variables.
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
}

static RUSTLS_PROVIDER: Once = Once::new();

impl ReqwestTransport {
    pub fn new(settings: &TransportSettings) -> Result<Self> {
        RUSTLS_PROVIDER.call_once(|| {
            // Fails only if another provider was installed first, which is just as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .user_agent(settings.user_agent.clone())
            .build()
            .map_err(|e| Error::Config {
                key: "http".into(),
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(ReqwestTransport { client })
    }
}

fn describe_reqwest_error(error: &reqwest::Error) -> String {
    // reqwest's Display names the URL including the query; build our own text instead.
    let mut text = if error.is_timeout() {
        "timed out".to_string()
    } else if error.is_connect() {
        "could not connect".to_string()
    } else if error.is_body() || error.is_decode() {
        "response body interrupted".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait::async_trait]
impl HttpTransport for ReqwestTransport {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse> {
        let url = request.url.clone();
        let response = self
            .client
            .request(request.method, request.url)
            .headers(request.headers)
            .body(request.body)
            .send()
            .await
            .map_err(|e| {
                let (url, message) = (SafeUrl::from(&url), describe_reqwest_error(&e));
                // reqwest reports DNS, refused connections, connect timeouts and TLS
                // handshakes as connect errors: the request never left.
                if e.is_connect() {
                    Error::Unsent { url, message }
                } else {
                    Error::Network { url, message }
                }
            })?;
        let status = response.status();
        let version = response.version();
        let headers = response.headers().clone();
        let body_url = SafeUrl::from(&url);
        let body = response.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| Error::Network {
                url: body_url.clone(),
                message: describe_reqwest_error(&e),
            })
        });
        Ok(HttpResponse {
            status,
            version,
            headers,
            url,
            body: Box::pin(body),
        })
    }
}

/// A byte stream a [`Dialer`] opens (a TCP connection of some network).
pub trait Connection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// Opens connections by host and port. Production uses the OS network through reqwest; a
/// simulation supplies one over its simulated network.
#[async_trait::async_trait]
pub trait Dialer: Send + Sync + 'static {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Connection>>;
}

/// An [`HttpTransport`] on plain hyper over any [`Dialer`]: HTTP/1.1, plaintext, one
/// connection per request (no pool, so nothing carries over between requests). It is the
/// transport for simulated networks, where every connection is visible to the simulator.
pub struct HyperTransport<D> {
    dialer: D,
    /// Longest wait for a connection, a response head, or the next body chunk: a link that
    /// silently drops everything (a partition) must end in an error, not a hang.
    silence_limit: Duration,
}

impl<D: Dialer> HyperTransport<D> {
    pub fn new(dialer: D) -> Self {
        HyperTransport {
            dialer,
            silence_limit: TransportSettings::default().read_timeout,
        }
    }

    pub fn with_silence_limit(mut self, limit: Duration) -> Self {
        self.silence_limit = limit;
        self
    }
}

#[async_trait::async_trait]
impl<D: Dialer> HttpTransport for HyperTransport<D> {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse> {
        let url = request.url.clone();
        let network = |message: String| Error::Network {
            url: SafeUrl::from(&url),
            message,
        };
        let unsent = |message: String| Error::Unsent {
            url: SafeUrl::from(&url),
            message,
        };
        if url.scheme() != "http" {
            return Err(unsent(format!(
                "{} is not supported by this transport (plain http only)",
                url.scheme()
            )));
        }
        let host = url.host_str().ok_or_else(|| unsent("no host".into()))?.to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let limit = self.silence_limit;
        let timed_out = || network(format!("no answer for {}s", limit.as_secs()));
        let stream = tokio::time::timeout(limit, self.dialer.dial(&host, port))
            .await
            .map_err(|_| unsent(format!("could not connect within {}s", limit.as_secs())))?
            .map_err(|e| unsent(format!("could not connect: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unsent(format!("handshake failed: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut builder = http::Request::builder().method(request.method).uri(match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        });
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        builder = builder.header(http::header::HOST, authority);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let outgoing = builder
            .body(http_body_util::Full::new(request.body))
            .map_err(|e| unsent(format!("invalid request: {e}")))?;
        let response = tokio::time::timeout(limit, sender.send_request(outgoing))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| network(format!("request failed: {e}")))?;
        let (parts, body) = response.into_parts();
        let body_url = SafeUrl::from(&url);
        // Each chunk must arrive within the limit; after an error the stream ends.
        let frames = futures_util::stream::unfold(Some(http_body_util::BodyStream::new(body)), move |state| {
            let body_url = body_url.clone();
            async move {
                let mut body = state?;
                loop {
                    let failed = |message: String| {
                        Some((
                            Err(Error::Network {
                                url: body_url.clone(),
                                message,
                            }),
                            None,
                        ))
                    };
                    match tokio::time::timeout(limit, body.next()).await {
                        Err(_) => return failed(format!("response body silent for {}s", limit.as_secs())),
                        Ok(None) => return None,
                        Ok(Some(Err(e))) => return failed(format!("response body interrupted: {e}")),
                        Ok(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                return Some((Ok(data), Some(body)));
                            }
                        }
                    }
                }
            }
        });
        Ok(HttpResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            url,
            body: Box::pin(frames),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_never_shows_its_token_its_assertion_or_its_signed_query() {
        let request = HttpRequest::new(
            Method::POST,
            "https://storage.example/files/1?X-Amz-Signature=SIGNED-SECRET"
                .parse()
                .unwrap(),
        )
        .header(http::header::AUTHORIZATION, "Bearer ACCESS-SECRET")
        .header(http::header::ACCEPT, "application/fhir+ndjson")
        .body("grant_type=client_credentials&client_assertion=ASSERTION-SECRET");
        let shown = format!("{request:?} {request:#?} {:?}", request.headers);
        for secret in ["ACCESS-SECRET", "ASSERTION-SECRET", "SIGNED-SECRET"] {
            assert!(!shown.contains(secret), "{secret} shows in {shown}");
        }
        assert!(
            shown.contains("application/fhir+ndjson"),
            "other headers still show: {shown}"
        );
        assert!(shown.contains("storage.example/files/1"), "{shown}");
    }

    struct Loopback;

    #[async_trait::async_trait]
    impl Dialer for Loopback {
        async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Connection>> {
            Ok(Box::new(tokio::net::TcpStream::connect((host, port)).await?))
        }
    }

    #[tokio::test]
    async fn a_server_that_goes_silent_is_an_error_not_a_hang() {
        // Answers the head, sends one chunk, then says nothing more while keeping the
        // connection open — what a partition looks like from the client.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 1024];
            let _ = socket.read(&mut buffer).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let transport = HyperTransport::new(Loopback).with_silence_limit(Duration::from_millis(300));
        let url: Url = format!("http://127.0.0.1:{port}/file").parse().unwrap();
        let response = transport.send(HttpRequest::new(Method::GET, url)).await.unwrap();
        let mut body = response.body;
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"first"));
        let error = body.next().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("silent"), "{error}");
        assert!(error.is_retryable());
        assert!(body.next().await.is_none(), "the stream ends after the error");
    }
}
