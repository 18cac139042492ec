//! The one seam for blocking work (disk syncs, sled, hashing big buffers): run it on
//! tokio's blocking pool, so no async thread is held for long, or inline on the calling
//! task, so a deterministic simulation never waits for a real thread finishing at a
//! real-time moment. Every component that does blocking I/O takes an [`Offload`].

/// Where blocking work runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Offload {
    /// On tokio's blocking pool (and dedicated threads where a component keeps one).
    #[default]
    Threads,
    /// On the calling task. Slower; only for a deterministic simulation.
    Inline,
}

impl Offload {
    /// Runs `work` where this seam says, and returns what it returned. A panic in `work`
    /// is resumed on the caller, as if it had run inline.
    pub async fn run<T: Send + 'static>(self, work: impl FnOnce() -> T + Send + 'static) -> T {
        match self {
            Offload::Inline => work(),
            Offload::Threads => match tokio::task::spawn_blocking(work).await {
                Ok(value) => value,
                Err(error) => match error.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // The runtime is shutting down; the work never ran.
                    Err(_) => std::panic::panic_any("blocking work was cancelled by runtime shutdown"),
                },
            },
        }
    }

    /// Whether blocking work runs on the calling task.
    pub fn is_inline(self) -> bool {
        self == Offload::Inline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ways_run_the_work_and_return_its_value() {
        for offload in [Offload::Threads, Offload::Inline] {
            assert_eq!(offload.run(|| 6 * 7).await, 42);
        }
    }

    #[tokio::test]
    async fn inline_work_runs_on_the_calling_thread() {
        let caller = std::thread::current().id();
        assert_eq!(Offload::Inline.run(move || std::thread::current().id()).await, caller);
        let elsewhere = Offload::Threads.run(move || std::thread::current().id()).await;
        assert_ne!(elsewhere, caller, "threads mode leaves the async thread free");
    }
}
