//! The registry of live sessions, by subject and token id, and the handle that closes one session from outside
//! its task (token revocation will use it; the admin API and Redis pub/sub come later).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

/// Why a session is being closed from outside; carried to the relay, which sends the matching Close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code.
    pub code: u16,
    /// Short reason, sent in the Close frame and logged.
    pub reason: &'static str,
}

/// The handle a session's relay watches, with what the registry knows about the session.
#[derive(Debug)]
pub struct SessionControl {
    notify: Notify,
    request: Mutex<Option<CloseRequest>>,
    /// Who and where, as the session started.
    pub info: SessionInfo,
    /// The token of an MQTT 5 re-authentication, once the session has refreshed it.
    refreshed: Mutex<Option<Refreshed>>,
}

/// The fields a token refresh changes in [`SessionInfo`].
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// `jti` of the new token.
    pub token_id: Option<String>,
    /// `sid` of the new token.
    pub session_id: Option<String>,
    /// `iat` of the new token.
    pub issued_at: Option<i64>,
    /// `exp` of the new token.
    pub expires_at: i64,
}

impl SessionControl {
    /// A handle for `info`, with no close requested.
    #[must_use]
    pub fn new(info: SessionInfo) -> SessionControl {
        SessionControl {
            notify: Notify::new(),
            request: Mutex::new(None),
            info,
            refreshed: Mutex::new(None),
        }
    }

    /// Records a token refresh: revocations by `jti` or `sid` and the admin API see the new token from now on.
    pub fn refresh(&self, token: Refreshed) {
        if let Ok(mut r) = self.refreshed.lock() {
            *r = Some(token);
        }
    }

    /// What the registry knows now: [`SessionControl::info`] with the latest refresh applied.
    #[must_use]
    pub fn current(&self) -> SessionInfo {
        let mut info = self.info.clone();
        if let Some(r) = self.refreshed.lock().ok().and_then(|r| r.clone()) {
            info.token_id = r.token_id;
            info.session_id = r.session_id;
            info.issued_at = r.issued_at;
            info.expires_at = r.expires_at;
        }
        info
    }

    /// `pick` on the current view, cloning only for a refreshed session.
    fn matches(&self, pick: &impl Fn(&SessionInfo) -> bool) -> bool {
        let refreshed = self.refreshed.lock().map(|r| r.is_some()).unwrap_or(false);
        if refreshed {
            pick(&self.current())
        } else {
            pick(&self.info)
        }
    }

    /// Asks the session to close.
    pub fn close(&self, request: CloseRequest) {
        if let Ok(mut r) = self.request.lock() {
            r.get_or_insert(request);
        }
        self.notify.notify_one();
    }

    /// Resolves when a close is requested.
    pub async fn requested(&self) -> CloseRequest {
        loop {
            if let Some(r) = self.request.lock().ok().and_then(|r| *r) {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// What the registry knows about one session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// `sub` of the token.
    pub subject: Option<String>,
    /// `jti` of the token.
    pub token_id: Option<String>,
    /// `sid` of the token.
    pub session_id: Option<String>,
    /// `iat` of the token.
    pub issued_at: Option<i64>,
    /// `exp` of the token.
    pub expires_at: i64,
    /// The route's prefix.
    pub route: String,
    /// Client address.
    pub peer: SocketAddr,
    /// When the relay started.
    pub started: SystemTime,
}

/// Live sessions. Touched at session start and end only, never on the relay's hot path.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    /// One pointer per session, so the map's spare capacity costs little per live session.
    sessions: Mutex<HashMap<u64, Arc<SessionControl>>>,
    /// The most sessions held at once since [`Registry::take_high_water`] last read it.
    high_water: AtomicUsize,
}

/// Removes its session from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Arc<Registry>,
    /// The session's close handle.
    pub control: Arc<SessionControl>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut s) = self.registry.sessions.lock() {
            s.remove(&self.id);
        }
    }
}

impl Registry {
    /// Adds a session; it leaves when the returned [`Registration`] drops.
    #[must_use]
    pub fn register(self: &Arc<Self>, info: SessionInfo) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(SessionControl::new(info));
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id, Arc::clone(&control));
            self.high_water.fetch_max(s.len(), Ordering::Relaxed);
        }
        Registration {
            id,
            registry: Arc::clone(self),
            control,
        }
    }

    /// Closes every session of `subject`; returns how many.
    pub fn close_subject(&self, subject: &str, request: CloseRequest) -> usize {
        self.close_where(|i| i.subject.as_deref() == Some(subject), request)
    }

    /// Closes every session opened with token `token_id`; returns how many.
    pub fn close_token(&self, token_id: &str, request: CloseRequest) -> usize {
        self.close_where(|i| i.token_id.as_deref() == Some(token_id), request)
    }

    /// What the registry knows of the sessions `pick` selects.
    pub fn sessions_where(&self, pick: impl Fn(&SessionInfo) -> bool) -> Vec<SessionInfo> {
        self.sessions.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.values()
                    .filter(|c| c.matches(&pick))
                    .map(|c| c.current())
                    .collect()
            },
        )
    }

    /// Closes every session `pick` selects; returns how many.
    pub fn close_where(&self, pick: impl Fn(&SessionInfo) -> bool, request: CloseRequest) -> usize {
        let Ok(s) = self.sessions.lock() else {
            return 0;
        };
        let mut n = 0;
        for control in s.values().filter(|c| c.matches(&pick)) {
            control.close(request);
            n += 1;
        }
        n
    }

    /// Number of live sessions.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    /// The most sessions held at once since the last call, which starts the next period at the current count.
    pub fn take_high_water(&self) -> usize {
        let now = self.len();
        self.high_water.swap(now, Ordering::Relaxed).max(now)
    }

    /// Gives back the table's spare room once it is mostly empty.
    pub fn shrink(&self) {
        if let Ok(mut s) = self.sessions.lock() {
            crate::memory::shrink_sparse(&mut s);
        }
    }

    /// Whether no session is live.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_by_subject_reaches_only_that_subject() {
        let reg = Arc::new(Registry::default());
        let info = |s: &str| SessionInfo {
            subject: Some(s.into()),
            token_id: Some(format!("{s}-jti")),
            session_id: None,
            issued_at: None,
            expires_at: 0,
            route: "/".into(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            started: SystemTime::now(),
        };
        let a = reg.register(info("alice"));
        let b = reg.register(info("bob"));
        let req = CloseRequest {
            code: 1008,
            reason: "revoked",
        };
        assert_eq!(reg.close_subject("alice", req), 1);
        assert_eq!(a.control.requested().await, req);
        b.control.refresh(Refreshed {
            token_id: Some("bob-jti-2".into()),
            session_id: None,
            issued_at: None,
            expires_at: 9,
        });
        assert_eq!(reg.close_token("bob-jti", req), 0, "the old token is gone");
        assert_eq!(reg.close_token("bob-jti-2", req), 1);
        assert_eq!(reg.sessions_where(|i| i.expires_at == 9).len(), 1);
        assert_eq!(reg.len(), 2);
        drop(b);
        assert_eq!(reg.len(), 1);
    }
}
