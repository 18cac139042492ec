//! The client core's [`TokenProvider`] for a worker: every token comes from the
//! coordinator's token manager for the tenant, so a worker never holds a private key and
//! a 401 seen by many workers causes one refresh. The worker keeps each tenant's token
//! ([`TokenCache`], shared by its slots) until it nears expiry or the EHR refuses it, so a
//! request costs no round trip to the coordinator. A refusal keeps the coordinator's
//! category and retryability: the EHR refusing the client arrives as a non-retryable auth
//! error, not as a flaky network.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fhirhaul_common::Result;
use fhirhaul_common::auth::{AccessToken, TokenProvider};
use fhirhaul_common::clock::Clock;
use fhirhaul_common::secret::Secret;
use fhirhaul_proto::convert::error_from_status;
use fhirhaul_proto::v1 as pb;

use crate::Coordinator;

/// A token is asked for again when less than this (or half its lifetime) remains.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Each tenant's current token, as this worker last got it from the coordinator.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: std::sync::Mutex<std::collections::BTreeMap<String, AccessToken>>,
}

impl TokenCache {
    /// The tenant's token, if it has time left at `now`.
    fn fresh(&self, tenant: &str, now: std::time::SystemTime) -> Option<AccessToken> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let token = tokens.get(tenant)?;
        let margin = REFRESH_MARGIN.min(token.lifetime / 2);
        let left = token.expires_at.duration_since(now).ok()?;
        (left > margin).then(|| token.clone())
    }

    /// The EHR answered 401: forget the tenant's token, whichever it is. (Generations are
    /// numbered by each leader's token manager from 1, so they cannot tell an older token
    /// from a newer one across leader changes; the coordinator, asked with the refused
    /// generation, decides whether to refresh.)
    fn refused(&self, tenant: &str) {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    /// The token the coordinator just gave, replacing any held one.
    fn keep(&self, tenant: &str, token: &AccessToken) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), token.clone());
    }
}

pub(crate) struct CoordinatorTokens {
    coordinator: Coordinator,
    tenant: String,
    clock: Arc<dyn Clock>,
    cache: Arc<TokenCache>,
}

impl CoordinatorTokens {
    pub(crate) fn new(coordinator: Coordinator, tenant: String, clock: Arc<dyn Clock>, cache: Arc<TokenCache>) -> Self {
        CoordinatorTokens {
            coordinator,
            tenant,
            clock,
            cache,
        }
    }

    async fn ask(&self, refused_generation: Option<u64>) -> Result<AccessToken> {
        let request = pb::GetTokenRequest {
            worker_id: self.coordinator.worker_id.clone(),
            tenant: self.tenant.clone(),
            refused_generation,
        };
        let token = self
            .coordinator
            .call(
                request,
                |mut client, request| async move { client.get_token(request).await },
            )
            .await
            .map_err(|status| error_from_status(&status, "the coordinator could not provide a token"))?;
        let token = access_token(token, self.clock.now());
        self.cache.keep(&self.tenant, &token);
        Ok(token)
    }
}

/// The token as the client core holds it; its lifetime is counted from `now`.
fn access_token(token: pb::GetTokenResponse, now: std::time::SystemTime) -> AccessToken {
    let expires_at = UNIX_EPOCH + Duration::from_millis(token.expires_at_unix_ms);
    AccessToken {
        value: Secret::new(token.access_token),
        expires_at,
        lifetime: expires_at.duration_since(now).unwrap_or_default(),
        scope: None,
        generation: token.generation,
    }
}

#[async_trait::async_trait]
impl TokenProvider for CoordinatorTokens {
    async fn token(&self) -> Result<AccessToken> {
        if let Some(token) = self.cache.fresh(&self.tenant, self.clock.now()) {
            return Ok(token);
        }
        self.ask(None).await
    }

    async fn token_refused(&self, generation: u64) -> Result<AccessToken> {
        self.cache.refused(&self.tenant);
        self.ask(Some(generation)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(generation: u64, expires_at: std::time::SystemTime, lifetime: Duration) -> AccessToken {
        AccessToken {
            value: Secret::new(format!("t{generation}")),
            expires_at,
            lifetime,
            scope: None,
            generation,
        }
    }

    #[test]
    fn a_cached_token_serves_until_it_nears_expiry_or_is_refused() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let cache = TokenCache::default();
        assert!(cache.fresh("epic", now).is_none());
        cache.keep(
            "epic",
            &token(3, now + Duration::from_secs(300), Duration::from_secs(300)),
        );
        assert_eq!(cache.fresh("epic", now).unwrap().generation, 3);
        assert!(cache.fresh("cerner", now).is_none(), "per tenant");
        // Within the refresh margin (60 s, or half a short lifetime), ask again.
        assert!(cache.fresh("epic", now + Duration::from_secs(241)).is_none());
        assert!(cache.fresh("epic", now + Duration::from_secs(239)).is_some());
        // What the coordinator gives last is held, whatever its generation (a new leader
        // numbers its tokens from 1 again).
        cache.keep(
            "epic",
            &token(1, now + Duration::from_secs(900), Duration::from_secs(900)),
        );
        assert_eq!(cache.fresh("epic", now).unwrap().generation, 1);
        // A 401: forgotten, and the coordinator is asked.
        cache.refused("epic");
        assert!(cache.fresh("epic", now).is_none());
    }

    #[test]
    fn a_token_lifetime_is_counted_from_the_given_clock() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let token = access_token(
            pb::GetTokenResponse {
                access_token: "t".into(),
                generation: 3,
                expires_at_unix_ms: 1_300_000,
            },
            now,
        );
        assert_eq!(token.lifetime, Duration::from_secs(300));
        assert_eq!(token.generation, 3);
        let expired = access_token(
            pb::GetTokenResponse {
                access_token: "t".into(),
                generation: 3,
                expires_at_unix_ms: 1_000,
            },
            now,
        );
        assert_eq!(expired.lifetime, Duration::ZERO);
    }
}
