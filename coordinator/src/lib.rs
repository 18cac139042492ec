//! The fhirhaul coordinator: owns export jobs, their files and leases, and each tenant's
//! access token. Replicated state ([`state`]) changes only through committed raft entries
//! ([`raft_log`]); the leader runs the job drivers, the lease manager and the token managers.
//!
//! - [`state`]: the replicated state machine (pure, unit-tested).
//! - [`raft_log`]: the raft-rs node actor with its log and hard state in sled.

pub mod grpc;
pub mod node;
pub mod raft_log;
pub mod state;
