//! Dev-only: what fhirhaul's tests and benches share. Never a dependency of a production
//! crate.
//!
//! - [`processes`]: the `fhirhaul` binary as child processes that die with the test
//!   (a coordinator or worker started and waited for), free ports, a cuttable TCP
//!   [`processes::Link`], waiting for a job through the admin API, and checking the output
//!   against what the simulated EHR served.
//! - [`group`]: a raft group of coordinator processes with links between them.
//! - [`tenant`]: a tenant registered with the simulated EHR (as a `TenantConfig`, or as the
//!   `[[tenant]]` TOML a process reads).
//! - [`turmoil`]: the client core's HTTP and tonic's gRPC over turmoil's simulated TCP.

// Test support sets up files and waits on wall time directly.
#![allow(clippy::disallowed_methods)]

pub mod group;
pub mod processes;
pub mod tenant;
pub mod turmoil;
