//! The client core's [`TokenProvider`] for a worker: every token comes from the
//! coordinator's token manager for the tenant, so a worker never holds a private key and
//! a 401 seen by many workers causes one refresh.

use std::time::{Duration, UNIX_EPOCH};

use fhirhaul_common::auth::{AccessToken, TokenProvider};
use fhirhaul_common::secret::Secret;
use fhirhaul_common::{Error, Result};
use fhirhaul_proto::v1 as pb;

use crate::Coordinator;

pub(crate) struct CoordinatorTokens {
    coordinator: Coordinator,
    tenant: String,
}

impl CoordinatorTokens {
    pub(crate) fn new(coordinator: Coordinator, tenant: String) -> Self {
        CoordinatorTokens { coordinator, tenant }
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
            .map_err(|status| Error::Network {
                url: fhirhaul_common::url_util::SafeUrl::from("grpc://coordinator/GetToken"),
                message: format!("the coordinator could not provide a token: {}", status.message()),
            })?;
        let expires_at = UNIX_EPOCH + Duration::from_millis(token.expires_at_unix_ms);
        Ok(AccessToken {
            value: Secret::new(token.access_token),
            expires_at,
            lifetime: expires_at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            scope: None,
            generation: token.generation,
        })
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
