//! The fhirhaul coordinator: owns export jobs, their files and leases, and each tenant's
//! access token. Replicated state ([`state`]) changes only through committed raft entries
//! ([`raft_node`]); whichever coordinator leads runs the job drivers, the lease manager and
//! the token managers ([`leader`]).
//!
//! ```text
//!   gRPC (grpc/: worker, admin, raft; one cluster-token interceptor)
//!     │ convert, call, convert back (errors → Status in error.rs)
//!     ▼
//!   node::Coordinator ── handle: submit, cancel, reads, register, token, acquire_lease
//!     │                        │
//!     │ propose / read         │ while leading: leader::LeaderTerm
//!     ▼                        ▼
//!   raft_node (RawNode actor) ◄── leader::supervise ── tick ──► planner::plan(state) → actions
//!     │ Ready: persist, apply  │        ├── driver::JobDriver (kick-off, poll, commit files)
//!     ▼                        │        └── leases::LeaseManager (queued waiters, grants on commit)
//!   raft_log (sled)  state::State::apply(Command)     kickoff_ledger (what our kick-offs became)
//!     │
//!   peers ── RaftService.Deliver ──► other coordinators
//! ```
//!
//! - [`state`]: the replicated state machine (pure, unit-tested).
//! - [`raft_node`]: the raft-rs node actor: proposals, linearizable reads, membership.
//! - [`raft_log`]: the raft log, hard state and snapshots in sled.
//! - [`peers`]: raft messages to the other coordinators over gRPC.
//! - [`node`]: the coordinator's handle, which the services and the leader's work call.
//! - [`leader`]: leader-only work: the term supervisor, the pure planner, job drivers and
//!   the lease manager.
//! - [`kickoff_ledger`]: what came of the kick-offs this node sent.
//! - [`archive`]: finished jobs' files, moved out of the replicated state.
//! - [`error`]: the coordinator's error type and its one mapping to gRPC statuses.
//! - [`grpc`]: the worker, admin and raft gRPC services.

pub mod archive;
pub mod error;
pub mod grpc;
pub mod kickoff_ledger;
pub mod leader;
pub mod node;
pub mod peers;
pub mod raft_log;
pub mod raft_node;
pub mod state;
