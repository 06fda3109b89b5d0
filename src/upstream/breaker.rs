//! The circuit breaker of one endpoint, as a plain state machine: every method takes the time it runs at, so the
//! pool decides when and the tests need no clock.
//!
//! ```text
//! Closed{failures} ──CB_FAILURE_THRESHOLD consecutive failures──▶ Open{until}
//!        ▲                                                           │ CB_OPEN_TIMEOUT_SECONDS pass
//!        │ the trial (or a health check) succeeds                    ▼
//!        └────────────────────────────────────────────── HalfOpen{trial} ──the trial fails──▶ Open{until}
//! ```
//! A failed health check opens the breaker at once, from any state; a passing one closes it at once.

use std::time::Duration;

use tokio::time::Instant;

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Consecutive failures that open a closed breaker.
    pub(crate) threshold: u32,
    /// How long an open breaker refuses before it lets one trial through.
    pub(crate) open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The open time is over; `trial` while one dial is deciding.
    HalfOpen {
        trial: bool,
    },
}

/// What a recorded outcome changed, for the metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing worth reporting.
    None,
    /// The breaker has just opened.
    Opened,
    /// The breaker has just closed after being open or half-open.
    Closed,
}

/// A dial the breaker let through: an ordinary one, or the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The breaker is closed.
    Normal,
    /// The one trial of a half-open breaker: its outcome decides.
    Trial,
}

/// One endpoint's breaker.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// Whether [`Breaker::admit`] would let a dial through at `now`.
    #[must_use]
    pub(crate) fn admits(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { trial } => !trial,
        }
    }

    /// Lets a dial through, or not: an open breaker whose time is over becomes half-open and this dial is its trial.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<Admit> {
        match self.state {
            State::Closed { .. } => Some(Admit::Normal),
            State::Open { until } if now < until => None,
            State::HalfOpen { trial: true } => None,
            State::Open { .. } | State::HalfOpen { trial: false } => {
                self.state = State::HalfOpen { trial: true };
                Some(Admit::Trial)
            }
        }
    }

    /// A dial or a health check reached the endpoint: the breaker closes and its count starts again.
    pub(crate) fn success(&mut self) -> Change {
        let was = self.state;
        self.state = State::Closed { failures: 0 };
        match was {
            State::Closed { .. } => Change::None,
            State::Open { .. } | State::HalfOpen { .. } => Change::Closed,
        }
    }

    /// A dial failed at `now`.
    pub(crate) fn failure(&mut self, now: Instant, policy: Policy) -> Change {
        match self.state {
            State::Closed { failures } if failures.saturating_add(1) < policy.threshold => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                Change::None
            }
            State::Closed { .. } | State::HalfOpen { .. } => {
                self.state = State::Open {
                    until: now + policy.open_for,
                };
                Change::Opened
            }
            // A dial let through before others opened the breaker: it is open already.
            State::Open { .. } => Change::None,
        }
    }

    /// A health check failed at `now`: open at once (or stay open for another `open_for`).
    pub(crate) fn trip(&mut self, now: Instant, policy: Policy) -> Change {
        let was_open = matches!(self.state, State::Open { .. });
        self.state = State::Open {
            until: now + policy.open_for,
        };
        if was_open {
            Change::None
        } else {
            Change::Opened
        }
    }

    /// The trial ended without an outcome (the client left, or its own deadline cut the dial short): the next
    /// dial may be the trial.
    pub(crate) fn abandon_trial(&mut self) {
        if self.state == (State::HalfOpen { trial: true }) {
            self.state = State::HalfOpen { trial: false };
        }
    }

    /// Healthy unless open within its open time: a breaker whose time is over takes the next dial as its trial, so
    /// it counts as healthy (readiness would otherwise wait for traffic that cannot come).
    #[must_use]
    pub(crate) fn healthy(&self, now: Instant) -> bool {
        match self.state {
            State::Open { until } => now >= until,
            State::Closed { .. } | State::HalfOpen { .. } => true,
        }
    }

    /// How long until this breaker lets a dial through again (zero when it would now).
    #[must_use]
    pub(crate) fn wait(&self, now: Instant) -> Duration {
        match self.state {
            State::Open { until } => until.saturating_duration_since(now),
            // A trial is deciding; it takes at most a dial timeout, usually milliseconds.
            State::HalfOpen { trial: true } => Duration::from_secs(1),
            State::Closed { .. } | State::HalfOpen { trial: false } => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        threshold: 3,
        open_for: Duration::from_secs(10),
    };

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.failure(t0, POLICY), Change::None);
        assert_eq!(b.failure(t0, POLICY), Change::None);
        assert_eq!(b.success(), Change::None, "closed stays closed");
        assert_eq!(b.failure(t0, POLICY), Change::None);
        assert_eq!(b.failure(t0, POLICY), Change::None);
        assert!(b.admits(t0));
        assert_eq!(b.failure(t0, POLICY), Change::Opened, "the third in a row");
        assert!(!b.admits(t0) && !b.healthy(t0));
        assert_eq!(b.admit(t0 + Duration::from_secs(9)), None);
        assert_eq!(b.wait(t0 + Duration::from_secs(4)), Duration::from_secs(6));
        // A dial let through before it opened fails late: no second opening.
        assert_eq!(b.failure(t0 + Duration::from_secs(1), POLICY), Change::None);
        assert_eq!(b.wait(t0), Duration::from_secs(10));
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.failure(t0, POLICY);
        }
        let later = t0 + Duration::from_secs(10);
        assert!(b.healthy(later), "due a trial: counts as healthy");
        assert_eq!(b.admit(later), Some(Admit::Trial));
        assert_eq!(b.admit(later), None, "one trial at a time");
        assert!(!b.admits(later));
        // The trial fails: open for another period.
        assert_eq!(b.failure(later, POLICY), Change::Opened);
        assert_eq!(b.admit(later + Duration::from_secs(5)), None);
        let again = later + Duration::from_secs(10);
        assert_eq!(b.admit(again), Some(Admit::Trial));
        // An abandoned trial lets the next dial decide.
        b.abandon_trial();
        assert_eq!(b.admit(again), Some(Admit::Trial));
        assert_eq!(b.success(), Change::Closed);
        assert_eq!(b.admit(again), Some(Admit::Normal));
        assert_eq!(b.admit(again), Some(Admit::Normal), "closed: no limit");
    }

    #[test]
    fn health_checks_open_and_close_at_once() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.trip(t0, POLICY), Change::Opened);
        assert!(!b.admits(t0));
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(b.trip(t1, POLICY), Change::None, "still open, re-armed");
        assert_eq!(b.wait(t1), Duration::from_secs(10));
        assert_eq!(
            b.success(),
            Change::Closed,
            "a passing check closes it early"
        );
        assert!(b.admits(t1));
    }
}
