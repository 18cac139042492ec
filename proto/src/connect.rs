//! How anything reaches a coordinator: [`Connector`] builds gRPC channels (TLS or not, over
//! the OS network or a simulation's [`Dialer`]), and [`Coordinators`] holds the addresses of
//! every coordinator and sends each call to the raft leader, following the
//! `fhirhaul-leader` address a follower answers with.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirhaul_common::http::Dialer;
use fhirhaul_common::secret::Secret;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// The metadata key a follower puts the leader's address under.
pub const LEADER_METADATA: &str = "fhirhaul-leader";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("`{address}` is not a coordinator address: {reason}")]
    Address { address: String, reason: String },
    #[error("no coordinator address given")]
    NoAddress,
}

/// How to open channels to coordinators.
#[derive(Clone)]
pub struct Connector {
    pub tls: Option<ClientTlsConfig>,
    /// The OS network when `None` (a simulation passes its own).
    pub dialer: Option<Arc<dyn Dialer>>,
    /// Deadline of every call on these channels: a call must not hang on a connection a
    /// partition silently broke.
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .field("simulated", &self.dialer.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Default for Connector {
    fn default() -> Self {
        Connector {
            tls: None,
            dialer: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl Connector {
    /// A lazily connected channel to `address` (`http://host:port` or `https://…`).
    pub fn channel(&self, address: &str) -> Result<Channel, ConnectError> {
        let invalid = |reason: String| ConnectError::Address {
            address: address.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            // Idle connections are probed, so a silently broken one is noticed.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = self.tls.clone() {
            endpoint = endpoint.tls_config(tls).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(match self.dialer.clone() {
            None => endpoint.connect_lazy(),
            Some(dialer) => endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: http::Uri| {
                let dialer = Arc::clone(&dialer);
                async move {
                    let host = uri.host().unwrap_or_default().to_string();
                    let port = uri.port_u16().unwrap_or(80);
                    dialer.dial(&host, port).await.map(hyper_util::rt::TokioIo::new)
                }
            })),
        })
    }
}

struct Pool {
    connector: Connector,
    /// Every known coordinator, in the order given; leaders named by followers are added.
    members: Vec<(String, Channel)>,
    /// Index of the one calls go to.
    current: usize,
}

/// The coordinators of one cluster, with calls routed to the leader. Cheap to clone.
#[derive(Clone)]
pub struct Coordinators {
    pool: Arc<Mutex<Pool>>,
    cluster_token: Option<Secret>,
    /// How long one call keeps looking for a leader before giving up.
    failover_budget: Duration,
}

impl std::fmt::Debug for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinators")
            .field("addresses", &self.addresses())
            .finish_non_exhaustive()
    }
}

impl Coordinators {
    pub fn new(
        addresses: &[String],
        connector: Connector,
        cluster_token: Option<Secret>,
    ) -> Result<Coordinators, ConnectError> {
        if addresses.is_empty() {
            return Err(ConnectError::NoAddress);
        }
        let members = addresses
            .iter()
            .map(|address| Ok((address.clone(), connector.channel(address)?)))
            .collect::<Result<Vec<_>, ConnectError>>()?;
        Ok(Coordinators {
            pool: Arc::new(Mutex::new(Pool {
                connector,
                members,
                current: 0,
            })),
            cluster_token,
            failover_budget: Duration::from_secs(20),
        })
    }

    /// How long one call keeps trying other coordinators (default 20 s: several elections).
    pub fn with_failover_budget(mut self, budget: Duration) -> Self {
        self.failover_budget = budget;
        self
    }

    pub fn addresses(&self) -> Vec<String> {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.members.iter().map(|(address, _)| address.clone()).collect()
    }

    /// The address calls currently go to.
    pub fn current(&self) -> String {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.members[pool.current].0.clone()
    }

    /// The channel to the current member, for a call that must go to it and nowhere else.
    pub fn channel_to_current(&self) -> Channel {
        self.channel().1
    }

    fn channel(&self) -> (usize, Channel) {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        (pool.current, pool.members[pool.current].1.clone())
    }

    /// Wraps `message` with the cluster token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_cluster_token(message, self.cluster_token.as_ref())
    }

    /// After a failed call on member `tried`: go to the leader a follower named, or on to
    /// the next member. Returns `true` when the next attempt may follow at once.
    fn reroute(&self, tried: usize, status: &Status) -> bool {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if timed_out(status)
            && let Ok(fresh) = pool.connector.channel(&pool.members[tried].0)
        {
            // Its connection may have stopped delivering while still answering pings.
            pool.members[tried].1 = fresh;
        }
        if pool.current != tried {
            // Another call already moved on.
            return true;
        }
        let leader = status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(leader) = leader {
            if let Some(index) = pool.members.iter().position(|(a, _)| *a == leader) {
                let immediate = index != tried;
                pool.current = index;
                return immediate;
            }
            if let Ok(channel) = pool.connector.channel(&leader) {
                tracing::info!(%leader, "following the coordinator leader to an address not configured here");
                pool.members.push((leader, channel));
                pool.current = pool.members.len() - 1;
                return true;
            }
        }
        pool.current = (pool.current + 1) % pool.members.len();
        // A whole round without a leader: let the caller pause (an election is running).
        pool.current != 0
    }

    /// Runs `call` against the leader: a refusal naming the leader is followed at once; a
    /// coordinator that is down, or a follower that knows no leader yet, sends the call to
    /// the next address, pausing between rounds (50 ms doubling to 500 ms), until the
    /// failover budget is spent.
    /// Any other outcome — success or an error from the leader — is returned as it is.
    /// Only calls that are safe to repeat should come through here: an `Unavailable`
    /// from a broken connection may hide a call that reached the coordinator.
    pub async fn call<R, F, Fut>(&self, mut call: F) -> Result<R, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<R, Status>>,
    {
        let give_up = tokio::time::Instant::now() + self.failover_budget;
        let mut pause = Duration::from_millis(50);
        loop {
            let (tried, channel) = self.channel();
            let status = match call(channel).await {
                Ok(answer) => return Ok(answer),
                Err(status) if worth_another_coordinator(&status) => status,
                Err(status) => return Err(status),
            };
            if tokio::time::Instant::now() >= give_up {
                return Err(status);
            }
            if !self.reroute(tried, &status) {
                tracing::debug!(%status, "no coordinator leader reachable yet; pausing");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// A request carrying the cluster's token (when it has one) as a bearer credential.
pub fn with_cluster_token<T>(message: T, token: Option<&Secret>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token
        && let Ok(value) = format!("Bearer {}", token.expose()).parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Our own deadline ran out on a call. The connection it used may have silently stopped
/// delivering — a lost segment, a middlebox that dropped its state — while the other side
/// keeps it alive with pings, so HTTP/2 keep-alive never notices: the next call should
/// open a fresh one.
pub fn timed_out(status: &Status) -> bool {
    let from_transport = std::error::Error::source(status)
        .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some());
    status.code() == Code::DeadlineExceeded || (status.code() == Code::Cancelled && from_transport)
}

/// A follower's refusal, or a call that never got an answer from the coordinator (it is
/// down, or the connection broke): the next coordinator may do better. A coordinator's own
/// answers — including `Unknown` for "leadership changed, outcome uncertain" — are final.
fn worth_another_coordinator(status: &Status) -> bool {
    let from_transport = std::error::Error::source(status)
        .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some());
    match status.code() {
        // Coordinators never answer with a deadline of their own: this one is ours, spent
        // on a coordinator that went silent.
        Code::Unavailable | Code::DeadlineExceeded => true,
        Code::Unknown | Code::Cancelled => from_transport,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(leader: Option<&str>) -> Status {
        let mut status = Status::unavailable("this coordinator is not the leader");
        if let Some(leader) = leader {
            status
                .metadata_mut()
                .insert(LEADER_METADATA, leader.parse().expect("ascii"));
        }
        status
    }

    fn three() -> Coordinators {
        let addresses = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"].map(String::from);
        Coordinators::new(&addresses, Connector::default(), None).unwrap()
    }

    #[test]
    fn only_our_own_deadline_counts_as_a_silent_connection() {
        assert!(timed_out(&Status::deadline_exceeded("ours")));
        // A coordinator's own answers say nothing about the connection.
        assert!(!timed_out(&Status::cancelled("the coordinator cancelled it")));
        assert!(!timed_out(&Status::unavailable("not the leader")));
        assert!(!timed_out(&Status::unknown("leadership changed")));
    }

    #[tokio::test]
    async fn a_named_leader_is_followed_and_unknown_ones_are_added() {
        let coordinators = three();
        assert!(coordinators.reroute(0, &refusal(Some("http://127.0.0.1:3"))));
        assert_eq!(coordinators.current(), "http://127.0.0.1:3");
        assert!(coordinators.reroute(2, &refusal(Some("http://127.0.0.1:9"))));
        assert_eq!(coordinators.current(), "http://127.0.0.1:9");
        assert_eq!(coordinators.addresses().len(), 4);
    }

    #[tokio::test]
    async fn without_a_leader_every_member_is_tried_then_a_pause() {
        let coordinators = three();
        assert!(coordinators.reroute(0, &refusal(None)));
        assert!(coordinators.reroute(1, &refusal(None)));
        assert!(!coordinators.reroute(2, &refusal(None)), "a full round ends in a pause");
        assert_eq!(coordinators.current(), "http://127.0.0.1:1");
    }

    #[tokio::test]
    async fn errors_other_than_unavailable_are_returned_at_once() {
        let coordinators = three();
        let mut calls = 0;
        let result: Result<(), Status> = coordinators
            .call(|_| {
                calls += 1;
                async { Err(Status::aborted("lease is not yours")) }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Aborted);
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn a_call_finds_the_leader_behind_refusals() {
        let coordinators = three();
        let mut seen = Vec::new();
        let answer = coordinators
            .call(|_| {
                seen.push(coordinators.current());
                let at = coordinators.current();
                async move {
                    match at.as_str() {
                        "http://127.0.0.1:1" => Err(refusal(None)),
                        "http://127.0.0.1:2" => Err(refusal(Some("http://127.0.0.1:3"))),
                        _ => Ok(42),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, 42);
        assert_eq!(seen, ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]);
    }
}
