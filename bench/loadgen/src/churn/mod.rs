//! `churn`: the soak test. It keeps `--held` authenticated TLS sessions open through the gateway and replaces each
//! one as it ends, until `--total` sessions have been opened and ended (or `--duration-max` has passed). Sessions end
//! in fixed proportions (`--mix`), interleaved:
//!
//! - `clean`: the client sends Close 1000 and waits for the server to close;
//! - `client_reset`: the client sets SO_LINGER 0 and drops its socket (RST);
//! - `expiry`: the token expires `--expiry-seconds` after it is minted; the client waits for the gateway's Close 1008;
//! - `upstream_reset`: the client asks the upstream ([`crate::upstream`]) to reset its connection to the gateway and
//!   waits for the gateway to end the client side;
//! - `revoke`: one session drained from outside: `POST /admin/revoke {"jti"}` on the admin listener, then the
//!   gateway's Close 1008;
//! - `idle`: the client sends nothing and waits for the gateway's idle-timeout Close 1001.
//!
//! Before the run, `--warmup` sessions of the same mix (without the hold) are opened and ended, the gateway's
//! `ws_active_sessions` is awaited at 0, and its open file count and RSS are read as the baseline. After the run the
//! same wait, then both are read again (up to `--settle-max` seconds for them to come back). The RESULT carries both
//! readings and `"pass"`: the open file count back at or below the baseline and the RSS within
//! `--rss-tolerance-pct` of it. `"pass": false` exits 1.
//!
//! Every session step is under `--step-timeout` or an explicit deadline, each slot stops at `--total` or
//! `--duration-max`, and slots still running past the deadline plus the longest session are aborted.

mod client;
mod phase;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::probe::{self, Gateway, Resources};
use crate::token::{unix_now, Signer};
use crate::upstream;
use crate::{check_sessions, open_files_limit, round3, secs, CpuMeter, Dialer, Target};
use phase::{Kind, Phase, Settings, Tally};

/// The default `--mix`: weights out of 100.
pub(crate) const DEFAULT_MIX: &str =
    "clean=35,client_reset=15,expiry=15,upstream_reset=15,revoke=10,idle=10";

/// Flags of `churn`.
#[derive(Args, Debug)]
pub(crate) struct ChurnArgs {
    #[command(flatten)]
    target: Target,
    /// The gateway's admin listener (`/metrics`: `ws_active_sessions`, `ws_session_closes_total`; `/admin/revoke`).
    #[arg(long)]
    admin: SocketAddr,
    /// File with the gateway's admin secret (its ADMIN_TOKEN_FILE), for the `revoke` kind.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Signing key, PKCS#8 PEM or DER, P-256 for ES256 (`ws-loadgen pki --jwt es256` writes `jwt.key` and its JWKS).
    #[arg(long)]
    signing_key: PathBuf,
    /// `kid` of the signing key in the gateway's JWKS.
    #[arg(long, default_value = "churn")]
    kid: String,
    /// `iss` claim (the gateway's --jwt-expected-issuer).
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim (one of the gateway's --jwt-expected-audience).
    #[arg(long)]
    audience: Option<String>,
    /// Run the resettable echo upstream here, on this loopback address (the gateway's --upstream-ws-url). Without
    /// it, `upstream_reset` needs an upstream that knows the reset command, so leave it out of `--mix`.
    #[arg(long)]
    upstream_listen: Option<SocketAddr>,
    /// Sessions to open and end (per round).
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    /// Sessions held open at a time (each ended session is replaced).
    #[arg(long, default_value_t = 5000)]
    held: usize,
    /// Stop starting sessions after this many seconds, whatever `--total` says.
    #[arg(long, default_value_t = 600.0)]
    duration_max: f64,
    /// Sessions in TLS + upgrade at once (the rest of the held slots wait their turn).
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Shortest time a session stays open before it is ended (all kinds but `expiry` and `idle`), seconds.
    #[arg(long, default_value_t = 3.0)]
    hold_min: f64,
    /// Longest such time (each session draws its own in between).
    #[arg(long, default_value_t = 7.0)]
    hold_max: f64,
    /// Lifetime of the token of an `expiry` session, seconds (the gateway must run with --jwt-leeway-seconds 0).
    #[arg(long, default_value_t = 5)]
    expiry_seconds: u64,
    /// The gateway's --ws-idle-timeout-seconds (0: unknown, and the `idle` kind is refused).
    #[arg(long, default_value_t = 10)]
    idle_timeout: u64,
    /// How sessions end, as weights of: clean, client_reset, expiry, upstream_reset, revoke, idle.
    #[arg(long, default_value = DEFAULT_MIX)]
    mix: String,
    /// Tokens of the sessions that neither expire nor are revoked: 0 mints one per session (a distinct `sub` and
    /// `jti` each), N > 0 rotates N long-lived tokens (the gateway's verified-token cache then stays small).
    #[arg(long, default_value_t = 0)]
    distinct_tokens: u64,
    /// Sessions of the same mix, without the hold, opened and ended before the baseline.
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Seconds allowed, after the last session, for the gateway's sessions to reach 0 and its resources to return.
    #[arg(long, default_value_t = 30.0)]
    settle_max: f64,
    /// RSS after the run may exceed the baseline by this much, percent.
    #[arg(long, default_value_t = 5.0)]
    rss_tolerance_pct: f64,
    /// Churn this many times over (`--total` each) against the same baseline, with a reading after each round: a
    /// leak grows round after round, memory the allocator keeps after the first peak does not.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Stop starting sessions after this many failed ones.
    #[arg(long, default_value_t = 1000)]
    max_errors: u64,
}

/// Waits until the gateway has no session (and the local upstream no connection), up to `until`.
async fn quiesce(
    gw: &Gateway,
    up: Option<&upstream::Stats>,
    until: Instant,
) -> (bool, Option<u64>) {
    let mut active = None;
    loop {
        active = gw.active_sessions().await.ok().or(active);
        let up_live = up.map_or(0, upstream::Stats::live);
        if active == Some(0) && up_live == 0 {
            return (true, active);
        }
        if Instant::now() >= until {
            return (false, active);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The counters of `ws_session_closes_total` by reason, and of `ws_proxy_errors_total` by kind.
async fn close_counters(gw: &Gateway) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    match gw.metrics().await {
        Ok(text) => (
            probe::by_label(&text, "ws_session_closes_total", "reason"),
            probe::by_label(&text, "ws_proxy_errors_total", "kind"),
        ),
        Err(_) => Default::default(),
    }
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d != 0.0 {
            m.insert(k.clone(), json!(d as i64));
        }
    }
    Value::Object(m)
}

/// Slots of the warm-up at most: enough to run every end kind (expiries and idle timeouts take seconds) in a short
/// time, few enough that the baseline is not read after a peak like the churn's own.
const WARMUP_SLOTS: usize = 256;

/// `churn`: see the module docs.
pub(crate) async fn churn(a: ChurnArgs) -> Result<Option<Value>, String> {
    check_sessions(a.held, "--held")?;
    if a.total == 0 || a.total > 10_000_000 {
        return Err("--total must be between 1 and 10,000,000".into());
    }
    if !(1..=100).contains(&a.rounds) {
        return Err("--rounds must be between 1 and 100".into());
    }
    if a.target.token.is_some() {
        return Err("churn mints a token per session from --signing-key; drop --token".into());
    }
    let &[pid] = a.target.pid.as_slice() else {
        return Err("churn: --pid must name the one gateway process".into());
    };
    let duration_max = secs(a.duration_max, "--duration-max")?;
    let settle_max = secs(a.settle_max, "--settle-max")?;
    if !(0.0..=60.0).contains(&a.hold_min) || !(a.hold_min..=60.0).contains(&a.hold_max) {
        return Err("--hold-min and --hold-max: 0 <= min <= max <= 60 seconds".into());
    }
    if !(1..=300).contains(&a.expiry_seconds) {
        return Err("--expiry-seconds must be between 1 and 300".into());
    }
    if a.idle_timeout > 600 {
        return Err("--idle-timeout must be at most 600 seconds".into());
    }
    if !(0.0..=1000.0).contains(&a.rss_tolerance_pct) {
        return Err("--rss-tolerance-pct must be between 0 and 1000".into());
    }
    let open_concurrency = a.open_concurrency.clamp(1, 1024);
    let pattern = phase::pattern(&a.mix)?;
    let uses = |k: Kind| pattern.contains(&k);
    if uses(Kind::Idle) && a.idle_timeout == 0 {
        return Err("--mix has `idle` but --idle-timeout is 0".into());
    }
    if a.idle_timeout > 0 {
        // Held sessions are silent: the gateway's idle timeout must not end them before their own end comes.
        let longest_quiet = a.hold_max.max(a.expiry_seconds as f64 + 1.0);
        if longest_quiet + 1.0 >= a.idle_timeout as f64 {
            return Err(format!(
                "--idle-timeout {} must exceed --hold-max and --expiry-seconds + 1 by more than a second",
                a.idle_timeout
            ));
        }
    }
    if uses(Kind::UpstreamReset) && a.upstream_listen.is_none() {
        return Err(
            "--mix has `upstream_reset`: run the upstream here with --upstream-listen".into(),
        );
    }
    let admin_secret = match &a.admin_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("reading {}: {e}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None if uses(Kind::Revoke) => {
            return Err(
                "--mix has `revoke`: pass the gateway's admin secret with --admin-token-file"
                    .into(),
            )
        }
        None => None,
    };
    // This process holds the client socket of every session, and the upstream's when it runs here.
    let per_session = if a.upstream_listen.is_some() { 2 } else { 1 };
    let need = (a.held + open_concurrency) * per_session + 64;
    if let Some(limit) = open_files_limit() {
        if need > limit {
            return Err(format!(
                "--held {} needs about {need} open files here, above the limit of {limit}",
                a.held
            ));
        }
    }
    if let Some(limit) = files_limit_of(pid) {
        if (a.held + open_concurrency) * 2 + 64 > limit {
            return Err(format!(
                "--held {}: the gateway may open {limit} files and holds two per session",
                a.held
            ));
        }
    }

    let dialer = Arc::new(Dialer::new(&a.target)?);
    let signer = Arc::new(Signer::load(
        &a.signing_key,
        &a.kid,
        a.issuer.clone(),
        a.audience.clone(),
    )?);
    let gw = Arc::new(Gateway {
        pid,
        admin: a.admin,
    });
    gw.resources()?;
    gw.active_sessions().await?;
    let settings = Arc::new(Settings {
        pattern,
        hold: (a.hold_min, a.hold_max),
        expiry: a.expiry_seconds,
        idle: Duration::from_secs(a.idle_timeout),
        distinct_tokens: a.distinct_tokens,
        // Invariant: duration_max is at most 3600 s (`secs`).
        token_exp: unix_now() + 3600 + duration_max.as_secs() as i64,
        run_id: unix_now().unsigned_abs(),
        admin_secret,
        max_errors: a.max_errors,
    });

    let up_stats = Arc::new(upstream::Stats::default());
    let up_task = match a.upstream_listen {
        Some(addr) => {
            let listener = upstream::bind(addr).await?;
            eprintln!("ws-loadgen: churn upstream on ws://{addr}/");
            Some(tokio::spawn(upstream::serve(
                listener,
                Arc::clone(&up_stats),
            )))
        }
        None => None,
    };
    let run = Run {
        a: &a,
        gw: &gw,
        dialer: &dialer,
        signer: &signer,
        settings: &settings,
        open_concurrency,
        up: up_task.as_ref().map(|_| &*up_stats),
        duration_max,
        settle_max,
    };
    let outcome = run.run().await;
    if let Some(t) = up_task {
        t.abort();
    }
    outcome
}

/// The soft `Max open files` of process `pid`.
fn files_limit_of(pid: u32) -> Option<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Everything one run needs, checked.
struct Run<'a> {
    a: &'a ChurnArgs,
    gw: &'a Arc<Gateway>,
    dialer: &'a Arc<Dialer>,
    signer: &'a Arc<Signer>,
    settings: &'a Arc<Settings>,
    open_concurrency: usize,
    /// The local upstream's counters, when it runs here.
    up: Option<&'a upstream::Stats>,
    duration_max: Duration,
    settle_max: Duration,
}

impl Run<'_> {
    fn phase(
        &self,
        range: std::ops::Range<u64>,
        settings: &Arc<Settings>,
        deadline: Instant,
    ) -> Arc<Phase> {
        Arc::new(Phase::new(
            self.dialer,
            self.signer,
            self.gw,
            settings,
            self.open_concurrency,
            range,
            deadline,
        ))
    }

    /// Warm-up, baseline, the rounds, the settle, the RESULT.
    async fn run(&self) -> Result<Option<Value>, String> {
        let (a, gw, up) = (self.a, &**self.gw, self.up);
        let settle_max = self.settle_max;

        // Warm-up: the same mix without the hold, so every end path (and the code it pages in) has run before the
        // baseline; numbered above the churn's sessions so every token is distinct.
        let churn_end = a.total * a.rounds;
        let mut warmup = Value::Null;
        if a.warmup > 0 {
            let settings = Arc::new(Settings {
                hold: (0.0, 0.0),
                pattern: self.settings.pattern.clone(),
                admin_secret: self.settings.admin_secret.clone(),
                ..**self.settings
            });
            let w = self.phase(
                churn_end..churn_end + a.warmup,
                &settings,
                Instant::now() + Duration::from_secs(120),
            );
            let slots = WARMUP_SLOTS.min(a.held).min(a.warmup as usize);
            eprintln!(
                "ws-loadgen: warm-up: {} sessions, {slots} at a time",
                a.warmup
            );
            let ran = phase::run(&w, slots, "warm-up").await;
            ran.tally.errors.report();
            warmup = json!({
                "sessions": a.warmup, "ended": ran.tally.sum(|k| k.ended), "errors": ran.tally.errors.total(),
                "error_kinds": ran.tally.errors.kinds, "aborted": ran.aborted,
            });
        }
        let (quiet, active) = quiesce(gw, up, Instant::now() + settle_max).await;
        if !quiet {
            return Err(format!(
                "after the warm-up the gateway still has {active:?} sessions (local upstream: {} connections) after \
                 {settle_max:?}",
                up.map_or(0, upstream::Stats::live)
            ));
        }
        // Let the last sockets and buffers go before the reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base = gw.resources()?;
        let (closes_before, errors_before) = close_counters(gw).await;
        eprintln!(
            "ws-loadgen: baseline: gateway {} fds, {} KiB RSS ({} anon, {} file); churn: {} x {} sessions, {} held, \
             mix {}",
            base.fds, base.rss_kib, base.anon_kib, base.file_kib, a.rounds, a.total, a.held, a.mix
        );

        let cpu = CpuMeter::start(&[gw.pid]);
        let started = Instant::now();
        let deadline = started + self.duration_max;
        let mut tally = Tally::default();
        let mut samples = phase::Samples::default();
        let mut aborted = 0;
        let mut rounds = Vec::new();
        for round in 0..a.rounds {
            let round_start = Instant::now();
            let p = self.phase(
                round * a.total..(round + 1) * a.total,
                self.settings,
                deadline,
            );
            let ran = phase::run(&p, a.held, &format!("churn round {}", round + 1)).await;
            let ended = ran.tally.sum(|k| k.ended);
            tally.merge(ran.tally);
            samples.merge(&ran.samples);
            aborted += ran.aborted;
            if a.rounds > 1 {
                // Between rounds: sessions to 0 and one second, then a reading, so growth per round shows.
                let (quiet, _) = quiesce(gw, up, Instant::now() + settle_max).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let r = gw.resources()?;
                eprintln!(
                    "ws-loadgen: after round {}: gateway {} fds, {} KiB RSS ({} anon, {} file)",
                    round + 1,
                    r.fds,
                    r.rss_kib,
                    r.anon_kib,
                    r.file_kib
                );
                rounds.push(json!({
                    "round": round + 1, "closed": ended,
                    "duration_s": round3(round_start.elapsed().as_secs_f64()), "sessions_zero": quiet,
                    "fd_after": r.fds, "rss_after_kib": r.rss_kib, "rss_anon_after_kib": r.anon_kib,
                    "rss_file_after_kib": r.file_kib, "held_peak": ran.samples.held_peak,
                    "rss_peak_kib": ran.samples.rss_peak_kib,
                }));
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let duration = started.elapsed().as_secs_f64();
        let (proxy_cpu, client_cpu) = cpu.stop();
        tally.errors.report();

        // Settle: sessions to 0, then resources back, all within settle_max of the last session.
        let settle_start = Instant::now();
        let until = settle_start + settle_max;
        let (quiet, active_after) = quiesce(gw, up, until).await;
        let sessions_s = settle_start.elapsed().as_secs_f64();
        let tolerance = a.rss_tolerance_pct / 100.0;
        let within = |r: &Resources| {
            r.fds <= base.fds && (r.rss_kib as f64) <= base.rss_kib as f64 * (1.0 + tolerance)
        };
        let mut after = gw.resources()?;
        while !within(&after) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            after = gw.resources()?;
        }
        let settle_s = settle_start.elapsed().as_secs_f64();
        let (closes_after, errors_after) = close_counters(gw).await;

        let opened = tally.sum(|k| k.opened);
        let ended = tally.sum(|k| k.ended);
        let seen = |key: &str| tally.seen.get(key).copied().unwrap_or(0);
        let rss_delta_pct =
            (after.rss_kib as f64 - base.rss_kib as f64) / base.rss_kib.max(1) as f64 * 100.0;
        let fds_ok = after.fds <= base.fds;
        let rss_ok = rss_delta_pct <= a.rss_tolerance_pct;
        let pass = fds_ok && rss_ok && quiet && opened > 0;
        Ok(Some(json!({
            "mode": "churn",
            "url": self.dialer.url.to_string(),
            "total": a.total,
            "rounds": a.rounds,
            "held": a.held,
            "mix": a.mix,
            "hold_s": [a.hold_min, a.hold_max],
            "expiry_s": a.expiry_seconds,
            "idle_timeout_s": a.idle_timeout,
            "distinct_tokens": a.distinct_tokens,
            "opened": opened,
            "closed": ended,
            "errors": tally.errors.total(),
            "error_kinds": tally.errors.kinds,
            "aborted": aborted,
            "stopped_by_deadline": tally.started() < a.total * a.rounds,
            "by_kind": tally.by_kind(),
            "seen_at_end": tally.seen,
            "expiry_close_1008": seen("expiry:close_1008"),
            "revoke_close_1008": seen("revoke:close_1008"),
            "idle_close_1001": seen("idle:close_1001"),
            "held_peak": samples.held_peak,
            "held_avg": round3(samples.held_avg()),
            "duration_s": round3(duration),
            "sessions_per_s": round3(ended as f64 / duration.max(1e-9)),
            "fd_baseline": base.fds,
            "fd_after": after.fds,
            "fd_peak": samples.fds_peak,
            "rss_baseline_kib": base.rss_kib,
            "rss_after_kib": after.rss_kib,
            "rss_peak_kib": samples.rss_peak_kib,
            "rss_delta_pct": round3(rss_delta_pct),
            "rss_tolerance_pct": a.rss_tolerance_pct,
            "rss_anon_baseline_kib": base.anon_kib,
            "rss_anon_after_kib": after.anon_kib,
            "rss_file_baseline_kib": base.file_kib,
            "rss_file_after_kib": after.file_kib,
            "per_round": rounds,
            "sessions_zero_s": round3(sessions_s),
            "settle_s": round3(settle_s),
            "active_sessions_after": active_after,
            "gateway_session_closes": delta(&closes_after, &closes_before),
            "gateway_proxy_errors": delta(&errors_after, &errors_before),
            "upstream": up.map(|u| json!({
                "accepted": u.accepted.load(Ordering::Relaxed),
                "resets": u.resets.load(Ordering::Relaxed),
                "live_after": u.live(),
                "accept_errors": u.accept_errors.load(Ordering::Relaxed),
            })),
            "warmup": warmup,
            "proxy_cpu_s": proxy_cpu,
            "client_cpu_s": client_cpu,
            "step_timeout_s": self.dialer.step.as_secs_f64(),
            "pass": pass,
        })))
    }
}
