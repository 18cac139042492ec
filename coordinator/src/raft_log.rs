//! The raft node actor. One task owns the raft-rs `RawNode` and the state machine, and
//! follows raft-rs's documented Ready order: apply committed entries, persist new entries
//! and the hard state to sled (off the async threads), advance, apply what the light ready
//! committed. A proposal's reply waits until its entry is committed and applied, so a
//! caller never sees a change that is not in the log.
//!
//! The log lives in sled (tree `raft`: `hs`, `cs`, `e/<index>`); a restarted node reloads
//! it and replays every committed entry into a fresh state machine. Single voter for now:
//! the multi-coordinator group adds peers, snapshots and compaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::state::{Applied, Command, State};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftError {
    #[error("this coordinator is not the leader")]
    NotLeader { leader: Option<u64> },
    #[error("raft storage failed: {0}")]
    Storage(String),
    #[error("the raft node has stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Applied, RaftError>>;
type ReadFn = Box<dyn FnOnce(&State) + Send>;

enum Message {
    Propose { command: Box<Command>, reply: Reply },
    Read(ReadFn),
}

/// Handle to the raft node actor.
#[derive(Clone)]
pub struct RaftHandle {
    messages: mpsc::Sender<Message>,
    applied: watch::Receiver<u64>,
    role: watch::Receiver<bool>,
    term: watch::Receiver<u64>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is committed and applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, RaftError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Propose {
                command: Box::new(command),
                reply,
            })
            .await
            .map_err(|_| RaftError::Stopped)?;
        answer.await.map_err(|_| RaftError::Stopped)?
    }

    /// Runs `read` against the applied state, inside the actor (no copy of the state).
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, RaftError> {
        let (reply, answer) = oneshot::channel();
        let wrapped: ReadFn = Box::new(move |state| {
            let _ = reply.send(read(state));
        });
        self.messages
            .send(Message::Read(wrapped))
            .await
            .map_err(|_| RaftError::Stopped)?;
        answer.await.map_err(|_| RaftError::Stopped)
    }

    /// Changes whenever an entry is applied (for watchers).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The raft term this node is in.
    pub fn term(&self) -> u64 {
        *self.term.borrow()
    }

    /// `true` while this node is the leader.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.role.clone()
    }
}

/// The raft log in sled.
#[derive(Clone)]
struct SledLog {
    tree: sled::Tree,
}

fn entry_key(index: u64) -> Vec<u8> {
    let mut key = b"e/".to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn storage_error(error: impl std::fmt::Display) -> RaftError {
    RaftError::Storage(error.to_string())
}

impl SledLog {
    fn open(dir: &Path) -> Result<SledLog, RaftError> {
        let db = sled::open(dir.join("raft")).map_err(storage_error)?;
        Ok(SledLog {
            tree: db.open_tree("raft").map_err(storage_error)?,
        })
    }

    /// Loads everything into a MemStorage (the in-memory view raft-rs reads): the latest
    /// snapshot (with the state machine it holds), then the entries after it, then the hard
    /// state. Returns the storage, the restored state and the index it reflects.
    fn load(&self, node_id: u64) -> Result<(MemStorage, State, u64), RaftError> {
        let storage = MemStorage::new();
        let conf_state = match self.tree.get("cs").map_err(storage_error)? {
            Some(bytes) => ConfState::parse_from_bytes(&bytes).map_err(storage_error)?,
            None => {
                let conf_state = ConfState {
                    voters: vec![node_id],
                    ..Default::default()
                };
                self.tree
                    .insert("cs", conf_state.write_to_bytes().map_err(storage_error)?)
                    .map_err(storage_error)?;
                conf_state
            }
        };
        let mut state = State::default();
        let mut applied = 0;
        let mut core = storage.wl();
        if let Some(bytes) = self.tree.get("snap").map_err(storage_error)? {
            let snapshot = Snapshot::parse_from_bytes(&bytes).map_err(storage_error)?;
            state =
                serde_json::from_slice(&snapshot.data).map_err(|e| storage_error(format!("snapshot state: {e}")))?;
            applied = snapshot.get_metadata().index;
            core.apply_snapshot(snapshot).map_err(storage_error)?;
        }
        let mut entries = Vec::new();
        for item in self.tree.range(entry_key(applied + 1)..entry_key(u64::MAX)) {
            let (_, bytes) = item.map_err(storage_error)?;
            entries.push(Entry::parse_from_bytes(&bytes).map_err(storage_error)?);
        }
        core.set_conf_state(conf_state);
        core.append(&entries).map_err(storage_error)?;
        if let Some(bytes) = self.tree.get("hs").map_err(storage_error)? {
            core.set_hardstate(HardState::parse_from_bytes(&bytes).map_err(storage_error)?);
        }
        drop(core);
        Ok((storage, state, applied))
    }

    /// Saves a snapshot and drops the log entries it covers.
    fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let index = snapshot.get_metadata().index;
        let mut batch = sled::Batch::default();
        batch.insert("snap", snapshot.write_to_bytes().map_err(storage_error)?);
        for covered in self.tree.range(entry_key(0)..=entry_key(index)) {
            let (key, _) = covered.map_err(storage_error)?;
            batch.remove(key);
        }
        self.tree.apply_batch(batch).map_err(storage_error)?;
        self.tree.flush().map_err(storage_error)?;
        Ok(())
    }

    /// Persists new entries (replacing any conflicting tail) and the hard state, durably.
    fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), RaftError> {
        let mut batch = sled::Batch::default();
        if let Some(first) = entries.first() {
            for stale in self.tree.range(entry_key(first.index)..entry_key(u64::MAX)) {
                let (key, _) = stale.map_err(storage_error)?;
                batch.remove(key);
            }
        }
        for entry in entries {
            batch.insert(entry_key(entry.index), entry.write_to_bytes().map_err(storage_error)?);
        }
        if let Some(hard_state) = hard_state {
            batch.insert("hs", hard_state.write_to_bytes().map_err(storage_error)?);
        }
        self.tree.apply_batch(batch).map_err(storage_error)?;
        self.tree.flush().map_err(storage_error)?;
        Ok(())
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
    /// node its own timeout from the run's seed and replay it.
    pub election_tick: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            node_id: 1,
            tick: Duration::from_millis(100),
            snapshot_every: 10_000,
            election_tick: 10,
        }
    }
}

/// Starts the raft node actor over the log in `dir`.
pub fn start(dir: &Path, settings: RaftSettings, cancel: CancellationToken) -> Result<RaftHandle, RaftError> {
    let log = SledLog::open(dir)?;
    let (storage, state, snapshot_index) = log.load(settings.node_id)?;
    let election_tick = settings.election_tick.max(4);
    let config = Config {
        id: settings.node_id,
        election_tick,
        min_election_tick: election_tick,
        max_election_tick: election_tick + 1,
        heartbeat_tick: 3,
        applied: snapshot_index,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    config.validate().map_err(storage_error)?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut node = RawNode::new(&config, storage, &logger).map_err(storage_error)?;
    // A single voter elects itself at once.
    node.campaign().map_err(storage_error)?;
    let (messages, receiver) = mpsc::channel(256);
    let (applied_tx, applied) = watch::channel(snapshot_index);
    let (role_tx, role) = watch::channel(false);
    let (term_tx, term) = watch::channel(0);
    let actor = Actor {
        node,
        log: Arc::new(log),
        state,
        snapshot_index,
        snapshot_every: settings.snapshot_every.max(1),
        waiting: BTreeMap::new(),
        next_request: 0,
        applied: applied_tx,
        role: role_tx,
        term: term_tx,
    };
    tokio::spawn(actor.run(receiver, settings.tick, cancel));
    Ok(RaftHandle {
        messages,
        applied,
        role,
        term,
    })
}

struct Actor {
    node: RawNode<MemStorage>,
    log: Arc<SledLog>,
    state: State,
    snapshot_index: u64,
    snapshot_every: u64,
    waiting: BTreeMap<u64, Reply>,
    next_request: u64,
    applied: watch::Sender<u64>,
    role: watch::Sender<bool>,
    term: watch::Sender<u64>,
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
                    Some(Message::Propose { command, reply }) => self.propose(*command, reply),
                    Some(Message::Read(read)) => read(&self.state),
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
        for (_, reply) in std::mem::take(&mut self.waiting) {
            let _ = reply.send(Err(RaftError::Stopped));
        }
    }

    fn propose(&mut self, command: Command, reply: Reply) {
        if self.node.raft.state != StateRole::Leader {
            let leader = Some(self.node.raft.leader_id).filter(|id| *id != 0);
            let _ = reply.send(Err(RaftError::NotLeader { leader }));
            return;
        }
        let data = match serde_json::to_vec(&command) {
            Ok(data) => data,
            Err(error) => {
                let _ = reply.send(Err(storage_error(error)));
                return;
            }
        };
        self.next_request += 1;
        let request = self.next_request;
        match self.node.propose(request.to_be_bytes().to_vec(), data) {
            Ok(()) => {
                self.waiting.insert(request, reply);
            }
            Err(error) => {
                tracing::debug!(%error, "proposal dropped");
                let _ = reply.send(Err(RaftError::NotLeader { leader: None }));
            }
        }
    }

    async fn on_ready(&mut self) -> Result<(), RaftError> {
        let is_leader = self.node.raft.state == StateRole::Leader;
        self.role
            .send_if_modified(|leader| std::mem::replace(leader, is_leader) != is_leader);
        let term = self.node.raft.term;
        self.term
            .send_if_modified(|current| std::mem::replace(current, term) != term);
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        // Step 1: messages to peers (none with one voter).
        debug_assert!(ready.messages().is_empty(), "a single voter sends no messages");
        // Steps 2-3: snapshot (none yet) and committed entries.
        self.apply_entries(ready.take_committed_entries());
        // Steps 4-5: persist entries and hard state before going on.
        let entries = ready.entries().clone();
        let hard_state = ready.hs().cloned();
        if !entries.is_empty() || hard_state.is_some() {
            let log = Arc::clone(&self.log);
            let to_persist = entries.clone();
            let persisted_hs = hard_state.clone();
            tokio::task::spawn_blocking(move || log.persist(&to_persist, persisted_hs.as_ref()))
                .await
                .map_err(storage_error)??;
            let mut core = self.node.mut_store().wl();
            core.append(&entries).map_err(storage_error)?;
            if let Some(hard_state) = hard_state {
                core.set_hardstate(hard_state);
            }
        }
        // Steps 6-7: advance, then what the light ready committed.
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hard_state = self.node.store().rl().hard_state().clone();
            hard_state.commit = commit;
            let log = Arc::clone(&self.log);
            let persisted = hard_state.clone();
            tokio::task::spawn_blocking(move || log.persist(&[], Some(&persisted)))
                .await
                .map_err(storage_error)??;
            self.node.mut_store().wl().set_hardstate(hard_state);
        }
        self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();
        self.snapshot_if_due().await
    }

    /// Every `snapshot_every` applied entries: save the state machine in sled and compact
    /// the log up to it, so a restart replays only what came after.
    async fn snapshot_if_due(&mut self) -> Result<(), RaftError> {
        let applied = self.node.raft.raft_log.applied;
        if applied < self.snapshot_index + self.snapshot_every {
            return Ok(());
        }
        let term = self.node.raft.raft_log.term(applied).map_err(storage_error)?;
        let conf_state = raft::Storage::initial_state(self.node.store())
            .map_err(storage_error)?
            .conf_state;
        let mut snapshot = Snapshot {
            data: serde_json::to_vec(&self.state).map_err(storage_error)?.into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        metadata.set_conf_state(conf_state);
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || log.save_snapshot(&snapshot))
            .await
            .map_err(storage_error)??;
        self.node.mut_store().wl().compact(applied).map_err(storage_error)?;
        self.snapshot_index = applied;
        tracing::debug!(index = applied, "state machine snapshot saved; log compacted");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                // The empty entry a new leader appends; conf changes come with membership.
                continue;
            }
            let result = match serde_json::from_slice::<Command>(&entry.data) {
                Ok(command) => Ok(self.state.apply(command)),
                Err(error) => Err(storage_error(format!(
                    "entry {} is not a command: {error}",
                    entry.index
                ))),
            };
            if entry.context.len() == 8 {
                let mut id = [0u8; 8];
                id.copy_from_slice(&entry.context);
                if let Some(reply) = self.waiting.remove(&u64::from_be_bytes(id)) {
                    let _ = reply.send(result);
                }
            }
            self.applied.send_replace(entry.index);
        }
    }
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
                election_tick: 10,
            },
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
        let status_url = raft.read(|state| state.jobs["job-1"].status_url.clone()).await.unwrap();
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
            let entries = log.tree.scan_prefix(b"e/").count();
            assert!(entries < 20, "the log was compacted: {entries} entries left");
            assert!(log.tree.get("snap").unwrap().is_some());
        }
        let cancel = CancellationToken::new();
        let raft = leader(dir.path(), &cancel).await;
        assert_eq!(
            raft.read(|state| state.jobs.len()).await.unwrap(),
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
}
