//! Revocations: what is revoked (a subject up to a moment, a token id, an IdP session id), the local copy that
//! admission consults without a store round trip, and closing the live sessions a revocation matches.
//!
//! A revocation reaches this process three ways (the `origin` label): the admin API, OIDC back-channel logout, or
//! a peer replica through the shared store (`store`). Each is applied the same way: into the local copy,
//! then Close 1008 "token revoked" to every matching live session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::auth::Identity;
use crate::frame;
use crate::registry::{CloseRequest, Registry, SessionInfo};

/// Most revocations held locally; beyond it expired ones are purged, then the oldest-expiring go first.
pub const MAX_REVOCATIONS: usize = 1_000_000;

/// The Close a revoked session gets.
pub const REVOKED: CloseRequest = CloseRequest {
    code: frame::CLOSE_POLICY,
    reason: "token revoked",
};

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Target {
    /// Every token of this subject issued at or before the revocation's `at`.
    Sub(String),
    /// The token with this `jti`.
    Jti(String),
    /// Every token carrying this IdP session id (`sid`).
    Sid(String),
}

impl Target {
    /// Bounded label: `sub`, `jti` or `sid`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Sub(_) => "sub",
            Target::Jti(_) => "jti",
            Target::Sid(_) => "sid",
        }
    }

    /// The named value.
    #[must_use]
    pub fn value(&self) -> &str {
        match self {
            Target::Sub(v) | Target::Jti(v) | Target::Sid(v) => v,
        }
    }
}

/// One revocation, as stored and as sent between replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    #[serde(flatten)]
    pub target: Target,
    /// When it was revoked (seconds since the epoch).
    pub at: i64,
    /// When it may be forgotten: the revoked token's expiry, or `at + REVOCATION_MAX_TTL_SECONDS`.
    pub expires_at: i64,
}

impl Revocation {
    /// Whether a token with `identity` is refused by this revocation.
    #[must_use]
    pub fn matches(
        &self,
        subject: Option<&str>,
        token_id: Option<&str>,
        sid: Option<&str>,
        iat: Option<i64>,
    ) -> bool {
        match &self.target {
            // A token without `iat` cannot prove it came after the revocation: refused.
            Target::Sub(s) => subject == Some(s.as_str()) && iat.is_none_or(|t| t <= self.at),
            Target::Jti(j) => token_id == Some(j.as_str()),
            Target::Sid(s) => sid == Some(s.as_str()),
        }
    }

    fn matches_session(&self, info: &SessionInfo) -> bool {
        self.matches(
            info.subject.as_deref(),
            info.token_id.as_deref(),
            info.session_id.as_deref(),
            info.issued_at,
        )
    }

    /// Checks what came from outside (a peer, a store row): values non-empty and bounded, times sane.
    ///
    /// # Errors
    /// What is wrong.
    pub fn validate(&self) -> Result<(), &'static str> {
        let v = self.target.value();
        if v.is_empty() || v.len() > 1024 || v.chars().any(char::is_control) {
            return Err("revoked value empty, longer than 1024 bytes, or with control characters");
        }
        if self.expires_at < self.at {
            return Err("expires before it was made");
        }
        Ok(())
    }
}

/// The local copy of every active revocation.
#[derive(Debug, Default)]
pub struct Revocations {
    map: RwLock<HashMap<Target, Revocation>>,
    /// Fast path: no revocation at all means no lock on admission.
    any: AtomicBool,
}

impl Revocations {
    /// Adds (or extends) a revocation; returns whether it was new or moved later.
    pub fn insert(&self, rev: Revocation, now: i64) -> bool {
        let Ok(mut map) = self.map.write() else {
            return false;
        };
        if map.len() >= MAX_REVOCATIONS {
            map.retain(|_, r| r.expires_at > now);
        }
        if map.len() >= MAX_REVOCATIONS {
            // Still full of live entries: drop the one that expires first rather than refuse a new revocation.
            if let Some(k) = map
                .iter()
                .min_by_key(|(_, r)| r.expires_at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&k);
            }
        }
        let changed = match map.get_mut(&rev.target) {
            Some(old) if old.at >= rev.at && old.expires_at >= rev.expires_at => false,
            Some(old) => {
                old.at = old.at.max(rev.at);
                old.expires_at = old.expires_at.max(rev.expires_at);
                true
            }
            None => {
                map.insert(rev.target.clone(), rev);
                true
            }
        };
        self.any.store(!map.is_empty(), Ordering::Release);
        changed
    }

    /// Whether `identity` is refused by an active revocation.
    #[must_use]
    pub fn is_revoked(&self, identity: &Identity, now: i64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let Ok(map) = self.map.read() else {
            // A poisoned lock: fail closed.
            return true;
        };
        let live = |t: Target| map.get(&t).filter(|r| r.expires_at > now);
        let hit = |t: Option<Target>| {
            t.and_then(live).is_some_and(|r| {
                r.matches(
                    identity.subject.as_deref(),
                    identity.token_id.as_deref(),
                    identity.session_id.as_deref(),
                    identity.issued_at,
                )
            })
        };
        hit(identity.subject.clone().map(Target::Sub))
            || hit(identity.token_id.clone().map(Target::Jti))
            || hit(identity.session_id.clone().map(Target::Sid))
    }

    /// Forgets expired revocations.
    pub fn purge(&self, now: i64) {
        if let Ok(mut map) = self.map.write() {
            map.retain(|_, r| r.expires_at > now);
            crate::memory::shrink_sparse(&mut map);
            self.any.store(!map.is_empty(), Ordering::Release);
        }
    }

    /// Active revocations held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.read().map_or(0, |m| m.len())
    }

    /// Whether none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes every live session `rev` matches; returns how many.
pub fn close_matching(registry: &Registry, rev: &Revocation) -> usize {
    registry.close_where(|info| rev.matches_session(info), REVOKED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &str, jti: &str, sid: Option<&str>, iat: Option<i64>) -> Identity {
        Identity {
            subject: Some(sub.into()),
            token_id: Some(jti.into()),
            session_id: sid.map(str::to_owned),
            issued_at: iat,
            expires_at: 10_000,
            limit_claim: None,
            claims: Vec::new(),
            roles: Vec::new(),
            forwarded: Vec::new(),
        }
    }

    #[test]
    fn subject_revocations_spare_tokens_issued_afterwards() {
        let r = Revocations::default();
        assert!(!r.is_revoked(&identity("alice", "1", None, Some(100)), 150));
        r.insert(
            Revocation {
                target: Target::Sub("alice".into()),
                at: 200,
                expires_at: 5000,
            },
            150,
        );
        assert!(r.is_revoked(&identity("alice", "1", None, Some(100)), 250));
        assert!(r.is_revoked(&identity("alice", "1", None, Some(200)), 250));
        assert!(
            r.is_revoked(&identity("alice", "1", None, None), 250),
            "no iat: refused"
        );
        assert!(
            !r.is_revoked(&identity("alice", "2", None, Some(201)), 250),
            "a fresh login"
        );
        assert!(!r.is_revoked(&identity("bob", "1", None, Some(100)), 250));
        // Expired revocations no longer count, and purge forgets them.
        assert!(!r.is_revoked(&identity("alice", "1", None, Some(100)), 6000));
        r.purge(6000);
        assert!(r.is_empty());
    }

    #[test]
    fn jti_and_sid_revocations() {
        let r = Revocations::default();
        r.insert(
            Revocation {
                target: Target::Jti("t-1".into()),
                at: 100,
                expires_at: 500,
            },
            100,
        );
        r.insert(
            Revocation {
                target: Target::Sid("s-9".into()),
                at: 100,
                expires_at: 500,
            },
            100,
        );
        assert!(r.is_revoked(&identity("a", "t-1", None, Some(1)), 200));
        assert!(!r.is_revoked(&identity("a", "t-2", None, Some(1)), 200));
        assert!(r.is_revoked(&identity("b", "t-3", Some("s-9"), Some(150)), 200));
        // Wire form: the kind and value travel flat beside the times.
        let json = serde_json::to_string(&Revocation {
            target: Target::Sid("s-9".into()),
            at: 1,
            expires_at: 2,
        })
        .expect("json");
        assert_eq!(
            json,
            r#"{"kind":"sid","value":"s-9","at":1,"expires_at":2}"#
        );
        let back: Revocation = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.target, Target::Sid("s-9".into()));
        assert!(serde_json::from_str::<Revocation>(
            r#"{"kind":"x","value":"v","at":1,"expires_at":2}"#
        )
        .is_err());
    }
}
