//! The raft node actor itself: owns the `RawNode` and the state machine and runs the
//! Ready loop (see the module above for the order).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::offload::Offload;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::peers::{Delivery, Peers};
use crate::raft_log::{LogError, LogStorage, SledLog, restore_state, storage_error};
use crate::state::{Command, Job, State};

/// Messages handled before one Ready is processed (a bound on one batch's size and on
/// how long the actor goes without ticking or persisting).
const MAX_MESSAGES_PER_READY: usize = 256;

pub(super) struct Actor {
    pub(super) node: RawNode<LogStorage>,
    pub(super) log: Arc<SledLog>,
    pub(super) offload: Offload,
    pub(super) state: State,
    pub(super) snapshot_index: u64,
    pub(super) snapshot_every: u64,
    pub(super) conf_state: ConfState,
    /// A membership change was applied since the last snapshot: snapshot now, so the
    /// snapshot a new member receives already lists it (raft-rs refuses one that does not).
    pub(super) conf_changed: bool,
    /// Addresses from configuration; the log's (in the state) take precedence.
    pub(super) configured: BTreeMap<u64, String>,
    pub(super) peers: Peers,
    /// Proposals of this node waiting for their entry: request id → (term, reply).
    pub(super) waiting: BTreeMap<u64, (u64, Reply)>,
    pub(super) membership: Option<(u64, MembershipReply)>,
    /// Linearizable reads waiting for the leader's confirmation, by request id.
    pub(super) reads: BTreeMap<u64, ReadFn>,
    /// Confirmed reads waiting for the state to reach their index.
    pub(super) confirmed_reads: Vec<(u64, ReadFn)>,
    /// Reads asked before this leader's term had a committed entry.
    pub(super) deferred_reads: Vec<u64>,
    pub(super) next_request: u64,
    pub(super) applied: watch::Sender<u64>,
    pub(super) role: watch::Sender<bool>,
    pub(super) status: watch::Sender<RaftStatus>,
    /// Snapshots are written off the actor (a clone of the state is cheap: files are
    /// shared copy-on-write); each reports here when it is on disk.
    pub(super) snapshot_saved: mpsc::Sender<SavedSnapshot>,
    /// A snapshot is being written (at most one at a time).
    pub(super) snapshot_in_flight: bool,
    /// Where jobs archived out of the state are written with their files.
    pub(super) archive: Arc<crate::archive::JobArchive>,
}

/// A snapshot written to disk off the actor, or why it could not be.
pub(super) type SavedSnapshot = Result<Snapshot, RaftError>;

impl Actor {
    pub(super) async fn run(
        mut self,
        mut messages: mpsc::Receiver<Message>,
        mut deliveries: mpsc::Receiver<Delivery>,
        mut saved: mpsc::Receiver<SavedSnapshot>,
        tick: Duration,
        cancel: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                message = messages.recv() => match message {
                    Some(message) => {
                        self.handle(message);
                        // Group commit: whatever else has arrived is handled before the
                        // Ready, so its proposals share one persist and one disk sync.
                        for _ in 1..MAX_MESSAGES_PER_READY {
                            match messages.try_recv() {
                                Ok(message) => self.handle(message),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some(delivery) = deliveries.recv() => self.delivery(delivery),
                Some(snapshot) = saved.recv() => {
                    if let Err(error) = snapshot.and_then(|snapshot| self.snapshot_saved(snapshot)) {
                        tracing::error!(%error, "could not save a snapshot; stopping the node");
                        break;
                    }
                }
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
        if self.snapshot_in_flight {
            // Let the snapshot being written finish, so the data directory is not in use
            // when the node stops (a restart opens it again).
            let _ = saved.recv().await;
        }
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
        }
    }

    /// What the peers' sender tasks report about messages they could not deliver.
    fn delivery(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Unreachable(peer) => self.node.report_unreachable(peer),
            Delivery::SnapshotSent { to, delivered } => self.node.report_snapshot(
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
    pub(super) fn publish_addresses(&self) {
        let mut addresses = self.state.coordinators.clone();
        addresses.extend(self.configured.iter().map(|(id, a)| (*id, a.clone())));
        self.peers.set_addresses(addresses);
    }

    pub(super) fn publish_status(&mut self) {
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
                log.persist_commit(&persisted)
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
    /// state machine to the snapshot file and compact the log up to it. The state is cloned
    /// here and written off the actor, so leases go on while a large state is serialized
    /// and synced (or inline, for a deterministic simulation).
    async fn snapshot_if_due(&mut self) -> Result<(), RaftError> {
        let applied = self.node.raft.raft_log.applied;
        let due = applied >= self.snapshot_index + self.snapshot_every || self.conf_changed;
        if !due || applied <= self.snapshot_index || self.snapshot_in_flight {
            return Ok(());
        }
        let term = self.node.raft.raft_log.term(applied).map_err(storage_error)?;
        let state = self.state.clone();
        let conf_state = self.conf_state.clone();
        self.conf_changed = false;
        let log = Arc::clone(&self.log);
        let write = move || -> SavedSnapshot {
            let mut snapshot = Snapshot {
                data: serde_json::to_vec(&state).map_err(storage_error)?.into(),
                ..Default::default()
            };
            let metadata = snapshot.mut_metadata();
            metadata.index = applied;
            metadata.term = term;
            metadata.set_conf_state(conf_state);
            log.save_snapshot(&snapshot)?;
            Ok(snapshot)
        };
        self.snapshot_in_flight = true;
        if self.offload.is_inline() {
            return self.snapshot_saved(write()?);
        }
        let done = self.snapshot_saved.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.blocking_send(write());
        });
        Ok(())
    }

    /// A snapshot is on disk: raft may now forget the entries it covers.
    fn snapshot_saved(&mut self, snapshot: Snapshot) -> Result<(), RaftError> {
        self.snapshot_in_flight = false;
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot_index {
            // A leader's snapshot was installed meanwhile; it is newer.
            return Ok(());
        }
        self.node.mut_store().mem.wl().compact(index).map_err(storage_error)?;
        self.node.mut_store().set_snapshot(snapshot);
        self.snapshot_index = index;
        tracing::debug!(index, "state machine snapshot saved; log compacted");
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
        for job in self.state.take_archived_jobs() {
            self.write_archive(job);
        }
        if let Some((node, request)) = parse_context(&entry.context)
            && node == self.node.raft.id
            && self.waiting.get(&request).is_some_and(|(term, _)| *term == entry.term)
            && let Some((_, reply)) = self.waiting.remove(&request)
        {
            let _ = reply.send(result);
        }
    }

    /// Writes an archived job's files to this node's archive, off the actor (a large job
    /// takes a while to serialize); status calls that ask for it meanwhile wait for it.
    fn write_archive(&self, job: Job) {
        self.archive.will_write(&job.id);
        let archive = Arc::clone(&self.archive);
        let write = move || {
            if let Err(error) = archive.write_announced(&job) {
                tracing::warn!(%error, job = %job.id, "could not write an archived job's files; its summary stays");
            }
        };
        if self.offload.is_inline() {
            write();
        } else {
            tokio::task::spawn_blocking(write);
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
