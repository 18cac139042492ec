//! Partial downloads a worker can resume: key = the file's relative path, value = its URL
//! and the last durable [`Checkpoint`]. One trait, [`CheckpointStore`], with the sled store
//! a worker keeps on disk ([`SledCheckpoints`]) and an in-memory one ([`MemoryCheckpoints`])
//! for tests and simulations; both pass the same conformance suite (`conformance`).

mod memory;
mod sled_store;

use fhirhaul_common::download::Checkpoint;

pub use self::memory::MemoryCheckpoints;
pub use self::sled_store::SledCheckpoints;

/// Where a worker keeps its checkpoints.
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The checkpoint of `key`, if it was recorded for this URL.
    async fn get(&self, key: &str, url: &str) -> Option<Checkpoint>;

    /// Records a checkpoint durably before returning. A checkpoint never moves backwards
    /// for one URL except through a restart from zero (offset 0) or a changed file (another
    /// validator).
    async fn put(&self, key: &str, url: &str, checkpoint: &Checkpoint);

    /// Forgets `key` (its file was published, or failed for good).
    async fn remove(&self, key: &str);
}

/// Whether `next` may follow `previous` for one URL (see [`CheckpointStore::put`]).
pub(crate) fn moves_forward(previous: &Checkpoint, next: &Checkpoint) -> bool {
    next.offset >= previous.offset || next.offset == 0 || next.validator != previous.validator
}

#[cfg(test)]
mod conformance {
    //! The behaviour every [`CheckpointStore`] must have, run against each implementation.

    use fhirhaul_common::download::Validator;

    use super::*;

    fn at(offset: u64) -> Checkpoint {
        Checkpoint {
            offset,
            lines: offset / 100,
            resources: offset / 100,
            validator: Some(Validator {
                etag: Some("\"v1\"".into()),
                last_modified: None,
            }),
        }
    }

    const KEY: &str = "job-1/Patient.1.ndjson";
    const URL: &str = "https://ehr.example/files/1";

    /// Runs every check against stores opened by `open`; a store opened again on the same
    /// place must keep what the first recorded.
    pub(super) async fn suite<S: CheckpointStore>(open: impl Fn() -> S) {
        let store = open();
        assert_eq!(store.get(KEY, URL).await, None, "a new store is empty");
        store.put(KEY, URL, &at(4096)).await;
        assert_eq!(store.get(KEY, URL).await, Some(at(4096)));
        assert_eq!(
            store.get(KEY, "https://ehr.example/files/OTHER").await,
            None,
            "a checkpoint belongs to its URL"
        );
        store.put(KEY, URL, &at(8192)).await;
        assert_eq!(store.get(KEY, URL).await, Some(at(8192)), "the latest checkpoint wins");
        store.put("job-1/Patient.2.ndjson", URL, &at(100)).await;
        assert_eq!(store.get(KEY, URL).await, Some(at(8192)), "keys are independent");
        store.put(KEY, URL, &Checkpoint::default()).await;
        assert_eq!(
            store.get(KEY, URL).await,
            Some(Checkpoint::default()),
            "a restart from zero is recorded"
        );
        store.put(KEY, URL, &at(300)).await;
        drop(store);
        let again = open();
        assert_eq!(
            again.get(KEY, URL).await,
            Some(at(300)),
            "checkpoints survive a restart"
        );
        again.remove(KEY).await;
        assert_eq!(again.get(KEY, URL).await, None, "a removed checkpoint is gone");
        again.remove("never-recorded").await;
    }

    #[tokio::test]
    async fn the_sled_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        for offload in [
            fhirhaul_common::offload::Offload::Threads,
            fhirhaul_common::offload::Offload::Inline,
        ] {
            let path = dir.path().join(format!("{offload:?}"));
            suite(|| SledCheckpoints::open(&path, offload).unwrap()).await;
        }
    }

    #[tokio::test]
    async fn the_memory_store_conforms() {
        let shared = MemoryCheckpoints::default();
        // Clones share their entries, as a reopened store shares its disk.
        suite(|| shared.clone()).await;
    }

    #[test]
    fn a_checkpoint_moves_backwards_only_by_restarting_or_a_changed_file() {
        assert!(moves_forward(&at(100), &at(200)));
        assert!(moves_forward(&at(100), &at(100)));
        assert!(moves_forward(&at(100), &Checkpoint::default()));
        assert!(!moves_forward(&at(200), &at(100)));
        let changed = Checkpoint {
            validator: None,
            ..at(50)
        };
        assert!(moves_forward(&at(200), &changed));
    }
}
