//! gRPC contracts of a fhirhaul cluster (package `fhirhaul.v1`), generated from `proto/`:
//!
//! - `WorkerService`: workers register, heartbeat, lease files (long-poll), renew with
//!   progress, complete or fail them (fenced by a generation number), and get the tenant's
//!   access token without ever seeing a private key.
//! - `AdminService`: operators and the CLI submit, cancel, list and watch exports, and read
//!   worker and cluster status, and change the coordinator group's membership.
//! - `RaftService`: coordinators deliver raft messages to each other.
//! - [`connect`]: channels to coordinators, and calls that find the raft leader.
//! - [`convert`]: the one place protobuf meets the client core's types (categories, file
//!   kinds, checkpoints, and errors that keep their category and retryability on the wire).
//! - [`auth`]: the cluster-token interceptor every service sits behind.
//!
//! Coordinators and workers meet only through these types.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod auth;
pub mod connect;
pub mod convert;

pub mod v1 {
    tonic::include_proto!("fhirhaul.v1");

    /// The encoded descriptors of every fhirhaul.v1 file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fhirhaul_descriptor");

    impl std::fmt::Debug for GetTokenResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GetTokenResponse")
                .field("access_token", &"<redacted>")
                .field("generation", &self.generation)
                .field("expires_at_unix_ms", &self.expires_at_unix_ms)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_token_response_never_shows_its_token() {
            let response = super::GetTokenResponse {
                access_token: "eyJhbGciOiJSUzM4NCJ9.secret-token".into(),
                generation: 4,
                expires_at_unix_ms: 1,
            };
            let shown = format!("{response:?} {response:#?}");
            assert!(!shown.contains("secret-token"), "{shown}");
            assert!(shown.contains("generation: 4"), "{shown}");
        }
    }
}
