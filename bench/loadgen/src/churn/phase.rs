//! One phase of a churn run (the warm-up, or one round): held slots, each running sessions one after another from
//! the token to the end its kind prescribes, and a sampler of the held count and the gateway's resources.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use ws_gateway::frame;

use super::client::Seen;
use crate::probe::Gateway;
use crate::token::{unix_now, Signer};
use crate::upstream::RESET_COMMAND;
use crate::{failure, Dialer, Errors, Failure, Session};

/// How a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The client sends Close 1000 and waits for the server to close.
    Clean,
    /// The client sets SO_LINGER 0 and drops its socket (RST).
    ClientReset,
    /// The token expires while the session is open; the gateway sends Close 1008.
    Expiry,
    /// The upstream resets its connection to the gateway; the gateway ends the client's side.
    UpstreamReset,
    /// One session drained by the admin API: `POST /admin/revoke {"jti"}`, then Close 1008.
    Revoke,
    /// The client goes quiet; the gateway's idle timeout sends Close 1001.
    Idle,
}

pub(super) const KINDS: [Kind; 6] = [
    Kind::Clean,
    Kind::ClientReset,
    Kind::Expiry,
    Kind::UpstreamReset,
    Kind::Revoke,
    Kind::Idle,
];

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Clean => "clean",
            Kind::ClientReset => "client_reset",
            Kind::Expiry => "expiry",
            Kind::UpstreamReset => "upstream_reset",
            Kind::Revoke => "revoke",
            Kind::Idle => "idle",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Clean => 0,
            Kind::ClientReset => 1,
            Kind::Expiry => 2,
            Kind::UpstreamReset => 3,
            Kind::Revoke => 4,
            Kind::Idle => 5,
        }
    }
}

/// `clean=40,client_reset=20,...` -> the order in which session numbers take kinds: a smooth weighted round robin,
/// so every window of `sum(weights)` sessions has the exact proportions and the kinds are interleaved.
pub(super) fn pattern(mix: &str) -> Result<Vec<Kind>, String> {
    let mut weights = [0u64; KINDS.len()];
    for part in mix.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("--mix: `{part}` is not NAME=WEIGHT"))?;
        let kind = KINDS
            .iter()
            .find(|k| k.label() == name.trim())
            .ok_or_else(|| {
                format!(
                    "--mix: unknown kind `{name}` (clean, client_reset, expiry, upstream_reset, revoke, idle)"
                )
            })?;
        let w: u64 = w
            .trim()
            .parse()
            .map_err(|_| format!("--mix: weight of `{name}` is not a whole number"))?;
        if w > 1000 {
            return Err(format!("--mix: weight of `{name}` is above 1000"));
        }
        weights[kind.index()] = w;
    }
    let sum: u64 = weights.iter().sum();
    if sum == 0 {
        return Err("--mix: every weight is 0".into());
    }
    let mut current = [0i64; KINDS.len()];
    let mut out = Vec::new();
    for _ in 0..sum {
        for (c, w) in current.iter_mut().zip(weights) {
            // Invariant: weights are at most 1000 each, far inside i64.
            *c += w as i64;
        }
        let best = (0..KINDS.len())
            .max_by_key(|i| (current[*i], std::cmp::Reverse(*i)))
            .unwrap_or(0);
        current[best] -= sum as i64;
        out.push(KINDS[best]);
    }
    Ok(out)
}

/// A number in 0..1 from `n`, the same every run (splitmix64).
fn unit(n: u64) -> f64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-kind counts.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct KindTally {
    /// Sessions that took this kind.
    started: u64,
    /// Reached 101 and the first echo.
    pub(super) opened: u64,
    /// Ended the intended way.
    pub(super) ended: u64,
    /// Failed at any step.
    errors: u64,
}

/// What one slot (or a whole phase, or the run) counted.
#[derive(Default)]
pub(super) struct Tally {
    kinds: [KindTally; KINDS.len()],
    pub(super) errors: Errors,
    /// `kind:what the client saw at the end` -> count (e.g. `expiry:close_1008`, `upstream_reset:eof_unclean`).
    pub(super) seen: BTreeMap<String, u64>,
}

impl Tally {
    pub(super) fn merge(&mut self, other: Tally) {
        for (a, b) in self.kinds.iter_mut().zip(other.kinds) {
            a.started += b.started;
            a.opened += b.opened;
            a.ended += b.ended;
            a.errors += b.errors;
        }
        self.errors.merge(other.errors);
        for (k, v) in other.seen {
            *self.seen.entry(k).or_default() += v;
        }
    }

    pub(super) fn sum(&self, f: impl Fn(&KindTally) -> u64) -> u64 {
        self.kinds.iter().map(f).sum()
    }

    pub(super) fn started(&self) -> u64 {
        self.sum(|k| k.started)
    }

    pub(super) fn by_kind(&self) -> Value {
        let mut m = serde_json::Map::new();
        for k in KINDS {
            let t = self.kinds[k.index()];
            if t.started > 0 {
                m.insert(
                    k.label().into(),
                    json!({"started": t.started, "opened": t.opened, "ended": t.ended, "errors": t.errors}),
                );
            }
        }
        Value::Object(m)
    }
}

/// Counts a session as held while alive.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(n: &'a AtomicUsize) -> Held<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Held(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Admin calls in flight at once: the admin listener closes the oldest of more than 8 waiting connections from one
/// address.
pub(super) const REVOKE_CONCURRENCY: usize = 4;
/// Lifetime of a `revoke` session's token past its longest hold: the revocation lasts until the token would expire,
/// so the gateway can forget it soon after the run (it purges expired revocations once a minute).
const REVOKE_TOKEN_MARGIN: u64 = 10;

/// How the sessions of a phase behave.
pub(super) struct Settings {
    /// Kinds by session number (cycled).
    pub(super) pattern: Vec<Kind>,
    /// Shortest and longest hold before the client (or the upstream, or the admin API) ends a session, seconds.
    pub(super) hold: (f64, f64),
    /// Token lifetime of `expiry` sessions, seconds.
    pub(super) expiry: u64,
    /// The gateway's idle timeout.
    pub(super) idle: Duration,
    /// 0: one token per session; N: N shared long-lived tokens.
    pub(super) distinct_tokens: u64,
    /// `exp` of the long-lived tokens.
    pub(super) token_exp: i64,
    /// Part of every `jti`, so runs against one gateway never share one.
    pub(super) run_id: u64,
    /// The admin secret (`revoke` only).
    pub(super) admin_secret: Option<String>,
    pub(super) max_errors: u64,
}

/// One phase: what every slot shares.
pub(super) struct Phase {
    pub(super) dialer: Arc<Dialer>,
    signer: Arc<Signer>,
    gw: Arc<Gateway>,
    settings: Arc<Settings>,
    opening: Semaphore,
    revoking: Semaphore,
    /// Next session number, and the end of this phase's range (numbers are unique over the run).
    next: AtomicU64,
    end: u64,
    deadline: Instant,
    /// Sessions open now (past the first echo, not yet ended).
    held: AtomicUsize,
    /// Sessions finished (ended or failed), and failed.
    finished: AtomicU64,
    failed: AtomicU64,
}

/// A session's token and what the end of the session needs to know about it.
struct Minted {
    token: String,
    jti: String,
    exp: i64,
}

impl Phase {
    /// A phase over session numbers `range`, sessions opened `open_concurrency` at a time, none started after
    /// `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        dialer: &Arc<Dialer>,
        signer: &Arc<Signer>,
        gw: &Arc<Gateway>,
        settings: &Arc<Settings>,
        open_concurrency: usize,
        range: std::ops::Range<u64>,
        deadline: Instant,
    ) -> Phase {
        Phase {
            dialer: Arc::clone(dialer),
            signer: Arc::clone(signer),
            gw: Arc::clone(gw),
            settings: Arc::clone(settings),
            opening: Semaphore::new(open_concurrency),
            revoking: Semaphore::new(REVOKE_CONCURRENCY),
            next: AtomicU64::new(range.start),
            end: range.end,
            deadline,
            held: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// The token of session `n`.
    fn token(&self, n: u64, kind: Kind) -> Result<Minted, Failure> {
        let s = &self.settings;
        let now = unix_now();
        let (id, exp) = match kind {
            // Invariant: both are at most a few minutes, far inside i64.
            Kind::Expiry => (n, now + s.expiry as i64),
            Kind::Revoke => (n, now + s.hold.1.ceil() as i64 + REVOKE_TOKEN_MARGIN as i64),
            _ if s.distinct_tokens > 0 => (n % s.distinct_tokens, s.token_exp),
            _ => (n, s.token_exp),
        };
        let sub = format!("churn-user-{id}");
        let jti = format!("churn-{}-{id}-{}", s.run_id, kind.label());
        let token = self
            .signer
            .token(&sub, &jti, exp)
            .map_err(|e| failure("sign", e))?;
        Ok(Minted { token, jti, exp })
    }

    /// One session, from the token to its end; whether it ended the intended way.
    async fn session(&self, n: u64, kind: Kind, tally: &mut Tally) -> bool {
        let k = kind.index();
        tally.kinds[k].started += 1;
        let opened = async {
            let _permit = self
                .opening
                .acquire()
                .await
                .map_err(|e| failure("semaphore", e))?;
            // Minted once the turn to open has come: a slot can wait seconds for it, and an `expiry` token must
            // still have its whole lifetime when the session starts.
            let minted = self.token(n, kind)?;
            let mut s = self.dialer.open_with(Some(&minted.token)).await?;
            s.ping(b"churn:hello").await?;
            Ok::<_, Failure>((s, minted))
        }
        .await;
        let (s, minted) = match opened {
            Ok(o) => o,
            Err(f) => {
                tally.kinds[k].errors += 1;
                tally.errors.add(Failure {
                    kind: format!("open:{}", f.kind),
                    detail: f.detail,
                });
                return false;
            }
        };
        tally.kinds[k].opened += 1;
        let held = Held::new(&self.held);
        let ended = self.end(n, kind, s, &minted).await;
        drop(held);
        match ended {
            Ok(seen) => {
                tally.kinds[k].ended += 1;
                *tally
                    .seen
                    .entry(format!("{}:{seen}", kind.label()))
                    .or_default() += 1;
                true
            }
            Err(f) => {
                tally.kinds[k].errors += 1;
                tally.errors.add(Failure {
                    kind: format!("{}:{}", kind.label(), f.kind),
                    detail: f.detail,
                });
                false
            }
        }
    }

    /// Holds session `n` and ends it the `kind` way; returns what the client saw at the end.
    async fn end(
        &self,
        n: u64,
        kind: Kind,
        mut s: Session,
        minted: &Minted,
    ) -> Result<String, Failure> {
        let (lo, hi) = self.settings.hold;
        let hold = Duration::from_secs_f64(lo + (hi - lo) * unit(n));
        let step = s.step;
        match kind {
            Kind::Clean => {
                tokio::time::sleep(hold).await;
                s.ping(b"churn:still-there").await?;
                if s.close().await {
                    Ok("server_closed".into())
                } else {
                    Err(failure("close_timeout", "the server did not close in time"))
                }
            }
            Kind::ClientReset => {
                tokio::time::sleep(hold).await;
                s.ping(b"churn:still-there").await?;
                s.reset()?;
                Ok("rst_sent".into())
            }
            Kind::UpstreamReset => {
                tokio::time::sleep(hold).await;
                s.send_binary(RESET_COMMAND).await?;
                expect_end(s, step, None).await
            }
            Kind::Revoke => {
                tokio::time::sleep(hold).await;
                let secret =
                    self.settings.admin_secret.as_deref().ok_or_else(|| {
                        failure("no_admin_secret", "revoke needs --admin-token-file")
                    })?;
                let status = {
                    let _permit = self
                        .revoking
                        .acquire()
                        .await
                        .map_err(|e| failure("semaphore", e))?;
                    self.gw
                        .revoke_jti(secret, &minted.jti, minted.exp)
                        .await
                        .map_err(|e| failure("revoke_call", e))?
                };
                if !(200..300).contains(&status) {
                    return Err(failure(
                        format!("revoke_status_{status}"),
                        format!("POST /admin/revoke answered {status}"),
                    ));
                }
                expect_end(s, step, Some(frame::CLOSE_POLICY)).await
            }
            Kind::Expiry => {
                let wait = Duration::from_secs(self.settings.expiry + 1) + step;
                expect_end(s, wait, Some(frame::CLOSE_POLICY)).await
            }
            Kind::Idle => {
                let wait = self.settings.idle + step;
                expect_end(s, wait, Some(frame::CLOSE_GOING_AWAY)).await
            }
        }
    }

    /// A held slot: sessions one after another until the phase ends.
    async fn slot(self: Arc<Self>) -> Tally {
        let mut tally = Tally::default();
        let pattern = &self.settings.pattern;
        while Instant::now() < self.deadline
            && self.failed.load(Ordering::Relaxed) < self.settings.max_errors
        {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n >= self.end {
                break;
            }
            // Invariant: `pattern` is never empty (`pattern()` refuses an all-zero mix).
            let kind = pattern[(n % pattern.len() as u64) as usize];
            let ok = self.session(n, kind, &mut tally).await;
            self.finished.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.failed.fetch_add(1, Ordering::Relaxed);
                // Do not spin on a refused or broken target.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tally
    }

    /// The longest one session can take, past the phase deadline.
    fn longest_session(&self) -> Duration {
        let s = &self.settings;
        let wait = Duration::from_secs_f64(s.hold.1)
            .max(Duration::from_secs(s.expiry + 1))
            .max(s.idle);
        // Connect, TLS, upgrade, echo, an admin call, then the wait, the last step and the Close answer.
        self.dialer.step * 7 + wait
    }
}

/// Waits for the server to end the session; a Close is answered. A timeout is a failure, and so is a Close with
/// another code than `want` (when one is wanted).
async fn expect_end(mut s: Session, wait: Duration, want: Option<u16>) -> Result<String, Failure> {
    let seen = s.await_end(wait).await;
    let label = seen.label();
    match seen {
        Seen::Timeout => Err(failure(
            "no_end",
            format!("the server did not end the session within {wait:?}"),
        )),
        Seen::Close(code) => {
            s.answer_close(code).await;
            match want {
                Some(w) if w != code => Err(failure(label, format!("Close {code} instead of {w}"))),
                _ => Ok(label),
            }
        }
        _ => Ok(label),
    }
}

/// Figures read while a phase runs.
#[derive(Debug, Default)]
pub(super) struct Samples {
    pub(super) held_peak: usize,
    held_sum: f64,
    held_n: u64,
    pub(super) fds_peak: u64,
    pub(super) rss_peak_kib: u64,
}

impl Samples {
    pub(super) fn merge(&mut self, o: &Samples) {
        self.held_peak = self.held_peak.max(o.held_peak);
        self.held_sum += o.held_sum;
        self.held_n += o.held_n;
        self.fds_peak = self.fds_peak.max(o.fds_peak);
        self.rss_peak_kib = self.rss_peak_kib.max(o.rss_peak_kib);
    }

    /// Mean of the held count over the samples.
    pub(super) fn held_avg(&self) -> f64 {
        self.held_sum / self.held_n.max(1) as f64
    }
}

/// What a phase produced.
pub(super) struct Ran {
    pub(super) tally: Tally,
    pub(super) samples: Samples,
    /// Slots still running at the hard stop (deadline plus the longest session), aborted.
    pub(super) aborted: u64,
}

/// Runs `slots` slots of `phase` to the end, sampling the held count and the gateway's resources.
pub(super) async fn run(phase: &Arc<Phase>, slots: usize, label: &str) -> Ran {
    let started = Instant::now();
    let hard_stop = phase.deadline + phase.longest_session();
    let mut tasks = Vec::with_capacity(slots);
    for _ in 0..slots {
        tasks.push(tokio::spawn(Arc::clone(phase).slot()));
    }
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let phase = Arc::clone(phase);
        let done = Arc::clone(&done);
        let label = label.to_owned();
        tokio::spawn(async move {
            let mut s = Samples::default();
            let mut tick = 0u64;
            while !done.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                tick += 1;
                let held = phase.held.load(Ordering::Relaxed);
                s.held_peak = s.held_peak.max(held);
                s.held_sum += held as f64;
                s.held_n += 1;
                if !tick.is_multiple_of(4) {
                    continue;
                }
                let Ok(r) = phase.gw.resources() else {
                    continue;
                };
                s.fds_peak = s.fds_peak.max(r.fds);
                s.rss_peak_kib = s.rss_peak_kib.max(r.rss_kib);
                if tick.is_multiple_of(40) {
                    eprintln!(
                        "ws-loadgen: {label} {:.0} s: {} finished ({} failed), {held} held; gateway {} fds, {} KiB RSS",
                        started.elapsed().as_secs_f64(),
                        phase.finished.load(Ordering::Relaxed),
                        phase.failed.load(Ordering::Relaxed),
                        r.fds,
                        r.rss_kib
                    );
                }
            }
            s
        })
    };
    // Slots end by themselves at the deadline; past it plus the longest session, what is left is aborted.
    let mut tally = Tally::default();
    let mut aborted = 0u64;
    for t in tasks {
        let left = hard_stop.saturating_duration_since(Instant::now());
        let abort = t.abort_handle();
        match tokio::time::timeout(left, t).await {
            Ok(Ok(t)) => tally.merge(t),
            Ok(Err(e)) => tally.errors.add(failure("task", e)),
            Err(_) => {
                abort.abort();
                aborted += 1;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    Ran {
        tally,
        samples,
        aborted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_interleaves_in_exact_proportions() {
        let p = pattern("clean=2,client_reset=1,idle=1").expect("valid");
        assert_eq!(p.len(), 4);
        assert_eq!(p.iter().filter(|k| **k == Kind::Clean).count(), 2);
        assert_eq!(p.iter().filter(|k| **k == Kind::Idle).count(), 1);
        // Smooth: the two `clean` are not adjacent.
        assert_ne!(p[0], p[1]);
        let default = pattern(super::super::DEFAULT_MIX).expect("valid");
        assert_eq!(default.len(), 100);
        assert_eq!(default.iter().filter(|k| **k == Kind::Expiry).count(), 15);
        assert_eq!(default.iter().filter(|k| **k == Kind::Revoke).count(), 10);
    }

    #[test]
    fn bad_mixes_are_refused() {
        assert!(pattern("clean=0").is_err());
        assert!(pattern("drain=1").is_err());
        assert!(pattern("clean").is_err());
        assert!(pattern("clean=x").is_err());
        assert!(pattern("clean=1001").is_err());
    }

    #[test]
    fn hold_draws_stay_in_range() {
        for n in 0..10_000 {
            let u = unit(n);
            assert!((0.0..1.0).contains(&u));
        }
        let mean: f64 = (0..10_000).map(unit).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
