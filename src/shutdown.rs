//! The drain signal and the guard every connection holds.
//!
//! Phases run one way: `Running` → `Draining` (readiness 503, the listener stops accepting, sessions carry on) →
//! `Closing` (the drain deadline passed: each session sends Close 1001 at a frame boundary and ends). The
//! [`Drain`] owner waits for every [`ConnectionGuard`] to drop, or for its deadline.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Where the process is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; open sessions continue.
    Draining,
    /// Open sessions are told to go away now.
    Closing,
}

/// The owner's side: starts the drain and waits for connections to finish.
#[derive(Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    guard_tx: Option<mpsc::Sender<()>>,
    guard_rx: mpsc::Receiver<()>,
}

/// A task's view of the phase.
#[derive(Debug, Clone)]
pub struct Signal {
    phase: watch::Receiver<Phase>,
}

/// Issues [`ConnectionGuard`]s; held by the accept loop.
#[derive(Debug, Clone)]
pub struct Guards {
    tx: Option<mpsc::Sender<()>>,
}

impl Guards {
    /// A guard for one connection; `None` once the drain has started.
    #[must_use]
    pub fn guard(&self) -> Option<ConnectionGuard> {
        self.tx
            .as_ref()
            .map(|tx| ConnectionGuard { _tx: tx.clone() })
    }
}

/// Held by every connection task; the drain completes when all are dropped.
#[must_use = "a connection is counted only while its guard lives"]
#[derive(Debug, Clone)]
pub struct ConnectionGuard {
    _tx: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain in the `Running` phase.
    #[must_use]
    pub fn new() -> Drain {
        let (phase, _) = watch::channel(Phase::Running);
        let (tx, rx) = mpsc::channel(1);
        Drain {
            phase,
            guard_tx: Some(tx),
            guard_rx: rx,
        }
    }

    /// A receiver of the phase.
    #[must_use]
    pub fn signal(&self) -> Signal {
        Signal {
            phase: self.phase.subscribe(),
        }
    }

    /// What the accept loop hands out guards from; the drain completes only after it is dropped too.
    #[must_use]
    pub fn guards(&self) -> Guards {
        Guards {
            tx: self.guard_tx.clone(),
        }
    }

    /// Runs the drain: `Draining` for up to `grace`, then `Closing` for up to `close_grace`.
    /// Returns whether every connection finished.
    pub async fn run(mut self, grace: Duration, close_grace: Duration) -> bool {
        self.phase.send_replace(Phase::Draining);
        self.guard_tx = None;
        if tokio::time::timeout(grace, self.guard_rx.recv())
            .await
            .is_ok()
        {
            return true;
        }
        self.phase.send_replace(Phase::Closing);
        tokio::time::timeout(close_grace, self.guard_rx.recv())
            .await
            .is_ok()
    }
}

impl Signal {
    /// The phase now.
    #[must_use]
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is at least `at`.
    pub async fn reached(&mut self, at: Phase) {
        // A closed channel means the owner is gone: treat as reached.
        let _ = self.phase.wait_for(|p| *p >= at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_guards_then_closes() {
        let drain = Drain::new();
        let mut signal = drain.signal();
        let guard = drain.guards().guard().expect("running");
        let task = tokio::spawn(async move {
            signal.reached(Phase::Closing).await;
            drop(guard);
        });
        assert!(
            drain
                .run(Duration::from_secs(30), Duration::from_secs(5))
                .await
        );
        task.await.expect("task");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_finishes_early_without_connections() {
        let drain = Drain::new();
        let signal = drain.signal();
        let started = tokio::time::Instant::now();
        assert!(
            drain
                .run(Duration::from_secs(30), Duration::from_secs(5))
                .await
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(signal.phase(), Phase::Draining);
    }
}
