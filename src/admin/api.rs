//! The authenticated admin API and OIDC back-channel logout, on the admin listener only.
//!
//! - `POST /admin/revoke` `{"sub"?, "jti"?, "sid"?, "exp"?, "reason"?}`: revoke; 200, or 202 when the shared store
//!   is unreachable (applied here at once, stored when the store is back).
//! - `GET /admin/sessions?sub=…`: this replica's sessions of a subject.
//! - `POST /oidc/backchannel-logout` (form `logout_token=…`): OpenID Connect Back-Channel Logout 1.0; the logout
//!   token authenticates itself.
//!
//! Admin calls carry `Authorization: Bearer <secret from ADMIN_TOKEN_FILE>` (compared in constant time), or a JWT
//! verified against the JWKS that carries the admin role. No credentials: 401; wrong role or token: 403; admin API
//! not turned on: 403 saying how.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::jwt::{check_claims, unix_now};
use crate::auth::source::bearer;
use crate::revocation::{Revocation, Target};
use crate::server::Gateway;

/// Largest request body accepted by the API.
const MAX_BODY: usize = 64 * 1024;
/// The `events` member a logout token must carry.
const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// Logout token ids remembered against replay.
const MAX_SEEN_JTIS: usize = 100_000;

/// Logout token `jti`s already used, with when they may be forgotten (bounded).
#[derive(Debug, Default)]
pub(crate) struct SeenLogoutTokens {
    seen: Mutex<HashMap<String, i64>>,
}

impl SeenLogoutTokens {
    /// Records `jti` until `until`; `false` when it was already seen (a replay).
    fn first_use(&self, jti: &str, until: i64, now: i64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if seen.get(jti).is_some_and(|t| *t > now) {
            return false;
        }
        if seen.len() >= MAX_SEEN_JTIS {
            seen.retain(|_, t| *t > now);
        }
        if seen.len() >= MAX_SEEN_JTIS {
            // Still full of live entries: forget the one that expires first.
            if let Some(k) = seen.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                seen.remove(&k);
            }
        }
        seen.insert(jti.to_owned(), until);
        true
    }
}

/// Whether `path` is served here.
#[must_use]
pub(super) fn handles(path: &str) -> bool {
    matches!(
        path,
        "/admin/revoke" | "/admin/sessions" | "/oidc/backchannel-logout"
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

/// Serves one API request.
pub(super) async fn serve(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/oidc/backchannel-logout") => backchannel_logout(&gw, req).await,
        (Method::POST, "/admin/revoke") => match authorize(&gw, &req).await {
            Ok(()) => revoke(&gw, req).await,
            Err(resp) => resp,
        },
        (Method::GET, "/admin/sessions") => match authorize(&gw, &req).await {
            Ok(()) => sessions(&gw, &req),
            Err(resp) => resp,
        },
        _ => {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see the README's admin API",
            );
            let allow = if path == "/admin/sessions" {
                "GET"
            } else {
                "POST"
            };
            resp.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
    }
}

/// The admin secret or an admin JWT; the error is the answer to send.
async fn authorize(gw: &Gateway, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let config = &gw.config;
    if config.admin_token.is_none() && config.admin_role.is_none() {
        return Err(error(
            StatusCode::FORBIDDEN,
            "admin_api_off",
            "the admin API is off: set ADMIN_TOKEN_FILE (a file holding a secret of at least 16 characters) or \
             ADMIN_REQUIRED_ROLE (a role admin JWTs carry)",
        ));
    }
    let presented = req
        .headers()
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(bearer)
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "invalid_request",
            "Authorization: Bearer required",
        );
        resp.headers_mut()
            .insert("WWW-Authenticate", HeaderValue::from_static("Bearer"));
        return Err(resp);
    };
    if let Some(secret) = &config.admin_token {
        if constant_time_eq(presented.as_bytes(), secret.0.as_bytes()) {
            return Ok(());
        }
    }
    let forbidden = |why: &str| error(StatusCode::FORBIDDEN, "forbidden", why);
    let Some(role) = &config.admin_role else {
        return Err(forbidden("wrong admin token"));
    };
    // Not the secret: it must be a JWT that verifies, with valid claims and the role.
    let claims = match gw.verifier.verify_signature(presented).await {
        Ok(c) => c,
        Err(_) => return Err(forbidden("not the admin token, nor a valid admin JWT")),
    };
    let payload = Value::Object(claims);
    let bytes = payload.to_string();
    if check_claims(bytes.as_bytes(), gw.verifier.policy(), unix_now()).is_err() {
        return Err(forbidden("admin JWT claims not valid"));
    }
    if has_role(&payload, role) {
        Ok(())
    } else {
        Err(forbidden("the token lacks the admin role"))
    }
}

/// Compares the SHA-256 digests of both, so the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether `claims` grant `role` in `scope`/`scp` (space-separated or array), `roles`, `realm_access.roles` or
/// `resource_access.*.roles`.
#[must_use]
pub(super) fn has_role(claims: &Value, role: &str) -> bool {
    let in_list = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.split_whitespace().any(|r| r == role),
        Some(Value::Array(a)) => a.iter().any(|r| r.as_str() == Some(role)),
        _ => false,
    };
    in_list(claims.get("scope"))
        || in_list(claims.get("scp"))
        || in_list(claims.get("roles"))
        || in_list(claims.pointer("/realm_access/roles"))
        || claims
            .get("resource_access")
            .and_then(Value::as_object)
            .is_some_and(|clients| clients.values().any(|c| in_list(c.get("roles"))))
}

async fn body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "body larger than 64 KiB or unreadable",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    /// When the revoked token expires, if the caller knows.
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let bytes = match body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let parsed: RevokeBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("expected JSON with sub, jti and/or sid: {e}"),
            )
        }
    };
    let now = unix_now();
    let ttl_end = now.saturating_add(gw.config.revocation_max_ttl);
    // A jti or sid lasts until the revoked token would expire: as the caller says, as a live session here knows,
    // or the longest a revocation lasts.
    let token_exp = |pick: &dyn Fn(&crate::registry::SessionInfo) -> bool| {
        parsed
            .exp
            .or_else(|| {
                gw.registry
                    .sessions_where(pick)
                    .iter()
                    .map(|i| i.expires_at)
                    .max()
            })
            .map_or(ttl_end, |e| e.clamp(now, ttl_end))
    };
    let mut targets = Vec::new();
    // With a jti, the subject only narrows the Go body `{"sub","jti"}`: it revokes that token, not the user.
    match (&parsed.sub, &parsed.jti) {
        (Some(sub), None) if parsed.sid.is_none() => {
            targets.push((Target::Sub(sub.clone()), ttl_end))
        }
        _ => {}
    }
    if let Some(jti) = &parsed.jti {
        let until = token_exp(&|i| i.token_id.as_deref() == Some(jti.as_str()));
        targets.push((Target::Jti(jti.clone()), until));
    }
    if let Some(sid) = &parsed.sid {
        let until = token_exp(&|i| i.session_id.as_deref() == Some(sid.as_str()));
        targets.push((Target::Sid(sid.clone()), until));
    }
    if targets.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name at least one of sub, jti, sid",
        );
    }
    let mut closed = 0;
    let mut stored = true;
    let mut revoked = Vec::new();
    for (target, expires_at) in targets {
        let rev = Revocation {
            target,
            at: now,
            expires_at,
        };
        if let Err(why) = rev.validate() {
            return error(StatusCode::BAD_REQUEST, "invalid_request", why);
        }
        closed += gw.apply_revocation(&rev, "api");
        stored &= gw.store.publish(&rev).await;
        revoked.push(json!({"kind": rev.target.kind(), "value": rev.target.value(), "expires_at": rev.expires_at}));
    }
    if let (Some(sub), Some(jti)) = (&parsed.sub, &parsed.jti) {
        gw.store.publish_go(sub, jti).await;
    }
    let kinds: Vec<&str> = revoked.iter().filter_map(|r| r["kind"].as_str()).collect();
    tracing::info!(event = "revoked", origin = "api", kinds = %kinds.join(","), sessions_closed = closed,
        stored, reason = parsed.reason.as_deref().unwrap_or(""), "revocation applied");
    let status = if stored {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    json_response(
        status,
        &json!({
            "revoked": revoked,
            "sessions_closed": closed,
            "stored": stored,
            "note": if stored { "stored and published to every replica" } else {
                "the shared store is unreachable: applied on this replica, and stored when the store is back" },
        }),
    )
}

fn sessions(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let sub = req.uri().query().and_then(|q| {
        q.split('&').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k == "sub").then(|| crate::auth::source::percent_decode(v))
        })
    });
    let Some(sub) = sub.filter(|s| !s.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "sub= required");
    };
    let list: Vec<Value> = gw
        .registry
        .sessions_where(|i| i.subject.as_deref() == Some(sub.as_str()))
        .into_iter()
        .map(|i| {
            let since = i
                .started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            json!({"route": i.route, "peer": i.peer.to_string(), "since": since, "jti": i.token_id, "sid": i.session_id})
        })
        .collect();
    json_response(StatusCode::OK, &json!({"sub": sub, "sessions": list}))
}

/// OpenID Connect Back-Channel Logout 1.0, section 2.6.
async fn backchannel_logout(gw: &Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let bad = |why: &str| error(StatusCode::BAD_REQUEST, "invalid_request", why);
    let bytes = match body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let Ok(form) = std::str::from_utf8(&bytes) else {
        return bad("form body is not UTF-8");
    };
    let token = form.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == "logout_token").then(|| crate::auth::source::percent_decode(v))
    });
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return bad("logout_token missing");
    };
    let claims = match gw.verifier.verify_signature(&token).await {
        Ok(c) => c,
        Err(e) => return bad(&format!("logout token: {e}")),
    };
    let now = unix_now();
    let policy = gw.verifier.policy();
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(want) = &policy.issuer {
        if text("iss") != Some(want.as_str()) {
            return bad("logout token: wrong issuer");
        }
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let aud_ok = match &gw.config.oidc_client_id {
        Some(id) => audiences.contains(&id.as_str()),
        None if policy.audiences.is_empty() => !audiences.is_empty(),
        None => policy
            .audiences
            .iter()
            .any(|w| audiences.contains(&w.as_str())),
    };
    if !aud_ok {
        return bad("logout token: wrong audience");
    }
    let Some(iat) = claims.get("iat").and_then(Value::as_i64) else {
        return bad("logout token: iat missing");
    };
    if iat > now + policy.leeway {
        return bad("logout token: issued in the future");
    }
    if let Some(exp) = claims.get("exp").and_then(Value::as_i64) {
        if exp <= now - policy.leeway {
            return bad("logout token: expired");
        }
    }
    let Some(jti) = text("jti") else {
        return bad("logout token: jti missing");
    };
    let event_ok = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|e| e.get(LOGOUT_EVENT))
        .is_some_and(Value::is_object);
    if !event_ok {
        return bad("logout token: the back-channel logout event is missing");
    }
    if claims.contains_key("nonce") {
        return bad("logout token: nonce is forbidden");
    }
    let (sub, sid) = (text("sub"), text("sid"));
    let target = match (sid, sub) {
        (Some(sid), _) => Target::Sid(sid.to_owned()),
        (None, Some(sub)) => Target::Sub(sub.to_owned()),
        (None, None) => return bad("logout token: neither sub nor sid"),
    };
    let until = now.saturating_add(gw.config.revocation_max_ttl);
    if !gw.logout_jtis.first_use(jti, until, now) {
        return bad("logout token: replayed jti");
    }
    let rev = Revocation {
        target,
        at: now,
        expires_at: until,
    };
    if rev.validate().is_err() {
        return bad("logout token: sub or sid not usable");
    }
    let closed = gw.apply_revocation(&rev, "backchannel");
    let stored = gw.store.publish(&rev).await;
    tracing::info!(
        event = "revoked",
        origin = "backchannel",
        kinds = rev.target.kind(),
        sessions_closed = closed,
        stored,
        "back-channel logout applied"
    );
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_every_place_keycloak_and_others_put_them() {
        let role = "ws-gateway-admin";
        for claims in [
            json!({"scope": "openid ws-gateway-admin"}),
            json!({"scp": ["x", "ws-gateway-admin"]}),
            json!({"roles": ["ws-gateway-admin"]}),
            json!({"realm_access": {"roles": ["ws-gateway-admin"]}}),
            json!({"resource_access": {"gw": {"roles": ["ws-gateway-admin"]}}}),
        ] {
            assert!(has_role(&claims, role), "{claims}");
        }
        for claims in [
            json!({"scope": "openid ws-gateway-admins"}),
            json!({"roles": "ws-gateway-admin-not"}),
            json!({}),
        ] {
            assert!(!has_role(&claims, role), "{claims}");
        }
    }

    #[test]
    fn constant_time_compare_and_replays() {
        assert!(constant_time_eq(b"secret-secret-16", b"secret-secret-16"));
        assert!(!constant_time_eq(b"secret-secret-16", b"secret-secret-17"));
        let seen = SeenLogoutTokens::default();
        assert!(seen.first_use("a", 100, 10));
        assert!(!seen.first_use("a", 100, 20));
        assert!(seen.first_use("a", 200, 150), "forgotten once expired");
    }
}
