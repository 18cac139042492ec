//! Raft messages to the other coordinators, over the `RaftService` gRPC API.
//!
//! Each peer has its own sender task and bounded queue, so a slow or dead peer never
//! holds up the raft actor or the other peers: when a queue is full, messages are dropped
//! (raft retransmits) and the peer is reported unreachable. Failed deliveries are reported
//! to the raft node (`report_unreachable`, `report_snapshot`), as raft-rs expects.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirhaul_common::secret::Secret;
use fhirhaul_proto::connect::Connector;
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::raft_service_client::RaftServiceClient;
use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The largest raft batch (a snapshot carries the whole state machine).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

struct Shared {
    node_id: u64,
    connector: Connector,
    cluster_token: Option<Secret>,
    addresses: BTreeMap<u64, String>,
    queues: BTreeMap<u64, mpsc::Sender<RaftMessage>>,
    reports: Option<mpsc::Sender<Delivery>>,
    cancel: CancellationToken,
}

/// What a peer's sender task reports to the raft node about a message it could not
/// deliver (raft-rs must hear of these to retry, and of every snapshot's fate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    Unreachable(u64),
    SnapshotSent { to: u64, delivered: bool },
}

/// The outgoing side of the raft transport. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    shared: Arc<Mutex<Shared>>,
}

impl Peers {
    pub fn new(node_id: u64, connector: Connector, cluster_token: Option<Secret>, cancel: CancellationToken) -> Peers {
        Peers {
            shared: Arc::new(Mutex::new(Shared {
                node_id,
                connector,
                cluster_token,
                addresses: BTreeMap::new(),
                queues: BTreeMap::new(),
                reports: None,
                cancel,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where delivery failures are reported (the raft node's own queue).
    pub(crate) fn attach(&self, reports: mpsc::Sender<Delivery>) {
        self.lock().reports = Some(reports);
    }

    /// The address book: every member's gRPC address.
    pub(crate) fn set_addresses(&self, addresses: BTreeMap<u64, String>) {
        let mut shared = self.lock();
        // A peer whose address changed gets a new sender task (and channel).
        let changed: Vec<u64> = shared
            .queues
            .keys()
            .filter(|id| shared.addresses.get(id) != addresses.get(id))
            .copied()
            .collect();
        for id in changed {
            shared.queues.remove(&id);
        }
        shared.addresses = addresses;
    }

    /// Queues messages for their peers, without waiting.
    pub(crate) fn send(&self, messages: Vec<RaftMessage>) {
        if messages.is_empty() {
            return;
        }
        let mut shared = self.lock();
        for message in messages {
            let to = message.to;
            let Some(queue) = shared.queue(to) else {
                tracing::debug!(peer = to, "no address for raft peer; message dropped");
                report_dropped(&shared.reports, &message);
                continue;
            };
            if let Err(full) = queue.try_send(message) {
                let message = match full {
                    mpsc::error::TrySendError::Full(message) | mpsc::error::TrySendError::Closed(message) => message,
                };
                report_dropped(&shared.reports, &message);
            }
        }
    }
}

impl Shared {
    fn queue(&mut self, to: u64) -> Option<mpsc::Sender<RaftMessage>> {
        if let Some(queue) = self.queues.get(&to)
            && !queue.is_closed()
        {
            return Some(queue.clone());
        }
        let address = self.addresses.get(&to)?.clone();
        let peer = Peer {
            to,
            address,
            connector: self.connector.clone(),
        };
        let client = match peer.client() {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(peer = to, %error, "cannot reach raft peer");
                return None;
            }
        };
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(deliver(
            self.node_id,
            peer,
            client,
            self.cluster_token.clone(),
            receiver,
            self.reports.clone(),
            self.cancel.clone(),
        ));
        self.queues.insert(to, sender.clone());
        Some(sender)
    }
}

fn report_to(reports: &Option<mpsc::Sender<Delivery>>, message: Delivery) {
    if let Some(reports) = reports {
        let _ = reports.try_send(message);
    }
}

/// Tells raft a message to `message.to` was not delivered. A dropped snapshot must be
/// reported as failed: raft-rs sends nothing more to a follower whose snapshot is in
/// flight until it hears how that went, so an unreported loss leaves it behind for good.
fn report_dropped(reports: &Option<mpsc::Sender<Delivery>>, message: &RaftMessage) {
    report_to(reports, Delivery::Unreachable(message.to));
    if message.get_msg_type() == MessageType::MsgSnapshot {
        tracing::debug!(peer = message.to, "raft snapshot not delivered; reported as failed");
        report_to(
            reports,
            Delivery::SnapshotSent {
                to: message.to,
                delivered: false,
            },
        );
    }
}

/// Where one peer is, and how to open a connection to it.
struct Peer {
    to: u64,
    address: String,
    connector: Connector,
}

impl Peer {
    fn client(&self) -> Result<RaftServiceClient<tonic::transport::Channel>, fhirhaul_proto::connect::ConnectError> {
        let channel = self.connector.channel(&self.address)?;
        Ok(RaftServiceClient::new(channel).max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES))
    }
}

/// One peer's sender: batches whatever is queued into one call.
async fn deliver(
    from: u64,
    peer: Peer,
    mut client: RaftServiceClient<tonic::transport::Channel>,
    cluster_token: Option<Secret>,
    mut queue: mpsc::Receiver<RaftMessage>,
    reports: Option<mpsc::Sender<Delivery>>,
    cancel: CancellationToken,
) {
    let to = peer.to;
    let report = |message: Delivery| report_to(&reports, message);
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            first = queue.recv() => match first {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < 128 {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let has_snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let messages: Vec<Vec<u8>> = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
        let mut request =
            fhirhaul_proto::connect::with_cluster_token(pb::RaftBatch { from, messages }, cluster_token.as_ref());
        // Heartbeats must not queue behind a dead peer's timeouts; snapshots may be large.
        request.set_timeout(if has_snapshot {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(2)
        });
        match client.deliver(request).await {
            Ok(_) => {
                if has_snapshot {
                    report(Delivery::SnapshotSent { to, delivered: true });
                }
            }
            Err(status) => {
                tracing::debug!(peer = to, %status, "raft delivery failed");
                if fhirhaul_proto::connect::timed_out(&status)
                    && let Ok(fresh) = peer.client()
                {
                    client = fresh;
                }
                report(Delivery::Unreachable(to));
                if has_snapshot {
                    report(Delivery::SnapshotSent { to, delivered: false });
                }
                // Drop what queued up meanwhile (raft resends), and do not hammer the peer.
                while let Ok(dropped) = queue.try_recv() {
                    report_dropped(&reports, &dropped);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}
