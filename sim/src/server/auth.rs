//! SMART discovery, the token endpoint (client-assertion checks through `jose`) and bearer-token checks.

use super::*;

pub(super) fn discovery(shared: &Shared) -> Response<Body> {
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
pub(super) fn scope_allows_read(scope: &str, kind: &str) -> bool {
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

pub(super) fn valid_scope_syntax(scope: &str) -> bool {
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

pub(super) async fn token(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
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
    shared.lock().observed.secrets_seen.push(assertion.clone());
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
    state.observed.secrets_seen.push(access_token.clone());
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
pub(super) fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(String, Vec<String>), Response<Body>> {
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
