//! SMART Backend Services: discovery, the client-assertion JWT, the token request, and the
//! token manager that keeps one valid token per tenant.

mod manager;

pub use manager::{TokenManager, TokenProvider, TokenSource, TokenTimings};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use http::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::clock::{Clock, Entropy};
use crate::error::{Error, Result};
use crate::fhir::EhrMessage;
use crate::http::{HttpRequest, HttpTransport};
use crate::keys::SigningKey;
use crate::retry::parse_retry_after;
use crate::secret::Secret;
use crate::url_util::{SafeUrl, join_path};

/// The JWT bearer client assertion type URN (RFC 7523).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// SMART caps the assertion lifetime at five minutes.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// What the spec says to assume when a token response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
const SMALL_BODY_LIMIT: usize = 256 * 1024;

/// How one tenant authenticates.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub fhir_base: Url,
    pub client_id: String,
    /// Overrides the discovered `token_endpoint`.
    pub token_url: Option<String>,
    /// Sent verbatim when set; otherwise `system/*.rs` (permission-v2) or `system/*.read`.
    pub scope: Option<String>,
    /// Put in the JWT header when set; must equal the JWKS URL registered with the EHR.
    pub jku: Option<String>,
    pub assertion_lifetime: Duration,
    /// Refresh when less than this remains (or half the token's lifetime, if shorter).
    pub refresh_margin: Duration,
}

impl AuthSettings {
    pub fn new(fhir_base: Url, client_id: impl Into<String>) -> Self {
        AuthSettings {
            fhir_base,
            client_id: client_id.into(),
            token_url: None,
            scope: None,
            jku: None,
            assertion_lifetime: Duration::from_secs(240),
            refresh_margin: Duration::from_secs(300),
        }
    }
}

/// The parts of `.well-known/smart-configuration` a backend client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartConfiguration {
    /// Absolute, exactly as it will be used for the POST and the JWT `aud`.
    pub token_endpoint: String,
    pub grant_types_supported: Vec<String>,
    pub capabilities: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub token_endpoint_auth_signing_alg_values_supported: Vec<String>,
}

#[derive(Deserialize)]
struct RawSmartConfiguration {
    token_endpoint: Option<Value>,
    #[serde(default)]
    grant_types_supported: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default)]
    token_endpoint_auth_signing_alg_values_supported: Vec<String>,
}

/// An access token and what the server said about it. `generation` numbers the tokens one
/// manager has issued, so a 401 can say which token it was refused with.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub value: Secret,
    pub expires_at: SystemTime,
    pub lifetime: Duration,
    pub scope: Option<String>,
    pub generation: u64,
}

/// Fetches `{base}/.well-known/smart-configuration` (appended to the base path).
pub async fn discover(transport: &dyn HttpTransport, fhir_base: &Url) -> Result<SmartConfiguration> {
    let url = join_path(fhir_base, &[".well-known", "smart-configuration"]);
    let discovery_error = |reason: String| Error::Discovery {
        url: SafeUrl::from(&url),
        reason,
    };
    let request = HttpRequest::new(Method::GET, url.clone()).header(ACCEPT, "application/json");
    let response = transport.send(request).await?;
    let status = response.status;
    let content_type = response.content_type().map(str::to_owned);
    let body = response.read_limited(SMALL_BODY_LIMIT).await?;
    if !status.is_success() {
        let message = EhrMessage::from_body(content_type.as_deref(), &body);
        return Err(discovery_error(format!("HTTP {}: {message}", status.as_u16())));
    }
    let raw: RawSmartConfiguration = serde_json::from_slice(&body).map_err(|e| {
        discovery_error(format!(
            "not a JSON smart-configuration ({e}); {}",
            EhrMessage::from_body(content_type.as_deref(), &body)
        ))
    })?;
    let token_endpoint = match raw.token_endpoint {
        Some(Value::String(text)) if !text.trim().is_empty() => text,
        Some(_) => return Err(discovery_error("`token_endpoint` is not a string".into())),
        None => return Err(discovery_error("`token_endpoint` is missing".into())),
    };
    let token_endpoint = resolve_endpoint(fhir_base, &token_endpoint)
        .ok_or_else(|| discovery_error(format!("`token_endpoint` `{token_endpoint}` is not a URL")))?;
    let config = SmartConfiguration {
        token_endpoint,
        grant_types_supported: raw.grant_types_supported,
        capabilities: raw.capabilities,
        token_endpoint_auth_methods_supported: raw.token_endpoint_auth_methods_supported,
        token_endpoint_auth_signing_alg_values_supported: raw.token_endpoint_auth_signing_alg_values_supported,
    };
    if !config.grant_types_supported.iter().any(|g| g == "client_credentials") {
        tracing::warn!(url = %SafeUrl::from(&url), "smart-configuration does not list the client_credentials grant; trying anyway");
    }
    if !config.token_endpoint_auth_methods_supported.is_empty()
        && !config
            .token_endpoint_auth_methods_supported
            .iter()
            .any(|m| m == "private_key_jwt")
    {
        tracing::warn!(url = %SafeUrl::from(&url), "smart-configuration does not list private_key_jwt; trying anyway");
    }
    Ok(config)
}

/// An absolute endpoint stays as written (it is the JWT `aud`); a relative one is resolved
/// against the FHIR base as a directory.
fn resolve_endpoint(fhir_base: &Url, endpoint: &str) -> Option<String> {
    if Url::parse(endpoint).is_ok() {
        return Some(endpoint.to_string());
    }
    let mut directory = fhir_base.clone();
    if !directory.path().ends_with('/') {
        let path = format!("{}/", directory.path());
        directory.set_path(&path);
    }
    directory.join(endpoint).ok().map(|u| u.to_string())
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    jti: &'a str,
}

/// Signs a client assertion: header `alg`, `kid`, `typ=JWT` (and `jku` if configured);
/// claims `iss`=`sub`=client_id, `aud`=the token endpoint exactly, `exp`=now+lifetime
/// (capped at five minutes), a fresh `jti`.
pub fn sign_assertion(
    key: &SigningKey,
    client_id: &str,
    token_endpoint: &str,
    jku: Option<&str>,
    lifetime: Duration,
    now: SystemTime,
    jti: &str,
) -> Result<Secret> {
    let mut header = jsonwebtoken::Header::new(key.algorithm().jwt_algorithm());
    header.typ = Some("JWT".into());
    header.kid = Some(key.kid().to_string());
    header.jku = jku.map(str::to_owned);
    let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = AssertionClaims {
        iss: client_id,
        sub: client_id,
        aud: token_endpoint,
        exp: now_secs + lifetime.min(MAX_ASSERTION_LIFETIME).as_secs(),
        jti,
    };
    jsonwebtoken::encode(&header, &claims, key.encoding_key())
        .map(Secret::new)
        .map_err(|e| Error::Key {
            reason: format!("signing the client assertion failed: {e}"),
        })
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<Value>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct RawOAuthError {
    error: String,
    error_description: Option<String>,
    error_uri: Option<String>,
}

/// The default scope when none is configured: v2 syntax if the server says it speaks it.
pub fn default_scope(config: &SmartConfiguration) -> &'static str {
    if config.capabilities.iter().any(|c| c == "permission-v2") {
        "system/*.rs"
    } else {
        "system/*.read"
    }
}

/// Does discovery (once), signs assertions and exchanges them for access tokens.
pub struct Authenticator {
    transport: Arc<dyn HttpTransport>,
    settings: AuthSettings,
    key: SigningKey,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    discovered: tokio::sync::OnceCell<SmartConfiguration>,
}

impl Authenticator {
    pub fn new(
        transport: Arc<dyn HttpTransport>,
        settings: AuthSettings,
        key: SigningKey,
        clock: Arc<dyn Clock>,
        entropy: Entropy,
    ) -> Self {
        Authenticator {
            transport,
            settings,
            key,
            clock,
            entropy,
            discovered: tokio::sync::OnceCell::new(),
        }
    }

    async fn configuration(&self) -> Result<&SmartConfiguration> {
        self.discovered
            .get_or_try_init(|| async {
                let mut config = match &self.settings.token_url {
                    // A configured token URL makes discovery optional: still try it for the
                    // capabilities, but do not fail without it.
                    Some(token_url) => match discover(&*self.transport, &self.settings.fhir_base).await {
                        Ok(config) => config,
                        Err(error) => {
                            tracing::info!(%error, "discovery failed; using the configured token URL");
                            SmartConfiguration {
                                token_endpoint: token_url.clone(),
                                grant_types_supported: vec![],
                                capabilities: vec![],
                                token_endpoint_auth_methods_supported: vec![],
                                token_endpoint_auth_signing_alg_values_supported: vec![],
                            }
                        }
                    },
                    None => discover(&*self.transport, &self.settings.fhir_base).await?,
                };
                if let Some(token_url) = &self.settings.token_url {
                    config.token_endpoint = token_url.clone();
                }
                let algorithms = &config.token_endpoint_auth_signing_alg_values_supported;
                if !algorithms.is_empty() && !algorithms.iter().any(|a| a == self.key.algorithm().as_str()) {
                    tracing::warn!(
                        algorithm = %self.key.algorithm(),
                        supported = ?algorithms,
                        "the server does not list this signing algorithm; trying anyway"
                    );
                }
                Ok(config)
            })
            .await
    }

    /// One token request with a freshly signed assertion.
    pub async fn fetch_token(&self) -> Result<AccessToken> {
        let config = self.configuration().await?;
        let token_url = Url::parse(&config.token_endpoint).map_err(|e| Error::Config {
            key: "token_url".into(),
            reason: format!("`{}` is not an absolute URL: {e}", config.token_endpoint),
        })?;
        let scope = self
            .settings
            .scope
            .clone()
            .unwrap_or_else(|| default_scope(config).to_string());
        let now = self.clock.now();
        let assertion = sign_assertion(
            &self.key,
            &self.settings.client_id,
            &config.token_endpoint,
            self.settings.jku.as_deref(),
            self.settings.assertion_lifetime,
            now,
            &self.entropy.hex(16),
        )?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &scope)
            .append_pair("client_assertion_type", CLIENT_ASSERTION_TYPE)
            .append_pair("client_assertion", assertion.expose())
            .finish();
        let request = HttpRequest::new(Method::POST, token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(form);
        let response = self.transport.send(request).await?;
        let status = response.status;
        let retry_after = response
            .header_str("retry-after")
            .and_then(|v| parse_retry_after(v, self.clock.now()));
        let content_type = response.content_type().map(str::to_owned);
        let body = response.read_limited(SMALL_BODY_LIMIT).await?;
        let safe_url = SafeUrl::from(&token_url);
        if status.as_u16() == 429 || status.as_u16() == 503 {
            return Err(Error::Throttled {
                url: safe_url,
                status: status.as_u16(),
                retry_after,
            });
        }
        if !status.is_success() {
            if let Ok(oauth) = serde_json::from_slice::<RawOAuthError>(&body) {
                return Err(Error::OAuth {
                    url: safe_url,
                    status: status.as_u16(),
                    error: oauth.error,
                    description: oauth.error_description,
                    uri: oauth.error_uri,
                });
            }
            return Err(Error::Http {
                url: safe_url,
                status: status.as_u16(),
                message: EhrMessage::from_body(content_type.as_deref(), &body),
            });
        }
        let token = parse_token_response(&body, &safe_url, now)?;
        check_granted_scope(&scope, token.scope.as_deref());
        Ok(token)
    }
}

fn parse_token_response(body: &[u8], url: &SafeUrl, now: SystemTime) -> Result<AccessToken> {
    let protocol = |reason: String| Error::Protocol {
        url: url.clone(),
        reason,
    };
    let raw: RawToken =
        serde_json::from_slice(body).map_err(|e| protocol(format!("token response is not JSON: {e}")))?;
    let value = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| protocol("token response has no `access_token`".into()))?;
    match raw.token_type.as_deref() {
        Some(kind) if kind.eq_ignore_ascii_case("bearer") => {}
        None => tracing::warn!(url = %url, "token response has no token_type; assuming bearer"),
        Some(other) => {
            return Err(protocol(format!("token_type `{other}` is not supported (only bearer)")));
        }
    }
    let lifetime = match raw.expires_in {
        None | Some(Value::Null) => DEFAULT_TOKEN_LIFETIME,
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| protocol(format!("`expires_in` {n} is not a positive number")))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| protocol(format!("`expires_in` \"{s}\" is not a positive number")))?,
        Some(other) => return Err(protocol(format!("`expires_in` {other} is not a number"))),
    };
    Ok(AccessToken {
        value: Secret::new(value),
        expires_at: now + lifetime,
        lifetime,
        scope: raw.scope,
        generation: 0,
    })
}

/// Logs the granted scope and warns about every requested scope that was not granted.
fn check_granted_scope(requested: &str, granted: Option<&str>) {
    let Some(granted) = granted else {
        tracing::info!(requested, "token response does not list the granted scope");
        return;
    };
    let granted_set: BTreeSet<&str> = granted.split_whitespace().collect();
    let missing: Vec<&str> = requested
        .split_whitespace()
        .filter(|s| !granted_set.contains(s))
        .collect();
    if missing.is_empty() {
        tracing::info!(granted, "access token granted");
    } else {
        tracing::warn!(granted, not_granted = ?missing, "the EHR granted a narrower scope than requested");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningAlgorithm;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn decode_part(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn assertion_has_the_required_header_and_claims() {
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES384, Some("kid-1".into())).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let jwt = sign_assertion(
            &key,
            "client-7",
            "https://auth.example/token",
            Some("https://client.example/jwks.json"),
            Duration::from_secs(900),
            now,
            "nonce-1",
        )
        .unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], "ES384");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], "kid-1");
        assert_eq!(header["jku"], "https://client.example/jwks.json");
        let claims = decode_part(parts[1]);
        assert_eq!(claims["iss"], "client-7");
        assert_eq!(claims["sub"], "client-7");
        assert_eq!(claims["aud"], "https://auth.example/token");
        assert_eq!(claims["jti"], "nonce-1");
        assert_eq!(claims["exp"], 1_700_000_300u64, "capped at five minutes");
    }

    #[test]
    fn token_response_is_parsed_leniently_where_servers_deviate() {
        let url = SafeUrl::from("https://auth.example/token");
        let now = UNIX_EPOCH;
        let token = parse_token_response(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":"3600","scope":"system/*.rs"}"#,
            &url,
            now,
        )
        .unwrap();
        assert_eq!(token.lifetime, Duration::from_secs(3600));
        let token = parse_token_response(br#"{"access_token":"abc","token_type":"bearer"}"#, &url, now).unwrap();
        assert_eq!(token.lifetime, DEFAULT_TOKEN_LIFETIME);
        let error = parse_token_response(br#"{"access_token":"abc","token_type":"DPoP"}"#, &url, now).unwrap_err();
        assert!(error.to_string().contains("token_type `DPoP`"));
        let error = parse_token_response(br#"{"token_type":"bearer"}"#, &url, now).unwrap_err();
        assert!(error.to_string().contains("no `access_token`"));
        let error = parse_token_response(br#"{"access_token":"a","expires_in":-3}"#, &url, now).unwrap_err();
        assert!(error.to_string().contains("expires_in"));
    }

    #[test]
    fn relative_token_endpoint_resolves_against_the_base_directory() {
        let base = Url::parse("https://ehr.example/r4/tenant").unwrap();
        assert_eq!(
            resolve_endpoint(&base, "auth/token").unwrap(),
            "https://ehr.example/r4/tenant/auth/token"
        );
        assert_eq!(
            resolve_endpoint(&base, "/oauth2/token").unwrap(),
            "https://ehr.example/oauth2/token"
        );
        assert_eq!(
            resolve_endpoint(&base, "https://auth.example/t").unwrap(),
            "https://auth.example/t"
        );
    }

    #[test]
    fn default_scope_follows_capabilities() {
        let mut config = SmartConfiguration {
            token_endpoint: "https://a/t".into(),
            grant_types_supported: vec![],
            capabilities: vec!["permission-v1".into()],
            token_endpoint_auth_methods_supported: vec![],
            token_endpoint_auth_signing_alg_values_supported: vec![],
        };
        assert_eq!(default_scope(&config), "system/*.read");
        config.capabilities.push("permission-v2".into());
        assert_eq!(default_scope(&config), "system/*.rs");
    }
}
