//! SMART Backend Services against the simulated EHR: what it accepts, what it refuses and
//! why, token refresh and revocation, single-flight refresh.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fhirhaul_common::Error;
use fhirhaul_common::auth::{TokenProvider, sign_assertion};
use fhirhaul_common::keys::{SigningAlgorithm, SigningKey};
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_sim::{Faults, RegisteredClient, SimConfig};
use support::{connect, harness, harness_with, sim_config, tenant_for};
use tokio_util::sync::CancellationToken;

async fn token_error(h: &support::Harness) -> Error {
    h.client.tokens().token().await.expect_err("the EHR should refuse")
}

fn oauth(error: &Error) -> (&str, &str) {
    match error {
        Error::OAuth { error, description, .. } => (error.as_str(), description.as_deref().unwrap_or_default()),
        other => panic!("expected an OAuth error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_keys_generate_registers_and_authenticates() {
    let sim = fhirhaul_sim::SimEhr::start(sim_config()).await.unwrap();
    for algorithm in [SigningAlgorithm::ES384, SigningAlgorithm::RS384] {
        let (key, pem) = SigningKey::generate(algorithm, None).unwrap();
        let client_id = format!("generated-{algorithm}");
        sim.register_client(RegisteredClient {
            client_id: client_id.clone(),
            jwks: serde_json::json!({ "keys": [key.public_jwk()] }),
            jku: None,
        });
        let dir = tempfile::tempdir().unwrap();
        let credentials = fhirhaul_sim::ClientCredentials {
            client_id,
            kid: key.kid().to_string(),
            algorithm: algorithm.as_str(),
            private_key_pem: pem,
        };
        let mut tenant = tenant_for(&sim, &credentials, dir.path());
        tenant.kid = None; // the thumbprint kid is derived again from the key
        let client = connect(&tenant, &CancellationToken::new());
        let token = client.tokens().token().await.unwrap();
        assert_eq!(
            token.scope.as_deref(),
            Some("system/*.rs"),
            "v2 scopes chosen from permission-v2"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_scopes_when_the_server_lacks_permission_v2_and_configured_scopes_are_verbatim() {
    let h = harness(SimConfig {
        permission_v2: false,
        ..sim_config()
    })
    .await;
    h.client.tokens().token().await.unwrap();
    let h2 = harness_with(sim_config(), "ES384", |t| {
        t.scope = Some("system/Patient.read system/Observation.rs".into())
    })
    .await;
    h2.client.tokens().token().await.unwrap();
    assert_eq!(h.sim.observed().scopes_requested, ["system/*.read"]);
    assert_eq!(
        h2.sim.observed().scopes_requested,
        ["system/Patient.read system/Observation.rs"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_is_refused_with_the_servers_reason() {
    let h = harness_with(sim_config(), "ES384", |t| t.kid = Some("some-other-kid".into())).await;
    let error = token_error(&h).await;
    let (code, description) = oauth(&error);
    assert_eq!(code, "invalid_client");
    assert!(
        description.contains("no registered EC key has kid `some-other-kid`"),
        "{description}"
    );
    assert!(!error.is_retryable(), "refusals are not retried blindly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience_is_refused() {
    // The same endpoint spelled differently is a different `aud`.
    let h = harness_with(sim_config(), "ES384", |t| {
        let base = t.base_url.clone();
        t.token_url = Some(format!(
            "http://{}/auth/token?tenant=x",
            base.host_str().unwrap().to_owned() + ":" + &base.port().unwrap().to_string()
        ));
    })
    .await;
    let error = token_error(&h).await;
    let (code, description) = oauth(&error);
    assert_eq!(code, "invalid_client");
    assert!(
        description.contains("`aud` must be exactly the token endpoint"),
        "{description}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_replayed_jti_and_far_exp_are_refused() {
    let sim = fhirhaul_sim::SimEhr::start(sim_config()).await.unwrap();
    let credentials = sim.new_client("ES384");
    let key = SigningKey::from_pem(&credentials.private_key_pem, None, Some(credentials.kid.clone())).unwrap();
    let (impostor, _) = SigningKey::generate(SigningAlgorithm::ES384, Some(credentials.kid.clone())).unwrap();
    let http = reqwest_client();
    let post = |assertion: String| {
        let http = http.clone();
        let url = sim.token_url().to_string();
        async move {
            let form = format!(
                "grant_type=client_credentials&scope=system%2F*.rs&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
            );
            let response = http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let now = SystemTime::now();
    let sign = |key: &SigningKey, jti: &str| {
        sign_assertion(
            key,
            &credentials.client_id,
            sim.token_url(),
            None,
            Duration::from_secs(200),
            now,
            jti,
        )
        .unwrap()
        .expose()
        .to_string()
    };
    let (status, body) = post(sign(&impostor, "j1")).await;
    assert_eq!(status, 401);
    assert!(body.contains("signature verification failed"), "{body}");
    let once = sign(&key, "j2");
    assert_eq!(post(once.clone()).await.0, 200);
    let (status, body) = post(once).await;
    assert_eq!(status, 401);
    assert!(body.contains("jti `j2` was already used"), "{body}");
    // exp ten minutes ahead, signed by hand (the client never does this).
    let exp = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
    header.kid = Some(credentials.kid.clone());
    let claims = serde_json::json!({"iss": credentials.client_id, "sub": credentials.client_id, "aud": sim.token_url(), "exp": exp, "jti": "j3"});
    let far = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(credentials.private_key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let (status, body) = post(far).await;
    assert_eq!(status, 401);
    assert!(body.contains("more than 300 seconds in the future"), "{body}");
    assert_eq!(sim.observed().tokens_issued, 1);
}

fn reqwest_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_refresh() {
    let h = harness(sim_config()).await;
    let tokens: Arc<dyn TokenProvider> = Arc::clone(h.client.tokens());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let tokens = Arc::clone(&tokens);
        tasks.push(tokio::spawn(async move { tokens.token().await.unwrap().generation }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 1);
    }
    assert_eq!(h.sim.observed().tokens_issued, 1, "one token for twenty callers");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let tokens = Arc::clone(&tokens);
        tasks.push(tokio::spawn(async move {
            tokens.token_refused(1).await.unwrap().generation
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 2);
    }
    assert_eq!(
        h.sim.observed().tokens_issued,
        2,
        "twenty refusals of one token cause one refresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_expire_or_are_revoked_mid_export_cause_no_failed_file() {
    // Tokens live 2 s, so the manager refreshes ahead of expiry during the export; the
    // EHR also revokes each token after a few uses, so 401s happen mid-download too.
    let config = SimConfig {
        token_lifetime: Duration::from_secs(2),
        job_duration: Duration::from_millis(2500),
        ..sim_config()
    };
    let h = harness(config).await;
    h.sim.set_faults(|f: &mut Faults| f.revoke_token_after_uses = Some(4));
    let report = h.export(&ExportRequest::default()).await.unwrap();
    h.assert_identical(&report);
    let observed = h.sim.observed();
    assert!(observed.unauthorized >= 1, "the EHR did refuse some requests");
    assert!(
        observed.tokens_issued >= 3,
        "and the client re-authenticated: {}",
        observed.tokens_issued
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrower_grant_leads_to_a_clear_refusal() {
    let config = SimConfig {
        grant_scope: Some("system/Patient.rs".into()),
        ..sim_config()
    };
    let h = harness(config).await;
    let error = h.export(&ExportRequest::default()).await.unwrap_err();
    assert!(matches!(error, Error::Http { status: 403, .. }));
    assert!(
        error
            .to_string()
            .contains("the token's scopes do not allow reading Encounter"),
        "{error}"
    );
}
