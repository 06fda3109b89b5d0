//! The client's TLS connection, driven through rustls' unbuffered API.
//!
//! rustls' buffered `ServerConnection` keeps a receive buffer of at least 4 KiB for the life of the connection,
//! and copies every record through two more queues. Here the connection owns no buffer while it is idle:
//! - a read borrows a pooled buffer, reads ciphertext into it, decrypts every whole record and gives the buffer
//!   back; only a record cut by the read (its bytes, not a buffer) or plaintext the caller had no room for stays
//!   with the connection until the next read;
//! - a write encrypts straight into a pooled buffer and writes it; only bytes the socket would not take stay (the
//!   caller sees them as written, and `poll_flush` waits for them).
//!
//! Handshake records, post-handshake messages (a client's KeyUpdate, the resumption ticket) and alerts go out the
//! same way as application data, in order.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, ReadTraffic, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pool::{self, BUF_SIZE};

/// Bytes read per handshake read, as rustls' buffered connection reads.
const HANDSHAKE_READ: usize = 4096;
/// The largest client flight buffered: a 64 KiB handshake message (rustls' own limit) and its record headers.
const MAX_HANDSHAKE_BUFFER: usize = 0x1_0000 + 1024;

/// A server-side TLS stream, over TCP unless said otherwise (the fuzz target runs it over an in-memory pipe).
pub struct ServerTls<S = TcpStream> {
    tcp: S,
    conn: UnbufferedServerConnection,
    /// Ciphertext of a record cut by the last read (empty, without an allocation, between whole records).
    partial: Vec<u8>,
    /// Plaintext decrypted but not yet taken by the caller, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext not yet written, `out[out_at..]`.
    out: Option<Vec<u8>>,
    out_at: usize,
    out_end: usize,
    /// The peer sent close_notify: reads end.
    peer_closed: bool,
    /// We queued close_notify: writes end.
    closing: bool,
}

impl<S: fmt::Debug> fmt::Debug for ServerTls<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("tcp", &self.tcp)
            .field("partial", &self.partial.len())
            .field("plain", &(self.plain.len() - self.plain_at))
            .field("out", &(self.out_end - self.out_at))
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Plaintext of one decrypted run of records: into the caller's buffer while it has room, the rest kept.
struct Sink<'a, 'b> {
    dst: Option<&'a mut ReadBuf<'b>>,
    plain: &'a mut Vec<u8>,
}

impl Sink<'_, '_> {
    fn put(&mut self, mut bytes: &[u8]) {
        if let Some(dst) = self.dst.as_deref_mut() {
            let n = bytes.len().min(dst.remaining());
            dst.put_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        self.plain.extend_from_slice(bytes);
    }

    fn take_all<Data>(&mut self, mut traffic: ReadTraffic<'_, '_, Data>) -> io::Result<usize> {
        let mut discard = 0;
        while let Some(record) = traffic.next_record() {
            let record = record.map_err(invalid)?;
            discard += record.discard;
            self.put(record.payload);
        }
        Ok(discard)
    }
}

/// Appends an encoded handshake or alert record to `out`.
fn encode_into<Data>(
    out: &mut Vec<u8>,
    end: &mut usize,
    data: &mut EncodeTlsData<'_, Data>,
) -> io::Result<()> {
    let need = match data.encode(&mut out[*end..]) {
        Ok(n) => {
            *end += n;
            return Ok(());
        }
        Err(EncodeError::InsufficientSize(e)) => e.required_size,
        Err(e) => return Err(invalid(e.to_string())),
    };
    out.resize(*end + need, 0);
    *end += data
        .encode(&mut out[*end..])
        .map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

/// What the connection asks for after the records at hand are processed.
enum Next {
    /// Application data may be written; whole records are all processed.
    Traffic,
    /// The handshake waits for more bytes from the peer.
    Read,
    /// Both sides sent close_notify.
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerTls<S> {
    /// Runs the server handshake over `tcp`. Application data that arrives with the client's last flight is kept
    /// for the first read.
    ///
    /// # Errors
    /// The peer's bytes are not an acceptable handshake, the peer closes, or the socket fails.
    pub async fn accept(config: Arc<ServerConfig>, tcp: S) -> io::Result<ServerTls<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut tls = ServerTls {
            tcp,
            conn,
            partial: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            out: None,
            out_at: 0,
            out_end: 0,
            peer_closed: false,
            closing: false,
        };
        // Grown 4 KiB at a time as the client's flight needs, like rustls' own buffer: a handshake that stalls holds
        // what it sent, not a pooled 64 KiB.
        let mut incoming = Vec::new();
        let mut used = 0;
        let result = loop {
            let next = match tls.process(&mut incoming, &mut used, None) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if let Err(e) = tls.write_out().await {
                break Err(e);
            }
            match next {
                Next::Traffic if !tls.conn.is_handshaking() => break Ok(()),
                Next::Closed => break Err(io::ErrorKind::UnexpectedEof.into()),
                Next::Traffic | Next::Read => {}
            }
            if tls.peer_closed {
                break Err(io::ErrorKind::UnexpectedEof.into());
            }
            if used >= MAX_HANDSHAKE_BUFFER {
                break Err(invalid("handshake message too large"));
            }
            incoming.resize(MAX_HANDSHAKE_BUFFER.min(used + HANDSHAKE_READ), 0);
            match tls.tcp.read(&mut incoming[used..]).await {
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => used += n,
                Err(e) => break Err(e),
            }
        };
        tls.keep_partial(&incoming[..used]);
        result.map(|()| tls)
    }

    /// The connection underneath.
    #[must_use]
    pub fn tcp(&self) -> &S {
        &self.tcp
    }

    /// The negotiated protocol version, once the handshake is done.
    #[must_use]
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Processes the whole records in `incoming[..*used]` (removing them), delivering plaintext to `dst` and
    /// keeping what does not fit, and queueing whatever the connection has to send in `out`.
    fn process(
        &mut self,
        incoming: &mut [u8],
        used: &mut usize,
        dst: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<Next> {
        let Self {
            conn,
            plain,
            out,
            out_end,
            peer_closed,
            ..
        } = self;
        let mut sink = Sink { dst, plain };
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut incoming[..*used]);
            let next = match state.map_err(invalid)? {
                ConnectionState::ReadTraffic(traffic) => {
                    discard += sink.take_all(traffic)?;
                    None
                }
                // Handshake flights and post-handshake messages are small: a buffer of their size.
                ConnectionState::EncodeTlsData(mut data) => {
                    let buf = out.get_or_insert_with(Vec::new);
                    encode_into(buf, out_end, &mut data)?;
                    None
                }
                // The bytes are in `out` and go before anything encoded later; the caller writes them.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    *peer_closed = true;
                    Some(Next::Closed)
                }
                ConnectionState::BlockedHandshake => Some(Next::Read),
                ConnectionState::WriteTraffic(_) => Some(Next::Traffic),
                // 0-RTT is never offered (no `max_early_data_size`); anything else is unknown to this version.
                _ => return Err(invalid("unexpected TLS state")),
            };
            incoming.copy_within(discard..*used, 0);
            *used -= discard;
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    /// Keeps the bytes of a record cut by a read, in an allocation of their own size.
    fn keep_partial(&mut self, rest: &[u8]) {
        self.partial = rest.to_vec();
    }

    /// Writes `out` until it is empty (giving its buffer back) or the socket is full.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out_end {
            let Some(out) = self.out.as_ref() else { break };
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &out[self.out_at..self.out_end])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out_at += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if let Some(out) = self.out.take() {
            pool::give(out);
        }
        self.out_at = 0;
        self.out_end = 0;
        Poll::Ready(Ok(()))
    }

    async fn write_out(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Puts the kept plaintext into `dst`; whether there was any.
    fn take_plain(&mut self, dst: &mut ReadBuf<'_>) -> bool {
        if self.plain_at == self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_at).min(dst.remaining());
        dst.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        true
    }

    /// Encrypts up to `BUF_SIZE` bytes of `data`, or a close_notify alert, into `out` after whatever handshake
    /// messages the connection has queued; how many bytes of `data` were taken.
    fn write_records(&mut self, what: Outgoing<'_>) -> io::Result<usize> {
        let n = match what {
            Outgoing::Data(data) => data.len().min(BUF_SIZE),
            Outgoing::CloseNotify => 0,
        };
        let Self {
            conn,
            partial,
            out,
            out_end,
            peer_closed,
            ..
        } = self;
        loop {
            // `partial` holds no whole record (reads process them all), so nothing is discarded here.
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut partial[..]);
            let buf = out.get_or_insert_with(pool::take);
            match state.map_err(invalid)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let written = match what {
                        Outgoing::Data(data) => traffic.encrypt(&data[..n], &mut buf[*out_end..]),
                        Outgoing::CloseNotify => traffic.queue_close_notify(&mut buf[*out_end..]),
                    };
                    match written {
                        Ok(len) => {
                            *out_end += len;
                            return Ok(n);
                        }
                        // Handshake bytes queued before left less room than a full write needs.
                        Err(EncryptError::InsufficientSize(e)) => {
                            buf.resize(*out_end + e.required_size, 0);
                        }
                        Err(e) => return Err(invalid(e.to_string())),
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode_into(buf, out_end, &mut data)?;
                }
                ConnectionState::TransmitTlsData(data) => data.done(),
                ConnectionState::PeerClosed => *peer_closed = true,
                // Already closed both ways, or unable to send: no close_notify to add.
                _ if matches!(what, Outgoing::CloseNotify) => return Ok(0),
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                _ => return Err(invalid("TLS connection cannot send")),
            }
        }
    }
}

/// What [`ServerTls::write_records`] puts in records.
#[derive(Clone, Copy)]
enum Outgoing<'d> {
    Data(&'d [u8]),
    CloseNotify,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.take_plain(dst) || dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let mut incoming = pool::take();
            let mut used = this.partial.len();
            incoming[..used].copy_from_slice(&this.partial);
            let mut rb = ReadBuf::new(&mut incoming[used..]);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    pool::give(incoming);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    pool::give(incoming);
                    return Poll::Pending;
                }
            }
            let n = rb.filled().len();
            if n == 0 {
                pool::give(incoming);
                // A peer that closes without close_notify may have been cut off: the caller decides.
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            used += n;
            let before = dst.filled().len();
            let processed = this.process(&mut incoming, &mut used, Some(dst));
            this.keep_partial(&incoming[..used]);
            pool::give(incoming);
            processed?;
            // A KeyUpdate answer or an alert goes out now; one the socket will not take waits for the next write.
            if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
            if dst.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = this.write_records(Outgoing::Data(data))?;
        // Written now when the socket takes it; otherwise `poll_flush` waits for it.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            ready!(this.poll_write_out(cx))?;
            this.closing = true;
            this.write_records(Outgoing::CloseNotify)?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Handshakes with [`ServerTls::accept`], one configuration for every connection.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<ServerConfig>);

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsAcceptor")
    }
}

impl From<Arc<ServerConfig>> for TlsAcceptor {
    fn from(config: Arc<ServerConfig>) -> Self {
        TlsAcceptor(config)
    }
}

impl TlsAcceptor {
    /// Runs the handshake over `tcp`.
    ///
    /// # Errors
    /// As [`ServerTls::accept`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ServerTls> {
        ServerTls::accept(Arc::clone(&self.0), tcp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream;

    use crate::tls;

    /// A listener with the gateway's server configuration and a client configuration that trusts it, restricted to
    /// `versions`.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (TlsStream<TcpStream>, io::Result<ServerTls>) {
        let (ck, pem) = tls::self_signed(&["localhost"]).expect("certificate");
        let config = tls::server_config(tls::ReloadableCert::fixed(ck)).expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsAcceptor::from(config).accept(tcp).await
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let client = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("client handshake");
        (client, server.await.expect("join"))
    }

    fn holds_no_buffer(s: &ServerTls) -> bool {
        s.partial.capacity() == 0 && s.plain.capacity() == 0 && s.out.is_none()
    }

    /// Bytes that are not the same from one offset to the next, so a reordering or a lost chunk shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[tokio::test]
    async fn both_versions_carry_small_and_large_writes_both_ways_and_hold_no_buffer_when_idle() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (mut client, server) = pair(versions).await;
            let mut server = server.expect("server handshake");
            for len in [1, 100, 16_384, 16_385, 70_000, 1 << 20] {
                let sent = pattern(len, len as u8);
                let (to_server, to_client) = (sent.clone(), sent.clone());
                let write = tokio::spawn(async move {
                    client.write_all(&to_server).await.expect("client write");
                    client.flush().await.expect("client flush");
                    let mut back = vec![0; to_client.len()];
                    client.read_exact(&mut back).await.expect("client read");
                    assert!(back == to_client, "{len} bytes came back changed");
                    client
                });
                let mut got = vec![0; len];
                server.read_exact(&mut got).await.expect("server read");
                assert!(got == sent, "{len} bytes arrived changed");
                server.write_all(&sent).await.expect("server write");
                server.flush().await.expect("server flush");
                client = write.await.expect("join");
                assert!(holds_no_buffer(&server), "after {len} bytes: {server:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_request_in_the_clients_first_flight_and_reads_of_one_byte_lose_nothing() {
        let (mut client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        let sent = pattern(40_000, 7);
        client.write_all(&sent).await.expect("write");
        client.flush().await.expect("flush");
        let mut got = Vec::new();
        let mut one = [0u8; 1];
        while got.len() < sent.len() {
            let n = server.read(&mut one).await.expect("read");
            assert_eq!(n, 1);
            got.push(one[0]);
        }
        assert!(got == sent);
        assert!(holds_no_buffer(&server));
    }

    #[tokio::test]
    async fn key_updates_from_the_client_keep_traffic_going_both_ways() {
        let (mut client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        for round in 0..3u8 {
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            client.write_all(&[round; 10]).await.expect("write");
            client.flush().await.expect("flush");
            let mut got = [0u8; 10];
            server.read_exact(&mut got).await.expect("server read");
            assert_eq!(got, [round; 10]);
            server
                .write_all(&[round + 100; 5])
                .await
                .expect("server write");
            server.flush().await.expect("server flush");
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.expect("client read");
            assert_eq!(back, [round + 100; 5]);
        }
    }

    #[tokio::test]
    async fn close_notify_both_ways_reads_as_end_of_stream() {
        let (mut client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        client.write_all(b"last").await.expect("write");
        client.shutdown().await.expect("client close_notify");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("clean end");
        assert_eq!(got, b"last");
        server
            .write_all(b"bye")
            .await
            .expect("write after the peer closed");
        server.shutdown().await.expect("server close_notify");
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .expect("client reads a clean end");
        assert_eq!(back, b"bye");
    }

    #[tokio::test]
    async fn a_connection_cut_without_close_notify_is_an_unexpected_eof() {
        let (client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        let mut tcp = client.into_inner().0;
        tcp.shutdown().await.expect("FIN");
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_fail_the_handshake_and_a_corrupted_record_fails_the_read() {
        let (ck, _) = tls::self_signed(&["localhost"]).expect("certificate");
        let config = tls::server_config(tls::ReloadableCert::fixed(ck)).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (server_tcp, _) = listener.accept().await.expect("accept");
        let err = ServerTls::accept(config, server_tcp)
            .await
            .expect_err("not TLS");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        let mut raw = client.into_inner().0;
        // An application-data record whose ciphertext cannot authenticate.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        record.extend_from_slice(&[0x5a; 0x20]);
        raw.write_all(&record).await.expect("write");
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.expect_err("bad record");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_record_cut_by_the_read_is_kept_as_its_bytes_only() {
        let (client, server) = pair(&[&rustls::version::TLS13]).await;
        let mut server = server.expect("server handshake");
        let (tcp, mut conn) = client.into_inner();
        // Encrypt one record with the client's connection, then send it in two parts.
        let mut record = Vec::new();
        std::io::Write::write_all(&mut conn.writer(), b"hello").expect("plaintext");
        conn.write_tls(&mut record).expect("record");
        let mut tcp = tcp;
        tcp.write_all(&record[..7]).await.expect("first part");
        let mut buf = [0u8; 16];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(100), server.read(&mut buf));
        assert!(early.await.is_err(), "nothing to deliver from a cut record");
        assert_eq!(server.partial.len(), 7);
        assert_eq!(server.partial.capacity(), 7);
        tcp.write_all(&record[7..]).await.expect("second part");
        let n = server.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        assert!(holds_no_buffer(&server));
    }
}
