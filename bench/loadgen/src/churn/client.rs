//! What a churn session does on its own socket: an echo, an abrupt reset, and waiting for the server to end it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ws_gateway::frame::{self, OP_CLOSE};
use ws_gateway::net::Io;

use crate::{failure, mask_key, Failure, Session, MAX_FRAME};

/// What the client saw while waiting for the server to end a session.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// A Close frame with this code (1005 when it carried none).
    Close(u16),
    /// TLS close_notify, then end of stream.
    Eof,
    /// End of stream without close_notify.
    EofUnclean,
    Reset,
    Timeout,
    Bad(&'static str),
}

impl Seen {
    /// Bounded label for the RESULT's `seen_at_end`.
    pub(super) fn label(&self) -> String {
        match self {
            Seen::Close(code) => format!("close_{code}"),
            Seen::Eof => "eof".into(),
            Seen::EofUnclean => "eof_unclean".into(),
            Seen::Reset => "reset".into(),
            Seen::Timeout => "timeout".into(),
            Seen::Bad(what) => format!("bad_{what}"),
        }
    }
}

impl Session {
    /// Sends one frame and reads its echo.
    pub(super) async fn ping(&mut self, payload: &[u8]) -> Result<(), Failure> {
        self.send_binary(payload).await?;
        let f = self.read_frame().await?;
        if f.payload != payload {
            return Err(failure("bad_echo", "echo differs from the frame sent"));
        }
        Ok(())
    }

    /// SO_LINGER 0, then drop: the kernel sends RST and discards unsent data.
    pub(super) fn reset(self) -> Result<(), Failure> {
        let tcp = match &self.io {
            Io::Plain(t) => t,
            Io::ClientTls(t) => t.get_ref().0,
            Io::ServerTls(t) => t.tcp(),
        };
        tcp.set_zero_linger().map_err(|e| failure("linger", e))?;
        drop(self);
        Ok(())
    }

    /// Waits up to `wait` for the server to end the session; data frames are skipped.
    pub(super) async fn await_end(&mut self, wait: Duration) -> Seen {
        let deadline = tokio::time::Instant::now() + wait;
        let mut chunk = [0u8; 4096];
        loop {
            match frame::decode(&self.buf, MAX_FRAME) {
                Ok(Some((f, used))) => {
                    self.buf.drain(..used);
                    if f.opcode == OP_CLOSE {
                        let code = match f.payload.get(..2) {
                            Some(b) => u16::from_be_bytes([b[0], b[1]]),
                            None => 1005,
                        };
                        return Seen::Close(code);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(_) => return Seen::Bad("frame"),
            }
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Err(_) => return Seen::Timeout,
                Ok(Ok(0)) => return Seen::Eof,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => {
                    return match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => Seen::EofUnclean,
                        std::io::ErrorKind::ConnectionReset => Seen::Reset,
                        _ => Seen::Bad("io"),
                    }
                }
            }
        }
    }

    /// Answers the server's Close with the same code and waits (bounded) for the end of the stream.
    pub(super) async fn answer_close(mut self, code: u16) {
        let close = frame::close_frame(code, "", Some(mask_key(u64::from(code))));
        let step = self.step;
        let _ = tokio::time::timeout(step, async {
            if self.io.write_all(&close).await.is_err() || self.io.flush().await.is_err() {
                return;
            }
            let mut chunk = [0u8; 1024];
            while let Ok(n) = self.io.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
    }
}
