//! The drain signal and the guard every connection holds.
//!
//! Phases run one way: `Running` → `Draining` (readiness 503, the listener stops accepting, sessions carry on) →
//! `Closing` (the drain deadline passed: each session sends Close 1001 at a frame boundary and ends). The
//! [`Drain`] owner waits for every [`ConnectionGuard`] to drop, or for its deadline.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Where the process is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Serving.
    Running,
    /// No new connections; open sessions continue.
    Draining,
    /// Open sessions are told to go away now.
    Closing,
}

/// The owner's side: starts the drain and waits for connections to finish.
#[derive(Debug)]
pub(crate) struct Drain {
    phase: watch::Sender<Phase>,
    window: Arc<OnceLock<(Instant, Duration)>>,
    guard_tx: Option<mpsc::Sender<()>>,
    guard_rx: mpsc::Receiver<()>,
}

/// A task's view of the phase.
#[derive(Debug, Clone)]
pub(crate) struct Signal {
    phase: watch::Receiver<Phase>,
    /// Start and length of the window over which sessions go away, set when the drain starts.
    window: Arc<OnceLock<(Instant, Duration)>>,
}

/// Issues [`ConnectionGuard`]s; held by the accept loop.
#[derive(Debug, Clone)]
pub(crate) struct Guards {
    tx: Option<mpsc::Sender<()>>,
}

impl Guards {
    /// A guard for one connection; `None` once the drain has started.
    #[must_use]
    pub(crate) fn guard(&self) -> Option<ConnectionGuard> {
        self.tx
            .as_ref()
            .map(|tx| ConnectionGuard { _tx: tx.clone() })
    }
}

/// Held by every connection task; the drain completes when all are dropped.
#[must_use = "a connection is counted only while its guard lives"]
#[derive(Debug, Clone)]
pub(crate) struct ConnectionGuard {
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
    pub(crate) fn new() -> Drain {
        let (phase, _) = watch::channel(Phase::Running);
        let (tx, rx) = mpsc::channel(1);
        Drain {
            phase,
            window: Arc::new(OnceLock::new()),
            guard_tx: Some(tx),
            guard_rx: rx,
        }
    }

    /// A receiver of the phase.
    #[must_use]
    pub(crate) fn signal(&self) -> Signal {
        Signal {
            phase: self.phase.subscribe(),
            window: Arc::clone(&self.window),
        }
    }

    /// What the accept loop hands out guards from; the drain completes only after it is dropped too.
    #[must_use]
    pub(crate) fn guards(&self) -> Guards {
        Guards {
            tx: self.guard_tx.clone(),
        }
    }

    /// Runs the drain: `Draining` for up to `grace`, then `Closing` for up to `close_grace`. Sessions that use
    /// [`Signal::go_away`] leave at random moments within the last `spread` of `grace`, so the other replicas see
    /// a ramp of reconnects rather than a wall. Returns whether every connection finished.
    pub(crate) async fn run(
        mut self,
        grace: Duration,
        spread: Duration,
        close_grace: Duration,
    ) -> bool {
        let spread = spread.min(grace);
        let _ = self.window.set((Instant::now() + (grace - spread), spread));
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
    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is at least `at`.
    pub(crate) async fn reached(&mut self, at: Phase) {
        // A closed channel means the owner is gone: treat as reached.
        let _ = self.phase.wait_for(|p| *p >= at).await;
    }

    /// Resolves when this session should go away: at a random moment of the drain's spread window, or at
    /// `Closing`, whichever comes first.
    pub(crate) async fn go_away(&mut self) {
        self.reached(Phase::Draining).await;
        let Some(&(start, spread)) = self.window.get() else {
            return self.reached(Phase::Closing).await;
        };
        // Boxed, and only once draining: an idle session's future does not carry a timer for a drain that may
        // never come.
        let at = Box::pin(tokio::time::sleep_until(start + spread.mul_f64(fraction())));
        tokio::select! {
            () = at => {}
            () = self.reached(Phase::Closing) => {}
        }
    }
}

/// A uniformly random number in [0, 1).
fn fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // Without randomness every session picks the window's start: still within the drain.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
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
                .run(
                    Duration::from_secs(30),
                    Duration::ZERO,
                    Duration::from_secs(5)
                )
                .await
        );
        task.await.expect("task");
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_go_away_spread_over_the_window() {
        let drain = Drain::new();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let mut signal = drain.signal();
            let guard = drain.guards().guard().expect("running");
            tasks.push(tokio::spawn(async move {
                signal.go_away().await;
                drop(guard);
                start.elapsed()
            }));
        }
        assert!(
            drain
                .run(
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                    Duration::from_secs(5)
                )
                .await
        );
        let mut at = Vec::new();
        for t in tasks {
            at.push(t.await.expect("task"));
        }
        at.sort();
        // Nobody leaves before the window (20 s) or after the deadline (30 s), and they do not leave together.
        assert!(at[0] >= Duration::from_secs(20), "{at:?}");
        assert!(at[49] <= Duration::from_secs(30), "{at:?}");
        assert!(at[49] - at[0] >= Duration::from_secs(5), "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_finishes_early_without_connections() {
        let drain = Drain::new();
        let signal = drain.signal();
        let started = tokio::time::Instant::now();
        assert!(
            drain
                .run(
                    Duration::from_secs(30),
                    Duration::from_secs(5),
                    Duration::from_secs(5)
                )
                .await
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(signal.phase(), Phase::Draining);
    }
}
