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
        request_id: None,
        export_id: None,
        delete_policy: Default::default(),
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

#[tokio::test]
#[allow(clippy::disallowed_methods)] // The test rearranges the data directory itself.
async fn a_snapshot_lives_in_its_own_file_and_one_kept_in_sled_by_an_older_version_is_read() {
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
    for _ in 0..35 {
        raft.propose(submit()).await.unwrap();
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
