//! The raft node actor. One task owns the raft-rs `RawNode` and the state machine, and
//! follows raft-rs's documented Ready order: send messages, install a snapshot a leader
//! sent, apply committed entries, persist new entries and the hard state to sled (off the
//! async threads), send what had to wait for that, advance, apply what the light ready
//! committed. A proposal's reply waits until its entry is committed and applied, so a
//! caller never sees a change that is not in the log; a linearizable read waits until the
//! leader has confirmed it still leads (raft read-index) and applied that far.
//!
//! Membership is raft's own: the initial voters come from configuration, later changes are
//! conf-change entries whose context carries the new coordinator's address, so every
//! coordinator's address book comes from the log (and from snapshots).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::offload::Offload;
use raft::eraftpb::{ConfState, Message as RaftMessage};
use raft::{Config, RawNode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::peers::Peers;
pub use crate::raft_log::RaftError;
use crate::raft_log::{SledLog, storage_error};
use crate::state::{Applied, Command, State};

/// How long a linearizable read waits for the leader to confirm it still leads.
const READ_INDEX_LIMIT: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<Applied, RaftError>>;
type ReadFn = Box<dyn FnOnce(Result<&State, RaftError>) + Send>;
type MembershipReply = oneshot::Sender<Result<ConfState, RaftError>>;

/// A change of the coordinator group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    Add { node_id: u64, address: String },
    Remove { node_id: u64 },
}

/// What the node actor is asked to do.
pub(crate) enum Message {
    Propose {
        command: Box<Command>,
        reply: Reply,
    },
    Read(ReadFn),
    ReadIndex(ReadFn),
    ChangeMembership {
        change: Membership,
        reply: MembershipReply,
    },
    TransferLeadership {
        to: u64,
        reply: oneshot::Sender<Result<(), RaftError>>,
    },
    Step(Box<RaftMessage>),
}

/// This node's view of the group, published after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub node_id: u64,
    pub role: &'static str,
    pub is_leader: bool,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub leader_address: Option<String>,
    pub term: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    /// Every member's address (from configuration, then from the log).
    pub addresses: BTreeMap<u64, String>,
}

/// Handle to the raft node actor.
#[derive(Clone)]
pub struct RaftHandle {
    messages: mpsc::Sender<Message>,
    applied: watch::Receiver<u64>,
    role: watch::Receiver<bool>,
    status: watch::Receiver<RaftStatus>,
    log_syncs: Arc<std::sync::atomic::AtomicU64>,
    archive: Arc<crate::archive::JobArchive>,
}

impl RaftHandle {
    /// This node's archive of jobs moved out of the state.
    pub fn archive(&self) -> &crate::archive::JobArchive {
        &self.archive
    }

    /// How many times this node has synced log entries or hard state to disk.
    pub fn log_syncs(&self) -> u64 {
        self.log_syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes a command and waits until it is committed and applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, RaftError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Propose {
            command: Box::new(command),
            reply,
        })
        .await?;
        answer.await.map_err(|_| RaftError::Stopped)?
    }

    async fn send(&self, message: Message) -> Result<(), RaftError> {
        self.messages.send(message).await.map_err(|_| RaftError::Stopped)
    }

    /// Runs `read` against this node's applied state (possibly behind the leader's).
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, RaftError> {
        self.read_with(read, false).await
    }

    /// Runs `read` on the leader once it has confirmed it still leads and has applied
    /// everything committed before the call: it sees every write that finished before.
    pub async fn read_linearizable<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, RaftError> {
        self.read_with(read, true).await
    }

    async fn read_with<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
        linearizable: bool,
    ) -> Result<T, RaftError> {
        let (reply, answer) = oneshot::channel();
        let wrapped: ReadFn = Box::new(move |state| {
            let _ = reply.send(state.map(read));
        });
        self.send(if linearizable {
            Message::ReadIndex(wrapped)
        } else {
            Message::Read(wrapped)
        })
        .await?;
        match tokio::time::timeout(READ_INDEX_LIMIT, answer).await {
            Ok(answer) => answer.map_err(|_| RaftError::Stopped)?,
            Err(_) => Err(RaftError::Unconfirmed),
        }
    }

    /// Adds or removes a coordinator; returns once the change is applied here.
    pub async fn change_membership(&self, change: Membership) -> Result<Vec<u64>, RaftError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::ChangeMembership { change, reply }).await?;
        Ok(answer.await.map_err(|_| RaftError::Stopped)??.voters)
    }

    /// Asks the leader to hand leadership to `to` (which must be a caught-up voter); returns
    /// once the transfer has started. Operators use it to drain a coordinator.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), RaftError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::TransferLeadership { to, reply }).await?;
        answer.await.map_err(|_| RaftError::Stopped)?
    }

    /// Hands a message from a peer to the node.
    pub async fn step(&self, message: RaftMessage) -> Result<(), RaftError> {
        self.send(Message::Step(Box::new(message))).await
    }

    /// Changes whenever an entry is applied (for watchers).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The raft term this node is in.
    pub fn term(&self) -> u64 {
        self.status.borrow().term
    }

    /// `true` while this node is the leader.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.role.clone()
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// Waits (briefly) until this node's published status satisfies `ready`.
    pub async fn status_when(&self, ready: impl Fn(&RaftStatus) -> bool) -> RaftStatus {
        let mut status = self.status.clone();
        let waited = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| ready(s))).await;
        match waited {
            Ok(Ok(status)) => status.clone(),
            _ => self.status(),
        }
    }

    /// The refusal a follower gives: who leads, and where.
    pub fn not_leader(&self) -> RaftError {
        let status = self.status.borrow();
        RaftError::NotLeader {
            leader: Some(status.leader_id).filter(|id| *id != 0),
            address: status.leader_address.clone(),
        }
    }
}

/// Settings of the raft node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub node_id: u64,
    pub tick: Duration,
    /// Snapshot the state machine and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// Election timeout in ticks. raft-rs would draw it from `thread_rng` within
    /// [min, max); the range is pinned to this one value so a simulation can give each
    /// node its own timeout from the run's seed and replay it. Clusters should give each
    /// coordinator a different value (the default derives one from the node id).
    pub election_tick: Option<usize>,
    /// The initial voters and their gRPC addresses (this node included). Empty: a group of
    /// this node alone.
    pub peers: BTreeMap<u64, String>,
    /// Start with no membership and wait to be added by the group's leader.
    pub join: bool,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            node_id: 1,
            tick: Duration::from_millis(100),
            snapshot_every: 10_000,
            election_tick: None,
            peers: BTreeMap::new(),
            join: false,
        }
    }
}

impl RaftSettings {
    /// 10 ticks plus a spread by node id, so peers rarely time out together.
    fn election_tick(&self) -> usize {
        self.election_tick
            .unwrap_or(10 + ((self.node_id.wrapping_mul(7)) % 10) as usize)
            .max(4)
    }
}

/// Context of a proposal: which node proposed it, so only that node answers the caller.
#[derive(Serialize, Deserialize)]
struct ConfContext {
    node: u64,
    request: u64,
    address: Option<String>,
}

fn proposal_context(node: u64, request: u64) -> Vec<u8> {
    let mut context = node.to_be_bytes().to_vec();
    context.extend_from_slice(&request.to_be_bytes());
    context
}

fn parse_context(context: &[u8]) -> Option<(u64, u64)> {
    if context.len() != 16 {
        return None;
    }
    let (node, request) = context.split_at(8);
    Some((
        u64::from_be_bytes(node.try_into().ok()?),
        u64::from_be_bytes(request.try_into().ok()?),
    ))
}

/// Starts the raft node actor over the log in `dir`, talking to peers through `peers`. Log writes run where `offload` says (the
/// blocking pool, or the actor's own task in a deterministic simulation).
pub fn start(
    dir: &Path,
    settings: RaftSettings,
    offload: Offload,
    peers: Peers,
    cancel: CancellationToken,
) -> Result<RaftHandle, RaftError> {
    let log = SledLog::open(dir)?;
    let initial_voters: Vec<u64> = if settings.join {
        Vec::new()
    } else if settings.peers.is_empty() {
        vec![settings.node_id]
    } else {
        settings.peers.keys().copied().collect()
    };
    let loaded = log.load(&initial_voters)?;
    let election_tick = settings.election_tick();
    let config = Config {
        id: settings.node_id,
        election_tick,
        min_election_tick: election_tick,
        max_election_tick: election_tick + 1,
        heartbeat_tick: 2,
        applied: loaded.snapshot_index,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    config.validate().map_err(storage_error)?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let storage = loaded.storage.clone();
    let mut node = RawNode::new(&config, storage, &logger).map_err(storage_error)?;
    if loaded.conf_state.voters == [settings.node_id] {
        // A single voter elects itself at once.
        node.campaign().map_err(storage_error)?;
    }
    let (messages, receiver) = mpsc::channel(1024);
    let (applied_tx, applied) = watch::channel(loaded.snapshot_index);
    let (role_tx, role) = watch::channel(false);
    let (status_tx, status) = watch::channel(RaftStatus::default());
    let archive = Arc::new(crate::archive::JobArchive::new(dir));
    let handle = RaftHandle {
        messages,
        applied,
        role,
        status,
        log_syncs: log.syncs(),
        archive: Arc::clone(&archive),
    };
    let (deliveries_tx, deliveries) = mpsc::channel(256);
    peers.attach(deliveries_tx);
    // One snapshot is written at a time, so one slot is enough.
    let (saved_tx, saved) = mpsc::channel(1);
    let mut actor = Actor {
        node,
        log: Arc::new(log),
        offload,
        state: loaded.state,
        snapshot_index: loaded.snapshot_index,
        snapshot_every: settings.snapshot_every.max(1),
        conf_state: loaded.conf_state,
        conf_changed: false,
        configured: settings.peers,
        peers,
        waiting: BTreeMap::new(),
        membership: None,
        reads: BTreeMap::new(),
        confirmed_reads: Vec::new(),
        deferred_reads: Vec::new(),
        next_request: 0,
        applied: applied_tx,
        role: role_tx,
        status: status_tx,
        snapshot_saved: saved_tx,
        snapshot_in_flight: false,
        archive,
    };
    actor.publish_addresses();
    actor.publish_status();
    tokio::spawn(actor.run(receiver, deliveries, saved, settings.tick, cancel));
    Ok(handle)
}

mod actor;

use self::actor::Actor;
#[cfg(test)]
mod tests;
