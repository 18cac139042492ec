//! The token manager actor: one cached access token per tenant, refreshed ahead of expiry
//! and once per refused token, with every concurrent caller sharing one in-flight refresh.
//! When the EHR refuses the client itself (`invalid_client`, a revoked key: an error that
//! is not retryable), the refusal is remembered for [`TokenTimings::refusal_hold`]: every
//! caller meanwhile gets it back at once, and no new assertion is signed or sent, so a
//! cluster of workers cannot storm the token endpoint.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{AccessToken, Authenticator};
use crate::clock::Clock;
use crate::error::{Error, Result};

/// Where the client core gets its bearer token. The token manager implements it in one
/// process; a worker implements it by asking its coordinator.
#[async_trait::async_trait]
pub trait TokenProvider: Send + Sync + 'static {
    /// A token with time left on it.
    async fn token(&self) -> Result<AccessToken>;

    /// The EHR answered 401 to a request made with token `generation`: get a new one. Many
    /// callers refused with the same token cause one refresh, not one each.
    async fn token_refused(&self, generation: u64) -> Result<AccessToken>;
}

/// Where fresh tokens come from: the [`Authenticator`] (discovery, signed assertion, token
/// request), or a test's stand-in.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync + 'static {
    async fn fetch_token(&self) -> Result<AccessToken>;
}

#[async_trait::async_trait]
impl TokenSource for Authenticator {
    async fn fetch_token(&self) -> Result<AccessToken> {
        Authenticator::fetch_token(self).await
    }
}

/// The token manager's timings.
#[derive(Debug, Clone, Copy)]
pub struct TokenTimings {
    /// Refresh when less than this (at most half the token's lifetime) remains.
    pub refresh_margin: Duration,
    /// How long a refusal of the client is answered from memory.
    pub refusal_hold: Duration,
}

type Reply = oneshot::Sender<Result<AccessToken>>;

enum Command {
    Get { reply: Reply },
    Refused { generation: u64, reply: Reply },
}

/// Handle to a token manager actor. Cheap to clone; the actor stops when every handle is
/// dropped or its cancellation token fires.
#[derive(Clone)]
pub struct TokenManager {
    commands: mpsc::Sender<Command>,
}

impl TokenManager {
    pub fn spawn(
        source: impl TokenSource,
        timings: TokenTimings,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(64);
        let actor = Actor {
            source: Arc::new(source),
            timings,
            clock,
            current: None,
            refusal: None,
            issued: 0,
            waiters: Vec::new(),
            refreshing: false,
        };
        tokio::spawn(actor.run(receiver, cancel));
        TokenManager { commands }
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<AccessToken> {
        let unavailable = || Error::Unavailable {
            component: "token manager",
        };
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| unavailable())?;
        answer.await.map_err(|_| unavailable())?
    }
}

#[async_trait::async_trait]
impl TokenProvider for TokenManager {
    async fn token(&self) -> Result<AccessToken> {
        self.ask(|reply| Command::Get { reply }).await
    }

    async fn token_refused(&self, generation: u64) -> Result<AccessToken> {
        self.ask(|reply| Command::Refused { generation, reply }).await
    }
}

struct Actor {
    source: Arc<dyn TokenSource>,
    timings: TokenTimings,
    clock: Arc<dyn Clock>,
    current: Option<AccessToken>,
    /// The EHR's last refusal of the client, and when it came.
    refusal: Option<(SystemTime, Error)>,
    issued: u64,
    waiters: Vec<Reply>,
    refreshing: bool,
}

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::channel::<Result<AccessToken>>(1);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(result) = done_rx.recv() => self.on_refreshed(result),
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command, &done_tx),
                    None => break,
                },
            }
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(Error::Cancelled));
        }
    }

    /// A token is fresh while more than the margin remains; for short-lived tokens (SMART
    /// recommends five minutes) the margin is capped at half the lifetime.
    fn fresh_token(&self) -> Option<&AccessToken> {
        let token = self.current.as_ref()?;
        let margin = self.timings.refresh_margin.min(token.lifetime / 2);
        let remaining = token.expires_at.duration_since(self.clock.now()).ok()?;
        (remaining > margin).then_some(token)
    }

    fn on_command(&mut self, command: Command, done: &mpsc::Sender<Result<AccessToken>>) {
        let reply = match command {
            Command::Get { reply } => reply,
            Command::Refused { generation, reply } => {
                if self.current.as_ref().map(|t| t.generation) == Some(generation) {
                    tracing::info!(generation, "access token refused by the EHR; refreshing");
                    self.current = None;
                }
                reply
            }
        };
        if let Some(token) = self.fresh_token() {
            let _ = reply.send(Ok(token.clone()));
            return;
        }
        if let Some(refusal) = self.held_refusal() {
            let _ = reply.send(Err(refusal));
            return;
        }
        self.waiters.push(reply);
        if !self.refreshing {
            self.refreshing = true;
            let source = Arc::clone(&self.source);
            let done = done.clone();
            // The fetch runs in its own task so the actor keeps answering; its result comes
            // back through `done`.
            tokio::spawn(async move {
                let result = source.fetch_token().await;
                let _ = done.send(result).await;
            });
        }
    }

    /// The EHR's refusal of the client, while it is still held.
    fn held_refusal(&self) -> Option<Error> {
        let (at, error) = self.refusal.as_ref()?;
        let held_for = self.clock.now().duration_since(*at).unwrap_or_default();
        (held_for < self.timings.refusal_hold).then(|| error.clone())
    }

    fn on_refreshed(&mut self, result: Result<AccessToken>) {
        self.refreshing = false;
        match &result {
            Err(error) if !error.is_retryable() => {
                tracing::warn!(%error, hold_s = self.timings.refusal_hold.as_secs(), "the EHR refused the client; answering callers with its refusal before trying again");
                self.refusal = Some((self.clock.now(), error.clone()));
            }
            Err(_) => {}
            Ok(_) => self.refusal = None,
        }
        let result = result.map(|mut token| {
            self.issued += 1;
            token.generation = self.issued;
            tracing::debug!(
                generation = token.generation,
                lifetime_s = token.lifetime.as_secs(),
                "access token refreshed"
            );
            self.current = Some(token.clone());
            token
        });
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::clock::TokioClock;
    use crate::secret::Secret;
    use crate::url_util::SafeUrl;

    /// Refuses the client, then (once `accept` is set) issues five-minute tokens; counts
    /// the requests that reached it.
    struct Ehr {
        requests: AtomicU32,
        accept: std::sync::atomic::AtomicBool,
        clock: Arc<dyn Clock>,
    }

    #[async_trait::async_trait]
    impl TokenSource for Arc<Ehr> {
        async fn fetch_token(&self) -> Result<AccessToken> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if !self.accept.load(Ordering::SeqCst) {
                return Err(Error::OAuth {
                    url: SafeUrl::from("https://ehr.example/token"),
                    status: 400,
                    error: "invalid_client".into(),
                    description: Some("key revoked".into()),
                    uri: None,
                });
            }
            let lifetime = Duration::from_secs(300);
            Ok(AccessToken {
                value: Secret::new("token".to_string()),
                expires_at: self.clock.now() + lifetime,
                lifetime,
                scope: None,
                generation: 0,
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_of_the_client_is_answered_from_memory_until_the_hold_ends() {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(SystemTime::UNIX_EPOCH));
        let ehr = Arc::new(Ehr {
            requests: AtomicU32::new(0),
            accept: false.into(),
            clock: Arc::clone(&clock),
        });
        let manager = TokenManager::spawn(
            Arc::clone(&ehr),
            TokenTimings {
                refresh_margin: Duration::from_secs(60),
                refusal_hold: Duration::from_secs(30),
            },
            clock,
            CancellationToken::new(),
        );
        for _ in 0..100 {
            let error = manager.token().await.unwrap_err();
            assert!(!error.is_retryable());
            assert!(error.to_string().contains("key revoked"), "{error}");
        }
        assert_eq!(
            ehr.requests.load(Ordering::SeqCst),
            1,
            "a hundred callers, one request to the EHR"
        );
        let error = manager.token_refused(0).await.unwrap_err();
        assert!(error.to_string().contains("invalid_client"));
        assert_eq!(ehr.requests.load(Ordering::SeqCst), 1);
        // The key is registered again; once the hold ends the next caller tries again.
        ehr.accept.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(manager.token().await.is_ok());
        assert_eq!(ehr.requests.load(Ordering::SeqCst), 2);
        assert!(manager.token().await.is_ok(), "the token is cached");
        assert_eq!(ehr.requests.load(Ordering::SeqCst), 2);
    }
}
