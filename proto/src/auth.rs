//! The server side of the cluster token: one interceptor in front of every fhirhaul service
//! (worker, admin, raft), comparing in constant time. The client side is
//! [`crate::connect::with_cluster_token`].

use fhirhaul_common::secret::Secret;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Checks the cluster token on every call, when one is configured.
#[derive(Clone)]
pub struct ClusterAuth {
    token: Option<Secret>,
}

impl ClusterAuth {
    pub fn new(token: Option<Secret>) -> Self {
        ClusterAuth { token }
    }

    /// Whether calls must carry a token.
    pub fn is_required(&self) -> bool {
        self.token.is_some()
    }

    /// Passes a request that carries `authorization: Bearer <token>` (or any request when no
    /// token is configured); refuses every other with `UNAUTHENTICATED`, never echoing it.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else { return Ok(()) };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Constant time in the token's contents (a length mismatch returns early, which
        // reveals only the length).
        if bool::from(given.ct_eq(expected.expose().as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("a valid cluster token is required"))
        }
    }
}

impl tonic::service::Interceptor for ClusterAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn the_cluster_token_is_required_exactly_when_one_is_set() {
        let mut open = ClusterAuth::new(None);
        assert!(tonic::service::Interceptor::call(&mut open, with_authorization(None)).is_ok());
        let mut closed = ClusterAuth::new(Some(Secret::new("s3cret".to_string())));
        for refused in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Basic s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
        ] {
            let status = tonic::service::Interceptor::call(&mut closed, with_authorization(refused)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
            assert!(!status.message().contains("s3cret"), "the token is never echoed");
        }
        assert!(tonic::service::Interceptor::call(&mut closed, with_authorization(Some("Bearer s3cret"))).is_ok());
    }
}
