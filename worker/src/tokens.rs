//! The client core's [`TokenProvider`] for a worker: every token comes from the
//! coordinator's token manager for the tenant, so a worker never holds a private key and
//! a 401 seen by many workers causes one refresh. A refusal keeps the coordinator's
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

pub(crate) struct CoordinatorTokens {
    coordinator: Coordinator,
    tenant: String,
    clock: Arc<dyn Clock>,
}

impl CoordinatorTokens {
    pub(crate) fn new(coordinator: Coordinator, tenant: String, clock: Arc<dyn Clock>) -> Self {
        CoordinatorTokens {
            coordinator,
            tenant,
            clock,
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
        Ok(access_token(token, self.clock.now()))
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
        self.ask(None).await
    }

    async fn token_refused(&self, generation: u64) -> Result<AccessToken> {
        self.ask(Some(generation)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
