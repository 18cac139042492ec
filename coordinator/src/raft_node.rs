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
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message as RaftMessage, Snapshot};
use raft::{Config, RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::peers::Peers;
pub use crate::raft_log::RaftError;
use crate::raft_log::{LogError, LogStorage, SledLog, restore_state, storage_error};
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
    Unreachable(u64),
    SnapshotSent {
        to: u64,
        delivered: bool,
    },
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
}

impl RaftHandle {
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

    pub(crate) fn reporter(&self) -> mpsc::Sender<Message> {
        self.messages.clone()
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

/// Starts the raft node actor over the log in `dir`, talking to peers through `peers`.
/// Starts the raft node on the log in `dir`. Log writes run where `offload` says (the
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
    let handle = RaftHandle {
        messages,
        applied,
        role,
        status,
    };
    peers.attach(handle.reporter());
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
    };
    actor.publish_addresses();
    actor.publish_status();
    tokio::spawn(actor.run(receiver, settings.tick, cancel));
    Ok(handle)
}

struct Actor {
    node: RawNode<LogStorage>,
    log: Arc<SledLog>,
    offload: Offload,
    state: State,
    snapshot_index: u64,
    snapshot_every: u64,
    conf_state: ConfState,
    /// A membership change was applied since the last snapshot: snapshot now, so the
    /// snapshot a new member receives already lists it (raft-rs refuses one that does not).
    conf_changed: bool,
    /// Addresses from configuration; the log's (in the state) take precedence.
    configured: BTreeMap<u64, String>,
    peers: Peers,
    /// Proposals of this node waiting for their entry: request id → (term, reply).
    waiting: BTreeMap<u64, (u64, Reply)>,
    membership: Option<(u64, MembershipReply)>,
    /// Linearizable reads waiting for the leader's confirmation, by request id.
    reads: BTreeMap<u64, ReadFn>,
    /// Confirmed reads waiting for the state to reach their index.
    confirmed_reads: Vec<(u64, ReadFn)>,
    /// Reads asked before this leader's term had a committed entry.
    deferred_reads: Vec<u64>,
    next_request: u64,
    applied: watch::Sender<u64>,
    role: watch::Sender<bool>,
    status: watch::Sender<RaftStatus>,
}

impl Actor {
    async fn run(mut self, mut messages: mpsc::Receiver<Message>, tick: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                message = messages.recv() => match message {
                    Some(message) => self.handle(message),
                    None => break,
                },
                _ = ticker.tick() => {
                    self.node.tick();
                }
            }
            if let Err(error) = self.on_ready().await {
                tracing::error!(%error, "raft storage failed; stopping the node");
                break;
            }
        }
        self.fail_pending(RaftError::Stopped);
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Propose { command, reply } => self.propose(*command, reply),
            Message::Read(read) => read(Ok(&self.state)),
            Message::ReadIndex(read) => self.read_index(read),
            Message::ChangeMembership { change, reply } => self.change_membership(change, reply),
            Message::TransferLeadership { to, reply } => {
                let answer = if !self.is_leader() {
                    Err(self.not_leader())
                } else if !self.conf_state.voters.contains(&to) {
                    Err(RaftError::Membership(format!("coordinator {to} is not a voter")))
                } else {
                    self.node.transfer_leader(to);
                    Ok(())
                };
                let _ = reply.send(answer);
            }
            Message::Step(message) => {
                if let Err(error) = self.node.step(*message) {
                    tracing::debug!(%error, "raft message ignored");
                }
            }
            Message::Unreachable(peer) => self.node.report_unreachable(peer),
            Message::SnapshotSent { to, delivered } => self.node.report_snapshot(
                to,
                if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
        }
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> RaftError {
        let leader = self.node.raft.leader_id;
        RaftError::NotLeader {
            leader: Some(leader).filter(|id| *id != 0),
            address: self.address_of(leader),
        }
    }

    fn address_of(&self, node: u64) -> Option<String> {
        self.state
            .coordinators
            .get(&node)
            .or_else(|| self.configured.get(&node))
            .cloned()
    }

    fn next_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn propose(&mut self, command: Command, reply: Reply) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let data = match serde_json::to_vec(&command) {
            Ok(data) => data,
            Err(error) => {
                let _ = reply.send(Err(storage_error(error)));
                return;
            }
        };
        let request = self.next_request();
        let context = proposal_context(self.node.raft.id, request);
        match self.node.propose(context, data) {
            Ok(()) => {
                self.waiting.insert(request, (self.node.raft.term, reply));
            }
            Err(error) => {
                tracing::debug!(%error, "proposal dropped");
                let _ = reply.send(Err(self.not_leader()));
            }
        }
    }

    fn read_index(&mut self, read: ReadFn) {
        if !self.is_leader() {
            read(Err(self.not_leader()));
            return;
        }
        let request = self.next_request();
        self.reads.insert(request, read);
        if self.node.raft.commit_to_current_term() {
            self.node.read_index(request.to_be_bytes().to_vec());
        } else {
            // raft-rs drops a read-index before the leader's first entry of its term has
            // committed; ask again once it has.
            self.deferred_reads.push(request);
        }
    }

    fn ask_deferred_reads(&mut self) {
        if self.deferred_reads.is_empty() || !self.is_leader() || !self.node.raft.commit_to_current_term() {
            return;
        }
        for request in std::mem::take(&mut self.deferred_reads) {
            self.node.read_index(request.to_be_bytes().to_vec());
        }
    }

    fn change_membership(&mut self, change: Membership, reply: MembershipReply) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.membership.is_some() {
            let _ = reply.send(Err(RaftError::Membership(
                "another membership change is in progress".into(),
            )));
            return;
        }
        let request = self.next_request();
        let (change_type, node_id, address) = match change {
            Membership::Add { node_id, address } => (ConfChangeType::AddNode, node_id, Some(address)),
            Membership::Remove { node_id } => {
                if !self.conf_state.voters.contains(&node_id) {
                    let _ = reply.send(Err(RaftError::Membership(format!(
                        "coordinator {node_id} is not a member"
                    ))));
                    return;
                }
                if self.conf_state.voters.len() == 1 {
                    let _ = reply.send(Err(RaftError::Membership("cannot remove the last coordinator".into())));
                    return;
                }
                (ConfChangeType::RemoveNode, node_id, None)
            }
        };
        let context = ConfContext {
            node: self.node.raft.id,
            request,
            address,
        };
        let context = match serde_json::to_vec(&context) {
            Ok(context) => context,
            Err(error) => {
                let _ = reply.send(Err(storage_error(error)));
                return;
            }
        };
        let mut conf_change = ConfChange::default();
        conf_change.set_change_type(change_type);
        conf_change.node_id = node_id;
        match self.node.propose_conf_change(context, conf_change) {
            Ok(()) => self.membership = Some((request, reply)),
            Err(error) => {
                let _ = reply.send(Err(RaftError::Membership(error.to_string())));
            }
        }
    }

    /// Answers every waiting caller with `error` (on stepping down, or on stopping).
    fn fail_pending(&mut self, error: RaftError) {
        for (_, (_, reply)) in std::mem::take(&mut self.waiting) {
            let _ = reply.send(Err(error.clone()));
        }
        if let Some((_, reply)) = self.membership.take() {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, read) in std::mem::take(&mut self.reads) {
            read(Err(error.clone()));
        }
        for (_, read) in std::mem::take(&mut self.confirmed_reads) {
            read(Err(error.clone()));
        }
        self.deferred_reads.clear();
    }

    /// Routes to peers: the log's addresses, except where this node's configuration says
    /// how it reaches a peer (its own network path to it).
    fn publish_addresses(&self) {
        let mut addresses = self.state.coordinators.clone();
        addresses.extend(self.configured.iter().map(|(id, a)| (*id, a.clone())));
        self.peers.set_addresses(addresses);
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let mut addresses = self.configured.clone();
        addresses.extend(self.state.coordinators.iter().map(|(id, a)| (*id, a.clone())));
        let status = RaftStatus {
            node_id: raft.id,
            role,
            is_leader: raft.state == StateRole::Leader,
            leader_id: raft.leader_id,
            leader_address: self.address_of(raft.leader_id),
            term: raft.term,
            applied: raft.raft_log.applied,
            snapshot_index: self.snapshot_index,
            voters: self.conf_state.voters.clone(),
            addresses,
        };
        let was_leader = self.status.borrow().is_leader;
        if was_leader && !status.is_leader {
            tracing::info!(term = status.term, "no longer the raft leader");
            self.fail_pending(RaftError::Uncertain);
        }
        if !was_leader && status.is_leader {
            tracing::info!(term = status.term, node = status.node_id, "became the raft leader");
        }
        let is_leader = status.is_leader;
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        self.role
            .send_if_modified(|leader| std::mem::replace(leader, is_leader) != is_leader);
    }

    async fn on_ready(&mut self) -> Result<(), RaftError> {
        if self.node.has_ready() {
            self.process_ready().await?;
        }
        self.publish_status();
        self.ask_deferred_reads();
        if self.node.has_ready() {
            self.process_ready().await?;
        }
        Ok(())
    }

    async fn process_ready(&mut self) -> Result<(), RaftError> {
        let mut ready = self.node.ready();
        // 1. Messages a leader may send before persisting.
        self.peers.send(ready.take_messages());
        // 2. A snapshot from the leader replaces our state and log.
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone()).await?;
        }
        // 3. Committed entries.
        self.apply_entries(ready.take_committed_entries()).await?;
        for read_state in ready.take_read_states() {
            if let Ok(bytes) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice())
                && let Some(read) = self.reads.remove(&u64::from_be_bytes(bytes))
            {
                self.confirmed_reads.push((read_state.index, read));
            }
        }
        // 4-5. Persist entries and hard state before going on.
        let entries = ready.take_entries();
        let hard_state = ready.hs().cloned();
        if !entries.is_empty() || hard_state.is_some() {
            let to_persist = entries.clone();
            let persisted_hs = hard_state.clone();
            on_log(Arc::clone(&self.log), self.offload, move |log| {
                log.persist(&to_persist, persisted_hs.as_ref())
            })
            .await?;
            let mut core = self.node.mut_store().mem.wl();
            core.append(&entries).map_err(storage_error)?;
            if let Some(hard_state) = hard_state {
                core.set_hardstate(hard_state);
            }
        }
        // 6. Messages that had to wait for the persist (votes, append responses).
        self.peers.send(ready.take_persisted_messages());
        // 7-8. Advance, then what the light ready committed.
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hard_state = self.node.store().mem.rl().hard_state().clone();
            hard_state.commit = commit;
            let persisted = hard_state.clone();
            on_log(Arc::clone(&self.log), self.offload, move |log| {
                log.persist(&[], Some(&persisted))
            })
            .await?;
            self.node.mut_store().mem.wl().set_hardstate(hard_state);
        }
        self.peers.send(light.take_messages());
        self.apply_entries(light.take_committed_entries()).await?;
        self.node.advance_apply();
        self.answer_reads();
        self.snapshot_if_due().await
    }

    fn answer_reads(&mut self) {
        let applied = self.node.raft.raft_log.applied;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed_reads = later;
        for (_, read) in due {
            read(Ok(&self.state));
        }
    }

    async fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), RaftError> {
        let index = snapshot.get_metadata().index;
        let state = restore_state(&snapshot)?;
        let to_save = snapshot.clone();
        on_log(Arc::clone(&self.log), self.offload, move |log| {
            log.install_snapshot(&to_save)
        })
        .await?;
        self.node
            .mut_store()
            .mem
            .wl()
            .apply_snapshot(snapshot.clone())
            .map_err(storage_error)?;
        self.conf_state = snapshot.get_metadata().get_conf_state().clone();
        self.node.mut_store().set_snapshot(snapshot);
        self.state = state;
        self.snapshot_index = index;
        self.applied.send_replace(index);
        self.publish_addresses();
        tracing::info!(index, "caught up from the leader's snapshot");
        Ok(())
    }

    /// Every `snapshot_every` applied entries, and after every membership change: save the
    /// state machine in sled and compact the log up to it.
    async fn snapshot_if_due(&mut self) -> Result<(), RaftError> {
        let applied = self.node.raft.raft_log.applied;
        let due = applied >= self.snapshot_index + self.snapshot_every || self.conf_changed;
        if !due || applied <= self.snapshot_index {
            return Ok(());
        }
        let term = self.node.raft.raft_log.term(applied).map_err(storage_error)?;
        let mut snapshot = Snapshot {
            data: serde_json::to_vec(&self.state).map_err(storage_error)?.into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        metadata.set_conf_state(self.conf_state.clone());
        let to_save = snapshot.clone();
        on_log(Arc::clone(&self.log), self.offload, move |log| {
            log.save_snapshot(&to_save)
        })
        .await?;
        self.node.mut_store().mem.wl().compact(applied).map_err(storage_error)?;
        self.node.mut_store().set_snapshot(snapshot);
        self.snapshot_index = applied;
        self.conf_changed = false;
        tracing::debug!(index = applied, "state machine snapshot saved; log compacted");
        Ok(())
    }

    async fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_command(&entry),
                EntryType::EntryConfChange => self.apply_conf_change(&entry).await?,
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        index = entry.index,
                        "ignoring a joint-consensus change (never proposed here)"
                    );
                }
            }
            self.applied.send_replace(entry.index);
        }
        Ok(())
    }

    fn apply_command(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            // The empty entry a new leader appends.
            return;
        }
        let result = match serde_json::from_slice::<Command>(&entry.data) {
            Ok(command) => Ok(self.state.apply(command)),
            Err(error) => Err(storage_error(LogError::BadEntry {
                index: entry.index,
                reason: error.to_string(),
            })),
        };
        if let Some((node, request)) = parse_context(&entry.context)
            && node == self.node.raft.id
            && self.waiting.get(&request).is_some_and(|(term, _)| *term == entry.term)
            && let Some((_, reply)) = self.waiting.remove(&request)
        {
            let _ = reply.send(result);
        }
    }

    async fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), RaftError> {
        if entry.data.is_empty() {
            return Ok(());
        }
        let change = ConfChange::parse_from_bytes(&entry.data).map_err(storage_error)?;
        let context: Option<ConfContext> = serde_json::from_slice(&entry.context).ok();
        let outcome = self.node.apply_conf_change(&change);
        let result = match outcome {
            Ok(conf_state) => {
                match change.get_change_type() {
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                        if let Some(address) = context.as_ref().and_then(|c| c.address.clone()) {
                            self.state.coordinators.insert(change.node_id, address);
                        }
                    }
                    ConfChangeType::RemoveNode => {
                        self.state.coordinators.remove(&change.node_id);
                    }
                }
                let to_save = conf_state.clone();
                on_log(Arc::clone(&self.log), self.offload, move |log| {
                    log.save_conf_state(&to_save)
                })
                .await?;
                self.node.mut_store().mem.wl().set_conf_state(conf_state.clone());
                self.conf_state = conf_state.clone();
                self.conf_changed = true;
                self.publish_addresses();
                tracing::info!(voters = ?conf_state.voters, "coordinator group changed");
                Ok(conf_state)
            }
            Err(error) => Err(RaftError::Membership(error.to_string())),
        };
        if let Some(context) = context
            && context.node == self.node.raft.id
            && self
                .membership
                .as_ref()
                .is_some_and(|(request, _)| *request == context.request)
            && let Some((_, reply)) = self.membership.take()
        {
            let _ = reply.send(result);
        }
        Ok(())
    }
}

/// Runs sled work off the async threads (or right here, `inline`).
async fn on_log<T: Send + 'static>(
    log: Arc<SledLog>,
    offload: Offload,
    work: impl FnOnce(&SledLog) -> Result<T, RaftError> + Send + 'static,
) -> Result<T, RaftError> {
    offload.run(move || work(&log)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applied, Command};
    use fhirhaul_common::kickoff::ExportRequest;

    async fn leader(dir: &Path, cancel: &CancellationToken) -> RaftHandle {
        let handle = start(
            dir,
            RaftSettings {
                node_id: 1,
                tick: Duration::from_millis(10),
                snapshot_every: 10,
                ..RaftSettings::default()
            },
            Offload::Threads,
            Peers::new(1, Default::default(), None, cancel.clone()),
            cancel.clone(),
        )
        .unwrap();
        let mut role = handle.leadership();
        tokio::time::timeout(Duration::from_secs(5), role.wait_for(|leader| *leader))
            .await
            .unwrap()
            .unwrap();
        handle
    }

    fn submit() -> Command {
        Command::SubmitJob {
            tenant: "t".into(),
            request: ExportRequest::default(),
            max_file_attempts: 3,
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn committed_commands_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let raft = leader(dir.path(), &cancel).await;
        assert!(raft.term() >= 1, "a leader has been elected in some term");
        assert_eq!(
            raft.propose(submit()).await.unwrap(),
            Applied::JobSubmitted { job_id: "job-1".into() }
        );
        raft.propose(Command::KickedOff {
            job_id: "job-1".into(),
            status_url: "https://e/s/1".into(),
        })
        .await
        .unwrap();
        cancel.cancel();
        drop(raft);
        tokio::time::sleep(Duration::from_millis(50)).await;

        let cancel = CancellationToken::new();
        let raft = leader(dir.path(), &cancel).await;
        let status_url = raft
            .read_linearizable(|state| state.jobs["job-1"].status_url.clone())
            .await
            .unwrap();
        assert_eq!(
            status_url.as_deref(),
            Some("https://e/s/1"),
            "the committed status URL is back after a restart"
        );
        assert_eq!(
            raft.propose(submit()).await.unwrap(),
            Applied::JobSubmitted { job_id: "job-2".into() }
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn snapshots_compact_the_log_and_restore_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let raft = leader(dir.path(), &cancel).await;
        for _ in 0..35 {
            raft.propose(submit()).await.unwrap();
        }
        cancel.cancel();
        drop(raft);
        tokio::time::sleep(Duration::from_millis(50)).await;
        {
            let log = SledLog::open(dir.path()).unwrap();
            let entries = log.entry_count();
            assert!(entries < 20, "the log was compacted: {entries} entries left");
            assert!(log.has_snapshot());
        }
        let cancel = CancellationToken::new();
        let raft = leader(dir.path(), &cancel).await;
        assert_eq!(
            raft.read_linearizable(|state| state.jobs.len()).await.unwrap(),
            35,
            "snapshot plus the log tail restore every job"
        );
        assert_eq!(
            raft.propose(submit()).await.unwrap(),
            Applied::JobSubmitted {
                job_id: "job-36".into()
            }
        );
        cancel.cancel();
    }

    #[test]
    fn proposal_context_round_trips_and_rejects_foreign_shapes() {
        assert_eq!(parse_context(&proposal_context(3, 99)), Some((3, 99)));
        assert_eq!(parse_context(&[1, 2, 3]), None);
        assert_eq!(
            parse_context(&99u64.to_be_bytes()),
            None,
            "an old single-node context is not ours"
        );
    }

    #[test]
    fn default_election_timeouts_differ_between_nodes() {
        let ticks: std::collections::BTreeSet<usize> = (1..=5)
            .map(|node_id| {
                RaftSettings {
                    node_id,
                    ..RaftSettings::default()
                }
                .election_tick()
            })
            .collect();
        assert_eq!(ticks.len(), 5);
    }
}
