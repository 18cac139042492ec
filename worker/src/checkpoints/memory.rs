//! Checkpoints in memory: for tests and simulations where a worker's disk is not the
//! point. Clones share their entries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fhirhaul_common::download::Checkpoint;

use super::{CheckpointStore, moves_forward};

#[derive(Clone, Default)]
pub struct MemoryCheckpoints {
    entries: Arc<Mutex<BTreeMap<String, (String, Checkpoint)>>>,
}

#[async_trait::async_trait]
impl CheckpointStore for MemoryCheckpoints {
    async fn get(&self, key: &str, url: &str) -> Option<Checkpoint> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (stored_url, checkpoint) = entries.get(key)?;
        (stored_url == url).then(|| checkpoint.clone())
    }

    async fn put(&self, key: &str, url: &str, checkpoint: &Checkpoint) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((stored_url, previous)) = entries.get(key)
            && stored_url == url
        {
            debug_assert!(moves_forward(previous, checkpoint), "checkpoint moved backwards");
        }
        entries.insert(key.to_string(), (url.to_string(), checkpoint.clone()));
    }

    async fn remove(&self, key: &str) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
