//! The client's TLS stream (`ws_gateway::tls_stream::ServerTls`, rustls' unbuffered API): after a real TLS 1.3
//! handshake over an in-memory pipe, the input chooses the records a client sends (their plaintext sizes, key
//! updates, a close_notify), where the byte stream is cut between writes, how much room each read offers, and
//! whether a byte is flipped. Checked: no panic, nothing delivered that was not sent, everything sent delivered in
//! order when no byte was flipped, and no buffer held after a read that left no cut record.
#![no_main]

use std::io::Write;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use ws_gateway::tls;
use ws_gateway::tls_stream::ServerTls;

struct Setup {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Runtime,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let (ck, _) = tls::self_signed(&["localhost"]).expect("certificate");
        let leaf: CertificateDer<'static> = ck.cert[0].clone();
        let server = tls::server_config(tls::ReloadableCert::fixed(ck)).expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(leaf).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Setup {
            server,
            client: Arc::new(client),
            rt,
        }
    })
}

/// A handshake done, with the client's connection taken out of tokio-rustls so records can be made by hand.
async fn connected(
    s: &Setup,
) -> (
    ServerTls<DuplexStream>,
    DuplexStream,
    rustls::ClientConnection,
) {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(ServerTls::accept(Arc::clone(&s.server), server_io));
    let client = tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
        .connect(ServerName::try_from("localhost").expect("name"), client_io)
        .await
        .expect("client handshake");
    let server = server.await.expect("join").expect("server handshake");
    let (raw, conn) = client.into_inner();
    (server, raw, conn)
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    s.rt.block_on(async {
        let (mut server, mut raw, mut conn) = connected(s).await;
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        let mut cuts = Vec::new();
        let mut closed = false;
        let mut ops = data.chunks(2);
        for op in ops.by_ref() {
            let (kind, arg) = (op[0], usize::from(*op.get(1).unwrap_or(&0)));
            match kind % 8 {
                // A record of arg * 97 bytes of plaintext (up to ~24 KiB: two records past 16 KiB).
                0..=3 => {
                    let start = sent.len();
                    sent.extend((0..arg * 97).map(|i| (start + i) as u8));
                    conn.writer().write_all(&sent[start..]).expect("plaintext");
                }
                4 => {
                    let _ = conn.refresh_traffic_keys();
                }
                5 => cuts.push(wire.len() + arg),
                6 => {
                    conn.send_close_notify();
                    closed = true;
                }
                _ => break,
            }
            while conn.wants_write() {
                conn.write_tls(&mut wire).expect("records");
            }
            if closed {
                break;
            }
        }
        // What is left of the input: an optional flipped byte, then the read sizes.
        let rest: Vec<u8> = ops.flatten().copied().collect();
        let mut corrupted = false;
        if let [at_hi, at_lo, mask, ..] = rest[..] {
            let at = usize::from(at_hi) << 8 | usize::from(at_lo);
            if mask != 0 && at < wire.len() {
                wire[at] ^= mask;
                corrupted = true;
            }
        }
        let reads: Vec<usize> = rest
            .iter()
            .skip(3)
            .map(|&b| usize::from(b) * 64 + 1)
            .collect();

        cuts.retain(|&c| c < wire.len());
        cuts.sort_unstable();
        let mut from = 0;
        for c in cuts.into_iter().chain([wire.len()]) {
            raw.write_all(&wire[from..c]).await.expect("pipe");
            from = c;
        }
        drop(raw.shutdown().await);

        let mut got = Vec::new();
        let mut i = 0;
        loop {
            let mut buf = vec![0u8; reads.get(i).copied().unwrap_or(4096)];
            i += 1;
            match server.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    assert!(got.len() <= sent.len(), "more delivered than sent");
                }
                Err(_) => break,
            }
        }
        if !corrupted {
            assert!(
                got == sent,
                "{} of {} bytes delivered",
                got.len(),
                sent.len()
            );
        } else {
            assert!(
                sent.starts_with(&got),
                "a corrupted stream delivered bytes never sent"
            );
        }
    });
});
