//! The token manager actor: one cached access token per tenant, refreshed ahead of expiry
//! and once per refused token, with every concurrent caller sharing one in-flight refresh.

use std::sync::Arc;
use std::time::Duration;

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
        authenticator: Authenticator,
        refresh_margin: Duration,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(64);
        let actor = Actor {
            authenticator: Arc::new(authenticator),
            refresh_margin,
            clock,
            current: None,
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
    authenticator: Arc<Authenticator>,
    refresh_margin: Duration,
    clock: Arc<dyn Clock>,
    current: Option<AccessToken>,
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
        let margin = self.refresh_margin.min(token.lifetime / 2);
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
        self.waiters.push(reply);
        if !self.refreshing {
            self.refreshing = true;
            let authenticator = Arc::clone(&self.authenticator);
            let done = done.clone();
            // The fetch runs in its own task so the actor keeps answering; its result comes
            // back through `done`.
            tokio::spawn(async move {
                let result = authenticator.fetch_token().await;
                let _ = done.send(result).await;
            });
        }
    }

    fn on_refreshed(&mut self, result: Result<AccessToken>) {
        self.refreshing = false;
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
