//! The raft log in sled, and the `raft::Storage` raft-rs reads it through.
//!
//! sled tree `raft`: `hs` (hard state), `cs` (membership) and `e/<index>` (entries after
//! the snapshot). The latest state-machine snapshot (the whole state as JSON) is a file of
//! its own, `raft-snapshot.bin`, written (to a temporary name, synced, renamed) only when a
//! snapshot is taken or installed: kept in the sled tree, it was rewritten with the log,
//! tens of megabytes per entry for a large job. On start everything is loaded into
//! raft-rs's `MemStorage`; [`LogStorage`] wraps it so a leader sends the snapshot, with its
//! data, to a follower that is too far behind.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::state::State;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftError {
    #[error("this coordinator is not the leader")]
    NotLeader {
        leader: Option<u64>,
        /// The leader's gRPC address, when known.
        address: Option<String>,
    },
    #[error("leadership changed before the change was confirmed; it may or may not have been applied")]
    Uncertain,
    #[error("the leader could not confirm it still leads (no quorum answered in time)")]
    Unconfirmed,
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("raft storage failed: {0}")]
    Storage(#[from] LogError),
    #[error("the raft node has stopped")]
    Stopped,
}

/// What went wrong under the raft log: the disk store, an encoding, or raft-rs itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("sled: {0}")]
    Sled(Arc<sled::Error>),
    #[error("protobuf encoding: {0}")]
    Protobuf(Arc<protobuf::ProtobufError>),
    #[error("raft-rs: {0}")]
    Raft(Arc<raft::Error>),
    #[error("JSON encoding: {0}")]
    Json(Arc<serde_json::Error>),
    #[error("log entry {index} is not a command: {reason}")]
    BadEntry { index: u64, reason: String },
    #[error("snapshot file: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<sled::Error> for LogError {
    fn from(error: sled::Error) -> Self {
        LogError::Sled(Arc::new(error))
    }
}

impl From<protobuf::ProtobufError> for LogError {
    fn from(error: protobuf::ProtobufError) -> Self {
        LogError::Protobuf(Arc::new(error))
    }
}

impl From<raft::Error> for LogError {
    fn from(error: raft::Error) -> Self {
        LogError::Raft(Arc::new(error))
    }
}

impl From<serde_json::Error> for LogError {
    fn from(error: serde_json::Error) -> Self {
        LogError::Json(Arc::new(error))
    }
}

pub(crate) fn storage_error(error: impl Into<LogError>) -> RaftError {
    RaftError::Storage(error.into())
}

fn entry_key(index: u64) -> Vec<u8> {
    let mut key = b"e/".to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// What a node starts from.
pub(crate) struct Loaded {
    pub storage: LogStorage,
    pub state: State,
    /// Index of the snapshot the state reflects (0: none).
    pub snapshot_index: u64,
    pub conf_state: ConfState,
}

/// The raft log in sled, and the snapshot file beside it.
#[derive(Clone)]
pub(crate) struct SledLog {
    tree: sled::Tree,
    snapshot_path: PathBuf,
    /// Durable writes of log entries or hard state so far (each one disk sync).
    syncs: Arc<std::sync::atomic::AtomicU64>,
    /// The index of the snapshot in the file: snapshots are written off the raft actor, so
    /// one of ours finishing after a leader's newer one was installed must not replace it.
    snapshot_index: Arc<Mutex<u64>>,
}

/// The sled key where snapshots were kept before they got a file of their own (read once,
/// then removed).
const LEGACY_SNAPSHOT_KEY: &str = "snap";

/// sled's page cache for the log.
const LOG_CACHE_BYTES: u64 = 32 * 1024 * 1024;

impl SledLog {
    #[allow(clippy::disallowed_methods)] // Opened once, when the coordinator starts.
    pub fn open(dir: &Path) -> Result<SledLog, RaftError> {
        // The log is written once and read back only by followers catching up: sled's
        // default 1 GiB page cache would only grow the coordinator's memory.
        let db = sled::Config::new()
            .path(dir.join("raft"))
            .cache_capacity(LOG_CACHE_BYTES)
            .open()
            .map_err(storage_error)?;
        Ok(SledLog {
            tree: db.open_tree("raft").map_err(storage_error)?,
            snapshot_path: dir.join("raft-snapshot.bin"),
            syncs: Arc::default(),
            snapshot_index: Arc::default(),
        })
    }

    /// The latest snapshot's bytes: the file, else (a data directory from before the
    /// file) the sled key.
    #[allow(clippy::disallowed_methods)] // Runs on the raft actor's storage thread.
    fn read_snapshot(&self) -> Result<Option<Vec<u8>>, RaftError> {
        match std::fs::read(&self.snapshot_path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(self
                .tree
                .get(LEGACY_SNAPSHOT_KEY)
                .map_err(storage_error)?
                .map(|bytes| bytes.to_vec())),
            Err(error) => Err(storage_error(LogError::Io(Arc::new(error)))),
        }
    }

    /// Writes the snapshot file durably: a temporary file, synced, renamed over the old one,
    /// and the directory synced, so a crash leaves the old snapshot or the new, never half.
    #[allow(clippy::disallowed_methods)] // Runs on the raft actor's storage thread.
    fn write_snapshot(&self, snapshot: &Snapshot) -> Result<(), RaftError> {
        use std::io::Write as _;
        let bytes = snapshot.write_to_bytes().map_err(storage_error)?;
        let io = |error: std::io::Error| storage_error(LogError::Io(Arc::new(error)));
        let temporary = self.snapshot_path.with_extension("bin.tmp");
        let mut file = fhirhaul_common::private_fs::create_file(&temporary).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temporary, &self.snapshot_path).map_err(io)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Loads the snapshot (with the state machine it holds), the entries after it, the
    /// membership and the hard state. A log that has never been written starts with
    /// `initial_voters` (empty for a coordinator that waits to be added to a group).
    pub fn load(&self, initial_voters: &[u64]) -> Result<Loaded, RaftError> {
        let mem = MemStorage::new();
        let conf_state = match self.tree.get("cs").map_err(storage_error)? {
            Some(bytes) => ConfState::parse_from_bytes(&bytes).map_err(storage_error)?,
            None => {
                let conf_state = ConfState {
                    voters: initial_voters.to_vec(),
                    ..Default::default()
                };
                self.save_conf_state(&conf_state)?;
                conf_state
            }
        };
        let mut state = State::default();
        let mut snapshot_index = 0;
        let mut core = mem.wl();
        let mut latest = Snapshot::default();
        if let Some(bytes) = self.read_snapshot()? {
            let snapshot = Snapshot::parse_from_bytes(&bytes).map_err(storage_error)?;
            state = restore_state(&snapshot)?;
            snapshot_index = snapshot.get_metadata().index;
            core.apply_snapshot(snapshot.clone()).map_err(storage_error)?;
            latest = snapshot;
        }
        let mut entries = Vec::new();
        for item in self.tree.range(entry_key(snapshot_index + 1)..entry_key(u64::MAX)) {
            let (_, bytes) = item.map_err(storage_error)?;
            entries.push(Entry::parse_from_bytes(&bytes).map_err(storage_error)?);
        }
        core.set_conf_state(conf_state.clone());
        core.append(&entries).map_err(storage_error)?;
        if let Some(bytes) = self.tree.get("hs").map_err(storage_error)? {
            let mut hard_state = HardState::parse_from_bytes(&bytes).map_err(storage_error)?;
            // The commit index is written without a sync of its own (see `persist_commit`):
            // after a crash it may trail the snapshot, which holds only committed entries.
            hard_state.commit = hard_state.commit.max(snapshot_index);
            core.set_hardstate(hard_state);
        }
        drop(core);
        *self.snapshot_index.lock().unwrap_or_else(|p| p.into_inner()) = snapshot_index;
        Ok(Loaded {
            storage: LogStorage {
                mem,
                snapshot: Arc::new(Mutex::new(latest)),
            },
            state,
            snapshot_index,
            conf_state,
        })
    }

    pub fn save_conf_state(&self, conf_state: &ConfState) -> Result<(), RaftError> {
        self.tree
            .insert("cs", conf_state.write_to_bytes().map_err(storage_error)?)
            .map_err(storage_error)?;
        self.tree.flush().map_err(storage_error)?;
        Ok(())
    }

    /// Saves a snapshot of our own state and drops the log entries it covers. The file comes
    /// first: a crash before the entries are dropped leaves entries the load skips.
    pub fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let index = snapshot.get_metadata().index;
        let mut saved = self.snapshot_index.lock().unwrap_or_else(|p| p.into_inner());
        if index <= *saved {
            return Ok(());
        }
        self.write_snapshot(snapshot)?;
        *saved = index;
        let mut batch = sled::Batch::default();
        batch.remove(LEGACY_SNAPSHOT_KEY);
        for covered in self.tree.range(entry_key(0)..=entry_key(index)) {
            let (key, _) = covered.map_err(storage_error)?;
            batch.remove(key);
        }
        self.tree.apply_batch(batch).map_err(storage_error)?;
        self.tree.flush().map_err(storage_error)?;
        Ok(())
    }

    /// Replaces the whole log with a snapshot a leader sent (the log it had is superseded).
    /// The file comes first: a crash before the log is cleared leaves a log the load reads
    /// only after the snapshot's index, never a log whose commit points past what is kept.
    pub fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let mut saved = self.snapshot_index.lock().unwrap_or_else(|p| p.into_inner());
        self.write_snapshot(snapshot)?;
        *saved = snapshot.get_metadata().index;
        let mut batch = sled::Batch::default();
        for stale in self.tree.scan_prefix(b"e/") {
            let (key, _) = stale.map_err(storage_error)?;
            batch.remove(key);
        }
        batch.remove(LEGACY_SNAPSHOT_KEY);
        batch.insert(
            "cs",
            snapshot
                .get_metadata()
                .get_conf_state()
                .write_to_bytes()
                .map_err(storage_error)?,
        );
        self.tree.apply_batch(batch).map_err(storage_error)?;
        self.tree.flush().map_err(storage_error)?;
        Ok(())
    }

    /// Persists new entries (replacing any conflicting tail) and the hard state, durably.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), RaftError> {
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
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The counter of durable writes ([`SledLog::persist`]), shared.
    pub fn syncs(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.syncs)
    }

    /// Records a new commit index without syncing: it rides along with the next durable
    /// write. Losing it in a crash is safe (raft re-learns the commit index from the log of
    /// the majority; `load` never lets it trail the snapshot), and it saves one disk sync
    /// per committed batch on the leader.
    pub fn persist_commit(&self, hard_state: &HardState) -> Result<(), RaftError> {
        self.tree
            .insert("hs", hard_state.write_to_bytes().map_err(storage_error)?)
            .map_err(storage_error)?;
        Ok(())
    }

    #[cfg(test)]
    pub fn entry_count(&self) -> usize {
        self.tree.scan_prefix(b"e/").count()
    }

    #[cfg(test)]
    pub fn has_snapshot(&self) -> bool {
        self.read_snapshot().ok().flatten().is_some()
    }

    /// Where an older version kept the snapshot: in the sled tree.
    #[cfg(test)]
    pub fn put_legacy_snapshot(&self, snapshot: &Snapshot) {
        self.tree
            .insert(LEGACY_SNAPSHOT_KEY, snapshot.write_to_bytes().unwrap())
            .unwrap();
        self.tree.flush().unwrap();
    }

    #[cfg(test)]
    pub fn has_snapshot_file(&self) -> bool {
        self.snapshot_path.exists()
    }

    #[cfg(test)]
    pub fn has_legacy_snapshot(&self) -> bool {
        self.tree.get(LEGACY_SNAPSHOT_KEY).ok().flatten().is_some()
    }
}

/// The state machine a snapshot carries.
pub(crate) fn restore_state(snapshot: &Snapshot) -> Result<State, RaftError> {
    serde_json::from_slice(&snapshot.data).map_err(storage_error)
}

/// raft-rs's view of the log: `MemStorage` for entries and hard state, and the latest sled
/// snapshot — data included — for followers that need one.
#[derive(Clone)]
pub(crate) struct LogStorage {
    pub mem: MemStorage,
    pub snapshot: Arc<Mutex<Snapshot>>,
}

impl LogStorage {
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }
}

impl raft::Storage for LogStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let index = snapshot.get_metadata().index;
        if index == 0 || index < request_index {
            // None yet (the log has never been compacted); raft-rs asks again later.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snapshot)
    }
}
