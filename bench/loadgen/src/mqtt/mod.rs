//! `mqtt`: what the MQTT-aware edge costs (issue 16, rule 4), measured with real MQTT through the gateway to a
//! broker. N sessions (TLS, the token in `Authorization: Bearer`, subprotocol `mqtt`) each send a 3.1.1 CONNECT
//! (client id `<sub>-<i>`), await the CONNACK, SUBSCRIBE to `devices/<sub>/<i>` at QoS 0, await the SUBACK, and
//! check the path with one PINGREQ/PINGRESP. Then QoS 0 PUBLISHes to each session's own topic go out at a fixed
//! aggregate rate on an open-loop schedule (round-robin over the sessions, one WebSocket binary frame per packet),
//! and the broker sends each one back to its publisher, the only subscriber. The payload starts with the scheduled
//! send time, so latency is from the schedule, as in `latency`. Each message crosses a gateway twice: once as the
//! client's PUBLISH, once as the broker's.
//!
//! The RESULT counts what was sent (`sent`: the measured window; `sent_total` with the warm-up), received and lost,
//! messages on a foreign topic (always 0 unless something is wrong), latency quantiles, and the CPU seconds of the
//! gateway (`--pid`) and of the broker (`--broker-pid`) over the measured window, also per measured message.
//!
//! Every wait is bounded by `--step-timeout` or the end of the schedule plus that timeout.

mod codec;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWriteExt};
use ws_gateway::frame::{self, OP_BINARY, OP_CONTINUATION};

use crate::{
    check_sessions, failure, mask_key, ns_to_us, open_loop, quantile, read_frame, round3, secs,
    CpuMeter, Dialer, Errors, Failure, Session, Target,
};
use codec::{CodecError, Packet};

/// Largest MQTT packet accepted from the broker (the payloads here are at most 64 KiB).
const MAX_PACKET: usize = 128 * 1024;
/// Keep-alive announced in the CONNECT, seconds. Every session must publish more often than this (checked).
const KEEP_ALIVE: u16 = 60;
/// Bytes of the payload that carry the scheduled send time.
const STAMP: usize = 8;

/// Flags of `mqtt`.
#[derive(Args, Debug)]
pub(crate) struct MqttArgs {
    #[command(flatten)]
    target: Target,
    /// Sessions to open.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Aggregate PUBLISH messages per second, spread round-robin over the sessions.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds published at the same rate before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Payload bytes per PUBLISH (at least 8: the scheduled send time).
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// The `<sub>` of client ids and topics [default: the token's `sub` claim, else `bench`]. The gateway's topic
    /// ACLs (`devices/{sub}/#`) expect the token's.
    #[arg(long)]
    sub: Option<String>,
    /// CONNECT username (the gateway replaces it with a claim under `--mqtt-username-claim`).
    #[arg(long, default_value = "bench")]
    username: String,
    /// Sessions being opened at once.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Broker process ids (comma-separated) whose CPU time is reported apart from the gateway's.
    #[arg(long, value_delimiter = ',')]
    broker_pid: Vec<u32>,
}

/// The `sub` claim of a JWT, read without verifying (the gateway verifies; this only names topics).
fn token_sub(token: &str) -> Option<String> {
    let claims = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(claims).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("sub")?.as_str().map(str::to_owned)
}

/// An MQTT session on an open WebSocket session: the session and the MQTT bytes received but not yet decoded.
struct MqttSession {
    ws: Session,
    inbox: Vec<u8>,
}

/// What the setup waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    ConnAck,
    SubAck,
    PingResp,
}

fn codec_failure(e: CodecError) -> Failure {
    failure("bad_mqtt", e)
}

/// Appends the payload of a data frame to `inbox`; other frames (Ping, Pong) carry no MQTT bytes.
fn take_frame(inbox: &mut Vec<u8>, f: frame::Frame) {
    if f.opcode == OP_BINARY || f.opcode == OP_CONTINUATION {
        inbox.extend_from_slice(&f.payload);
    }
}

impl MqttSession {
    async fn send(&mut self, packet: &[u8]) -> Result<(), Failure> {
        self.ws.send_binary(packet).await
    }

    /// Reads until the packet `want` arrives, all within one step timeout. PUBLISHes and other packets before it are
    /// skipped. A CONNACK or SUBACK that refuses is a failure named by its code.
    async fn expect(&mut self, want: Expect) -> Result<(), Failure> {
        let step = self.ws.step;
        let wait = async {
            loop {
                let mut used = 0;
                let mut done = false;
                while let Some((p, n)) =
                    codec::decode(&self.inbox[used..], MAX_PACKET).map_err(codec_failure)?
                {
                    used += n;
                    match (want, p) {
                        (Expect::ConnAck, Packet::ConnAck { code: 0, .. }) => {
                            done = true;
                            break;
                        }
                        (Expect::ConnAck, Packet::ConnAck { code, .. }) => {
                            return Err(failure(
                                format!("connack_{code}"),
                                format!("CONNACK return code {code}"),
                            ))
                        }
                        (Expect::SubAck, Packet::SubAck { codes, .. }) => {
                            if codes.iter().any(|c| *c >= 0x80) {
                                return Err(failure("suback_refused", "SUBACK refused the topic"));
                            }
                            done = true;
                            break;
                        }
                        (Expect::PingResp, Packet::PingResp) => {
                            done = true;
                            break;
                        }
                        _ => {}
                    }
                }
                self.inbox.drain(..used);
                if done {
                    return Ok(());
                }
                let f = read_frame(&mut self.ws.io, &mut self.ws.buf).await?;
                take_frame(&mut self.inbox, f);
            }
        };
        tokio::time::timeout(step, wait).await.map_err(|_| {
            failure(
                format!("{want:?}_timeout").to_lowercase(),
                "no answer in time",
            )
        })?
    }
}

/// Opens session `i`: WebSocket with subprotocol `mqtt`, CONNECT/CONNACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP.
async fn open_one(
    dialer: &Dialer,
    i: usize,
    sub: &str,
    username: &str,
) -> Result<MqttSession, Failure> {
    let ws = dialer
        .open_offering(dialer.token.as_deref(), &["mqtt"])
        .await?;
    // Bytes after the 101 stay in `ws.buf`: they are WebSocket frames, not yet MQTT bytes.
    let mut s = MqttSession {
        ws,
        inbox: Vec::new(),
    };
    let connect =
        codec::connect(&format!("{sub}-{i}"), username, KEEP_ALIVE).map_err(codec_failure)?;
    s.send(&connect).await?;
    s.expect(Expect::ConnAck).await?;
    let subscribe = codec::subscribe(1, &topic(sub, i), 0).map_err(codec_failure)?;
    s.send(&subscribe).await?;
    s.expect(Expect::SubAck).await?;
    s.send(&codec::pingreq()).await?;
    s.expect(Expect::PingResp).await?;
    Ok(s)
}

fn topic(sub: &str, i: usize) -> String {
    format!("devices/{sub}/{i}")
}

/// Opens `n` MQTT sessions, `parallel` at a time, in index order.
async fn open_all(
    dialer: &Arc<Dialer>,
    n: usize,
    parallel: usize,
    sub: &Arc<str>,
    username: &Arc<str>,
) -> (Vec<(usize, MqttSession)>, Errors) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.clamp(1, n) {
        let (dialer, next) = (Arc::clone(dialer), Arc::clone(&next));
        let (sub, username) = (Arc::clone(sub), Arc::clone(username));
        tasks.push(tokio::spawn(async move {
            let mut opened = Vec::new();
            let mut errors = Errors::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match open_one(&dialer, i, &sub, &username).await {
                    Ok(s) => opened.push((i, s)),
                    Err(f) => errors.add(f),
                }
            }
            (opened, errors)
        }));
    }
    let mut sessions = Vec::with_capacity(n);
    let mut errors = Errors::default();
    for t in tasks {
        match t.await {
            Ok((s, e)) => {
                sessions.extend(s);
                errors.merge(e);
            }
            Err(e) => errors.add(failure("task", e)),
        }
    }
    sessions.sort_by_key(|(i, _)| *i);
    (sessions, errors)
}

/// What one session's reader saw.
#[derive(Default)]
struct Received {
    /// Latencies of messages scheduled in the measured window, ns.
    lat: Vec<u64>,
    /// Every PUBLISH received on the session's own topic.
    count: u64,
    /// PUBLISHes on another topic.
    foreign: u64,
    /// Why the reader stopped before the deadline, if it did for a reason other than the session's end.
    error: Option<Failure>,
}

/// The schedule's clock, shared by the readers.
#[derive(Clone, Copy)]
struct Clock {
    /// Time zero of the schedule (the stamps in the payloads are ns since it).
    epoch: Instant,
    /// Stamps from here on are in the measured window.
    warm_ns: u64,
    /// Readers stop here at the latest.
    stop: Instant,
}

/// Reads the broker's PUBLISHes on one session until it ends or `clock.stop`. `buf` holds WebSocket bytes read but
/// not decoded, `inbox` MQTT bytes not decoded, `own` the session's topic; `total` counts across sessions.
async fn reader<R: AsyncRead + Unpin>(
    mut rd: R,
    mut buf: Vec<u8>,
    mut inbox: Vec<u8>,
    own: Vec<u8>,
    clock: Clock,
    total: Arc<AtomicU64>,
) -> Received {
    let Clock {
        epoch,
        warm_ns,
        stop,
    } = clock;
    let mut r = Received::default();
    loop {
        let mut used = 0;
        loop {
            match codec::decode(&inbox[used..], MAX_PACKET) {
                Ok(Some((p, n))) => {
                    used += n;
                    let Packet::Publish { topic, payload, .. } = p else {
                        continue;
                    };
                    if topic != own.as_slice() {
                        r.foreign += 1;
                        continue;
                    }
                    r.count += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                    let Some(stamp) = payload.first_chunk::<STAMP>() else {
                        continue;
                    };
                    let sched = u64::from_le_bytes(*stamp);
                    if sched >= warm_ns {
                        let now = epoch.elapsed().as_nanos() as u64;
                        r.lat.push(now.saturating_sub(sched));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    r.error = Some(codec_failure(e));
                    return r;
                }
            }
        }
        inbox.drain(..used);
        match tokio::time::timeout_at(stop.into(), read_frame(&mut rd, &mut buf)).await {
            Ok(Ok(f)) => take_frame(&mut inbox, f),
            // The session ended (Close, EOF, reset) or the deadline passed: both end the reader.
            Ok(Err(_)) | Err(_) => return r,
        }
    }
}

/// Runs `mqtt`.
pub(crate) async fn mqtt(args: MqttArgs) -> Result<Option<Value>, String> {
    let MqttArgs {
        target,
        sessions,
        rate,
        duration,
        warmup,
        payload,
        sub,
        username,
        open_concurrency,
        broker_pid,
    } = args;
    check_sessions(sessions, "--sessions")?;
    if !(1.0..=1_000_000.0).contains(&rate) {
        return Err("--rate must be between 1 and 1,000,000 messages per second".into());
    }
    // Each session must publish within its keep-alive (and the gateway's idle timeout, 60 s by default).
    if rate / (sessions as f64) < 1.0 / 30.0 {
        return Err(format!(
            "--rate {rate} over {sessions} sessions publishes less than once per 30 s per session: the keep-alive \
             ({KEEP_ALIVE} s) and the gateway's idle timeout would end them"
        ));
    }
    if !(STAMP..=65_535).contains(&payload) {
        return Err(format!("--payload must be between {STAMP} and 65535 bytes"));
    }
    let measure = secs(duration, "--duration")?;
    let warm = secs(warmup, "--warmup")?;
    let sub: Arc<str> = sub
        .or_else(|| target.token.as_deref().and_then(token_sub))
        .unwrap_or_else(|| "bench".into())
        .into();
    if sub.is_empty() || sub.len() > 1024 || sub.contains(['/', '+', '#', '\0']) {
        return Err(
            "the subject (--sub or the token's sub) must be 1 to 1024 bytes without / + # or NUL"
                .into(),
        );
    }
    let username: Arc<str> = username.into();
    let dialer = Arc::new(Dialer::new(&target)?);
    let (opened, errors) = open_all(&dialer, sessions, open_concurrency, &sub, &username).await;
    errors.report();
    if opened.len() < sessions {
        return Err(format!(
            "mqtt: opened {} of {sessions} sessions ({:?})",
            opened.len(),
            errors.kinds
        ));
    }

    let total = warm + measure;
    let warm_ns = warm.as_nanos() as u64;
    let step = dialer.step;
    let epoch = Instant::now() + Duration::from_millis(200);
    // Messages scheduled before the end have this long to come back.
    let stop = epoch + total + step;
    let clock = Clock {
        epoch,
        warm_ns,
        stop,
    };
    let received_total = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::with_capacity(sessions);
    let mut templates = Vec::with_capacity(sessions);
    let mut readers = Vec::with_capacity(sessions);
    let body = vec![0x5a; payload];
    for (i, s) in opened {
        let MqttSession { ws, inbox } = s;
        let Session { io, buf, .. } = ws;
        let (rd, wr) = tokio::io::split(io);
        let own = topic(&sub, i);
        templates.push(codec::publish_qos0(&own, &body).map_err(|e| e.to_string())?);
        writers.push(wr);
        let total = Arc::clone(&received_total);
        readers.push(tokio::spawn(reader(
            rd,
            buf,
            inbox,
            own.into_bytes(),
            clock,
            total,
        )));
    }

    // The schedule runs on its own thread and writes itself, as in `latency`: std sleeps are precise to tens of
    // microseconds, and a write to a socket with room completes at once. A blocked write waits under the step
    // timeout, then its session counts as broken and is skipped.
    let handle = tokio::runtime::Handle::current();
    let schedule = std::thread::spawn(move || {
        let sent = open_loop(
            &handle,
            writers,
            epoch,
            total,
            warm,
            rate,
            step,
            |i, k, sched| {
                // Invariant: `templates` is as long as `writers`.
                let (packet, offset) = &mut templates[i];
                packet[*offset..*offset + STAMP].copy_from_slice(&sched.to_le_bytes());
                frame::encode(OP_BINARY, &packet[..], Some(mask_key(k)))
            },
        );
        (
            sent.warm,
            sent.measured,
            sent.lags,
            sent.broken,
            sent.writers,
        )
    });

    tokio::time::sleep_until((epoch + warm).into()).await;
    let cpu = CpuMeter::start(&target.pid);
    let broker_cpu = CpuMeter::start(&broker_pid);
    let (sent_warm, sent, mut lags, broken, mut writers) =
        tokio::task::spawn_blocking(move || schedule.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the schedule thread panicked".to_string())?;
    let (proxy_cpu, client_cpu) = cpu.stop();
    let (broker_cpu, _) = broker_cpu.stop();
    let sent_total = sent_warm + sent;

    // Let the last messages come back (bounded by `stop`), then end each session as a client should: DISCONNECT,
    // then Close.
    while received_total.load(Ordering::Relaxed) < sent_total && Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bye = frame::encode(OP_BINARY, &codec::disconnect(), Some(mask_key(1)));
    let close = frame::close_frame(frame::CLOSE_NORMAL, "", Some(mask_key(0)));
    for (wr, broken) in writers.iter_mut().zip(&broken) {
        if !broken {
            let _ = tokio::time::timeout(step, async {
                wr.write_all(&bye).await?;
                wr.write_all(&close).await?;
                wr.flush().await
            })
            .await;
        }
    }
    let mut lat = Vec::new();
    let mut received = 0u64;
    let mut foreign = 0u64;
    let mut read_errors = Errors::default();
    for r in readers {
        match r.await {
            Ok(r) => {
                lat.extend(r.lat);
                received += r.count;
                foreign += r.foreign;
                if let Some(f) = r.error {
                    read_errors.add(f);
                }
            }
            Err(e) => read_errors.add(failure("task", e)),
        }
    }
    read_errors.report();
    let broken = broken.iter().filter(|b| **b).count() as u64;
    let lost = sent_total.saturating_sub(received);
    if lat.is_empty() {
        return Err("mqtt: no PUBLISH came back".into());
    }
    lat.sort_unstable();
    lags.sort_unstable();
    let per_msg = |cpu: Option<f64>| {
        cpu.filter(|_| sent > 0)
            .map(|c| round3(c * 1e6 / sent as f64))
    };
    Ok(Some(json!({
        "mode": "mqtt",
        "url": dialer.url.to_string(),
        "sessions": sessions,
        "rate": rate,
        "payload": payload,
        "duration_s": duration,
        "warmup_s": warmup,
        "sub": &*sub,
        "sent": sent,
        "sent_total": sent_total,
        "received": received,
        "lost": lost,
        "foreign": foreign,
        "broken_sessions": broken,
        "errors": read_errors.total(),
        "error_kinds": read_errors.kinds,
        "measured": lat.len(),
        "p50_us": ns_to_us(quantile(&lat, 0.5)),
        "p99_us": ns_to_us(quantile(&lat, 0.99)),
        "p999_us": ns_to_us(quantile(&lat, 0.999)),
        "max_us": ns_to_us(quantile(&lat, 1.0)),
        "send_lag_p50_us": ns_to_us(quantile(&lags, 0.5)),
        "send_lag_p99_us": ns_to_us(quantile(&lags, 0.99)),
        "proxy_cpu_s": proxy_cpu,
        "proxy_cpu_us_per_msg": per_msg(proxy_cpu),
        "broker_cpu_s": broker_cpu,
        "broker_cpu_us_per_msg": per_msg(broker_cpu),
        "client_cpu_s": client_cpu,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_comes_from_the_token() {
        let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"bench-user","exp":1}"#);
        assert_eq!(
            token_sub(&format!("e30.{claims}.sig")).as_deref(),
            Some("bench-user")
        );
        assert_eq!(token_sub("not a token"), None);
        assert_eq!(token_sub("e30.!!!.x"), None);
    }

    #[test]
    fn only_data_frames_carry_mqtt_bytes() {
        let mut inbox = Vec::new();
        for (opcode, payload) in [
            (OP_BINARY, b"ab"),
            (frame::OP_PING, b"zz"),
            (OP_CONTINUATION, b"cd"),
        ] {
            take_frame(
                &mut inbox,
                frame::Frame {
                    fin: true,
                    opcode,
                    payload: payload.to_vec(),
                },
            );
        }
        assert_eq!(inbox, b"abcd");
    }
}
