//! What every command needs from the process: shutdown on a signal, the cluster token
//! from the environment, the production HTTP transport, argument parsers.

use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::http::{ReqwestTransport, TransportSettings};
use fhirhaul_common::secret::Secret;
use tokio_util::sync::CancellationToken;

pub fn cluster_token() -> Option<Secret> {
    std::env::var("FHIRHAUL_CLUSTER_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new)
}

/// Cancels on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopping: leases are given back, partial files keep their checkpoints");
        trigger.cancel();
    });
    cancel
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    fhirhaul_common::serde_duration::parse(text).ok_or_else(|| format!("`{text}` is not a duration like 5s, 2m, 250ms"))
}

pub fn transport() -> anyhow::Result<Arc<ReqwestTransport>> {
    Ok(Arc::new(ReqwestTransport::new(&TransportSettings::default())?))
}
