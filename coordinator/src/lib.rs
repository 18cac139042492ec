//! The fhirhaul coordinator: owns export jobs, their files and leases, and each tenant's
//! access token. Replicated state ([`state`]) changes only through committed raft entries
//! ([`raft_node`]); whichever coordinator leads runs the job drivers, the lease manager and
//! the token managers ([`node`]).
//!
//! - [`state`]: the replicated state machine (pure, unit-tested).
//! - [`raft_node`]: the raft-rs node actor: proposals, linearizable reads, membership.
//! - [`raft_log`]: the raft log, hard state and snapshots in sled.
//! - [`peers`]: raft messages to the other coordinators over gRPC.
//! - [`node`]: the coordinator: leader-only work that starts and stops with leadership.
//! - [`grpc`]: the worker, admin and raft gRPC services.

pub mod grpc;
pub mod node;
pub mod peers;
pub mod raft_log;
pub mod raft_node;
pub mod state;
