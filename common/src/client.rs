//! [`FhirClient`]: every request the client core makes to an EHR goes through here, so the
//! rules live in one place:
//!
//! - the bearer token goes only to the FHIR server's origin or an allow-listed one, and
//!   never after a redirect has left those origins (Oracle Health answers file requests with
//!   307s to cloud storage; the storage must not see the token);
//! - a 401 on a request that carried the token refreshes it once (one refresh shared by every
//!   caller refused with the same token) and repeats the request;
//! - redirects are followed here, a bounded number of hops.

use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, LOCATION};
use http::{Method, StatusCode};
use url::{Origin, Url};

use crate::auth::{AccessToken, TokenProvider};
use crate::clock::{Clock, Entropy};
use crate::error::{Error, Result};
use crate::fhir::EhrMessage;
use crate::http::{HttpRequest, HttpResponse, HttpTransport};
use crate::retry::{RetryAfterForm, parse_retry_after_form};
use crate::url_util::SafeUrl;

/// Refreshes of the token for one request answered 401 (see [`FhirClient::send`]).
const MAX_REFRESHES_PER_REQUEST: u32 = 2;

const MAX_REDIRECTS: usize = 5;
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Whether a request should carry the access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Send the token (only to allowed origins; refusing to send it elsewhere is an error).
    Bearer,
    /// Never send the token (capability URLs, `requiresAccessToken: false`).
    Anonymous,
}

/// The shared context of one tenant's EHR.
#[derive(Clone)]
pub struct FhirClient {
    transport: Arc<dyn HttpTransport>,
    base: Url,
    tokens: Arc<dyn TokenProvider>,
    token_origins: Vec<Origin>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
}

impl FhirClient {
    /// `extra_token_origins`: origins besides the FHIR base's that may receive the token.
    pub fn new(
        transport: Arc<dyn HttpTransport>,
        base: Url,
        tokens: Arc<dyn TokenProvider>,
        extra_token_origins: &[Url],
        clock: Arc<dyn Clock>,
        entropy: Entropy,
    ) -> Self {
        let mut token_origins = vec![base.origin()];
        token_origins.extend(extra_token_origins.iter().map(Url::origin));
        FhirClient {
            transport,
            base,
            tokens,
            token_origins,
            clock,
            entropy,
        }
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn entropy(&self) -> &Entropy {
        &self.entropy
    }

    pub fn tokens(&self) -> &Arc<dyn TokenProvider> {
        &self.tokens
    }

    /// Whether `url`'s origin may receive the access token.
    pub fn may_receive_token(&self, url: &Url) -> bool {
        self.token_origins.contains(&url.origin())
    }

    /// Sends `request`, adding the token when `auth` says so, refreshing it on 401 and
    /// following redirects. A 401 is answered with the provider's current token, or a new
    /// one if the refused token was the current one; that current token may itself have
    /// been revoked meanwhile (a worker's cached token was older than the coordinator's),
    /// so a second 401 refreshes once more, and only then is the 401 the answer.
    pub async fn send(&self, request: HttpRequest, auth: Auth) -> Result<HttpResponse> {
        let mut token = match auth {
            Auth::Anonymous => None,
            Auth::Bearer => {
                if !self.may_receive_token(&request.url) {
                    return Err(Error::ForeignOrigin {
                        url: SafeUrl::from(&request.url),
                    });
                }
                Some(self.tokens.token().await?)
            }
        };
        let mut refreshes = 0;
        loop {
            let (response, token_reached_responder) =
                self.send_following_redirects(request.clone(), token.as_ref()).await?;
            if response.status == StatusCode::UNAUTHORIZED
                && token_reached_responder
                && refreshes < MAX_REFRESHES_PER_REQUEST
                && let Some(refused) = &token
            {
                refreshes += 1;
                let fresh = self.tokens.token_refused(refused.generation).await?;
                // The same token again: the provider has nothing better; the 401 stands.
                if fresh.generation == refused.generation && fresh.value.expose() == refused.value.expose() {
                    return Ok(response);
                }
                token = Some(fresh);
                continue;
            }
            return Ok(response);
        }
    }

    /// Returns the final response and whether the token was sent to the server that gave it.
    async fn send_following_redirects(
        &self,
        mut request: HttpRequest,
        token: Option<&AccessToken>,
    ) -> Result<(HttpResponse, bool)> {
        let mut token_allowed = token.is_some();
        for _hop in 0..=MAX_REDIRECTS {
            token_allowed &= self.may_receive_token(&request.url);
            let mut outgoing = request.clone();
            outgoing.headers.remove(AUTHORIZATION);
            if let (true, Some(token)) = (token_allowed, token) {
                outgoing = outgoing.header(AUTHORIZATION, &format!("Bearer {}", token.value.expose()));
            }
            let response = self.transport.send(outgoing).await?;
            let status = response.status;
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok((response, token_allowed));
            }
            let location = response.header_str(LOCATION.as_str()).ok_or_else(|| Error::Protocol {
                url: SafeUrl::from(&request.url),
                reason: format!("HTTP {} redirect without a Location header", status.as_u16()),
            })?;
            let next = request.url.join(location).map_err(|e| Error::Protocol {
                url: SafeUrl::from(&request.url),
                reason: format!("redirect Location is not a URL: {e}"),
            })?;
            if !self.may_receive_token(&next) && token_allowed {
                tracing::debug!(to = %SafeUrl::from(&next), "redirect leaves the FHIR origin; dropping the token");
            }
            if status == StatusCode::SEE_OTHER
                || ((status == StatusCode::MOVED_PERMANENTLY || status == StatusCode::FOUND)
                    && request.method == Method::POST)
            {
                request.method = Method::GET;
                request.body = bytes::Bytes::new();
                request.headers.remove(http::header::CONTENT_TYPE);
            }
            request.url = next;
        }
        Err(Error::Protocol {
            url: SafeUrl::from(&request.url),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// The typed error for a response that was not what the caller wanted: 429/503 become
    /// [`Error::Throttled`] with the server's `Retry-After`, anything else [`Error::Http`]
    /// with the OperationOutcome text (or an excerpt of a non-FHIR body).
    pub async fn error_from(&self, response: HttpResponse) -> Error {
        let url = SafeUrl::from(&response.url);
        let status = response.status.as_u16();
        let retry_after = self.retry_after(&response);
        let content_type = response.content_type().map(str::to_owned);
        let body = match response.read_limited(ERROR_BODY_LIMIT).await {
            Ok(body) => body,
            Err(error) => return error,
        };
        let message = EhrMessage::from_body(content_type.as_deref(), &body);
        if status == 429 || status == 503 {
            tracing::debug!(%url, status, %message, "server asked to slow down");
            return Error::Throttled {
                url,
                status,
                retry_after,
            };
        }
        Error::Http { url, status, message }
    }

    /// The response's `Retry-After`, if present and readable. A value that is an absolute
    /// time rather than a delay (some servers send epoch seconds or milliseconds) is read
    /// as one, and said so in the log.
    pub fn retry_after(&self, response: &HttpResponse) -> Option<Duration> {
        let raw = response.header_str("retry-after")?;
        let (delay, form) = parse_retry_after_form(raw, self.clock.now())?;
        if matches!(form, RetryAfterForm::EpochSeconds | RetryAfterForm::EpochMillis) {
            tracing::info!(
                url = %SafeUrl::from(&response.url),
                retry_after = raw,
                ?form,
                delay_s = delay.as_secs(),
                "Retry-After is an absolute time, not a delay; reading it as one"
            );
        }
        Some(delay)
    }
}
