//! The gateway started in-process (`ws_gateway::run` with a trigger channel instead of signals): the drain
//! deadline and its exit value, a second shutdown, certificate reload by trigger, and the MQTT CONNECT path with
//! the upstream down.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use ws_gateway::{Exit, Trigger};

#[tokio::test]
async fn the_drain_deadline_closes_sessions_with_1001_and_run_returns_drained() {
    let env = Env::new().await;
    let mut args = env.args();
    args.extend(
        [
            "--graceful-drain-timeout-seconds",
            "1",
            "--drain-spread-seconds",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    let gw = InProcess::start(&args).await;
    let auth = format!("Authorization: Bearer {}\r\n", env.token());
    let (mut s, head, rest) = raw_upgrade(&env.pki, gw.addr, "/", &auth).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let started = Instant::now();
    gw.triggers.send(Trigger::Shutdown).await.expect("send");
    let (frames, code) = frames_until_close(&mut s, rest).await;
    assert_eq!(code, 1001);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(frames
        .iter()
        .all(|f| f.opcode != ws_gateway::frame::OP_CLOSE));
    // The client answers its Close, so the session ends within the drain and every guard is dropped.
    within(s.write_all(&ws_gateway::frame::close_frame(
        1001,
        "",
        Some([1, 2, 3, 4]),
    )))
    .await
    .expect("answer");
    let exit = within(gw.task).await.expect("join").expect("run");
    assert_eq!(exit, Exit::Drained);
}

#[tokio::test]
async fn a_second_shutdown_forces_the_exit() {
    let env = Env::new().await;
    let mut args = env.args();
    args.extend(
        ["--graceful-drain-timeout-seconds", "60"]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    let gw = InProcess::start(&args).await;
    let auth = format!("Authorization: Bearer {}\r\n", env.token());
    let (_s, head, _) = raw_upgrade(&env.pki, gw.addr, "/", &auth).await;
    assert_eq!(status_of(&head), 101, "{head}");
    gw.triggers.send(Trigger::Shutdown).await.expect("send");
    gw.triggers.send(Trigger::Shutdown).await.expect("send");
    let exit = within(gw.task).await.expect("join").expect("run");
    assert_eq!(exit, Exit::Forced);
}

#[tokio::test]
async fn the_mqtt_connect_path_with_the_upstream_down_gets_connack_unavailable_and_1014() {
    let env = Env::new().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut args = env.args();
    let i = args
        .iter()
        .position(|a| a == "--upstream-ws-url")
        .expect("flag");
    args[i + 1] = format!("ws://{closed}/");
    let gw = InProcess::start(&args).await;
    let (mut s, head, rest) = raw_upgrade(
        &env.pki,
        gw.addr,
        "/mqtt",
        "Sec-WebSocket-Protocol: mqtt\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    // MQTT 3.1.1 CONNECT with the token as password, as one masked binary frame.
    let token = env.token();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 30];
    for f in ["dev-1", "user", token.as_str()] {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    let packet = common::mqtt::packet(0x10, &body);
    let frame =
        ws_gateway::frame::encode(ws_gateway::frame::OP_BINARY, &packet, Some([5, 6, 7, 8]));
    within(s.write_all(&frame)).await.expect("write");
    let (frames, code) = frames_until_close(&mut s, rest).await;
    assert_eq!(code, 1014);
    assert_eq!(frames.len(), 1);
    // CONNACK, session present 0, return code 3 (server unavailable).
    assert_eq!(frames[0].payload, vec![0x20, 0x02, 0x00, 0x03]);
    gw.triggers.send(Trigger::Shutdown).await.expect("send");
    assert_eq!(
        within(gw.task).await.expect("join").expect("run"),
        Exit::Drained
    );
}
