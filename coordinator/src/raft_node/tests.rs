use super::*;
use crate::state::{Applied, Command};

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

/// Runs a leader in `dir` that commits `jobs` submissions, then stops it.
async fn submit_and_stop(dir: &Path, jobs: usize) {
    let cancel = CancellationToken::new();
    let raft = leader(dir, &cancel).await;
    for _ in 0..jobs {
        raft.propose(Command::test_submission()).await.unwrap();
    }
    cancel.cancel();
    drop(raft);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn committed_commands_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let raft = leader(dir.path(), &cancel).await;
    assert!(raft.term() >= 1, "a leader has been elected in some term");
    assert_eq!(
        raft.propose(Command::test_submission()).await.unwrap(),
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
        raft.propose(Command::test_submission()).await.unwrap(),
        Applied::JobSubmitted { job_id: "job-2".into() }
    );
    cancel.cancel();
}

#[tokio::test]
async fn snapshots_compact_the_log_and_restore_the_state() {
    let dir = tempfile::tempdir().unwrap();
    submit_and_stop(dir.path(), 35).await;
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
        raft.propose(Command::test_submission()).await.unwrap(),
        Applied::JobSubmitted {
            job_id: "job-36".into()
        }
    );
    cancel.cancel();
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // The test rearranges the data directory itself.
async fn a_snapshot_lives_in_its_own_file_and_one_kept_in_sled_by_an_older_version_is_read() {
    let dir = tempfile::tempdir().unwrap();
    submit_and_stop(dir.path(), 35).await;
    {
        // Move the snapshot back to where an older version kept it.
        let log = SledLog::open(dir.path()).unwrap();
        assert!(log.has_snapshot_file() && !log.has_legacy_snapshot());
        let loaded = log.load(&[1]).unwrap();
        let snapshot = loaded.storage.snapshot.lock().unwrap().clone();
        std::fs::remove_file(dir.path().join("raft-snapshot.bin")).unwrap();
        log.put_legacy_snapshot(&snapshot);
    }
    let cancel = CancellationToken::new();
    let raft = leader(dir.path(), &cancel).await;
    assert_eq!(raft.read_linearizable(|state| state.jobs.len()).await.unwrap(), 35);
    // Enough log to outweigh the 35-job snapshot (see `snapshot_due`).
    for _ in 0..150 {
        raft.propose(Command::test_submission()).await.unwrap();
    }
    cancel.cancel();
    drop(raft);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = SledLog::open(dir.path()).unwrap();
    assert!(
        log.has_snapshot_file() && !log.has_legacy_snapshot(),
        "the next snapshot moved it to its file"
    );
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

#[tokio::test]
async fn proposals_that_arrive_together_share_disk_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let raft = leader(dir.path(), &cancel).await;
    let before = raft.log_syncs();
    let proposals: Vec<_> = (0..64)
        .map(|_| {
            let raft = raft.clone();
            tokio::spawn(async move { raft.propose(Command::test_submission()).await })
        })
        .collect();
    for proposal in proposals {
        assert!(matches!(proposal.await.unwrap().unwrap(), Applied::JobSubmitted { .. }));
    }
    let syncs = raft.log_syncs() - before;
    assert!(
        syncs < 32,
        "64 proposals sent at once took {syncs} disk syncs (one each without group commit)"
    );
    cancel.cancel();
}

#[tokio::test]
async fn a_commit_index_lost_in_a_crash_never_trails_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    submit_and_stop(dir.path(), 35).await;
    {
        // The commit index is written without a sync: a crash can leave an older one.
        let log = SledLog::open(dir.path()).unwrap();
        let loaded = log.load(&[1]).unwrap();
        assert!(loaded.snapshot_index > 1);
        let mut hard_state = loaded.storage.mem.rl().hard_state().clone();
        hard_state.commit = 1;
        log.persist(&[], Some(&hard_state)).unwrap();
        let reloaded = log.load(&[1]).unwrap();
        assert!(reloaded.storage.mem.rl().hard_state().commit >= loaded.snapshot_index);
    }
    let cancel = CancellationToken::new();
    let raft = leader(dir.path(), &cancel).await;
    assert_eq!(raft.read_linearizable(|state| state.jobs.len()).await.unwrap(), 35);
    raft.propose(Command::test_submission()).await.unwrap();
    cancel.cancel();
}

#[test]
fn a_snapshot_of_ours_finishing_after_a_newer_one_from_the_leader_does_not_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    log.load(&[1]).unwrap();
    let snapshot = |index: u64| {
        let mut snapshot = raft::eraftpb::Snapshot {
            data: serde_json::to_vec(&State::default()).unwrap().into(),
            ..Default::default()
        };
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1];
        snapshot
    };
    log.install_snapshot(&snapshot(40)).unwrap();
    // Ours, taken at index 30, was still being written.
    log.save_snapshot(&snapshot(30)).unwrap();
    assert_eq!(log.load(&[1]).unwrap().snapshot_index, 40);
    log.save_snapshot(&snapshot(50)).unwrap();
    assert_eq!(log.load(&[1]).unwrap().snapshot_index, 50);
}
