//! The HTTP client for the identity provider: JWKS fetches and OpenID Connect discovery, on reqwest.
//!
//! This is the control plane, off the data path, so it stands on the ecosystem's HTTP client rather than a
//! hand-written one (whose chunked decoder once aborted the process on a wrapping chunk size). What it keeps from
//! before: TLS through the gateway's rustls configuration (ring provider, webpki roots plus `JWKS_CA_FILE`), a size
//! cap on every body, and one deadline over each exchange. What it adds: `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`
//! from the environment, redirects (at most 5, never from https to http), and gzip bodies.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::net::Url;

/// Most redirects followed for one fetch.
const MAX_REDIRECTS: usize = 5;

/// A client for the identity provider's endpoints.
#[derive(Debug, Clone)]
pub struct IdpClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl IdpClient {
    /// A client with `tls` for https endpoints and `timeout` over each whole exchange.
    ///
    /// # Errors
    /// reqwest refuses the TLS configuration.
    pub fn new(tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Result<IdpClient, String> {
        // reqwest built without a provider looks for the process default; make it ring (a no-op when set).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = (**tls).clone();
        // reqwest speaks HTTP/1.1 only here (no http2 feature); the gateway's config may name other protocols.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt
                .previous()
                .last()
                .is_some_and(|u| u.scheme() == "https")
                && attempt.url().scheme() != "https";
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if downgrade {
                attempt.error("redirect from https to http refused")
            } else {
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(redirects)
            .timeout(timeout)
            .user_agent(concat!("ws-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(IdpClient { http, timeout })
    }

    /// GETs `url` and returns its body: status 200 required, at most `max` bytes (decompressed), within the
    /// client's deadline.
    ///
    /// # Errors
    /// Connect, TLS, proxy or redirect failures, a status other than 200, a body over `max`, or the deadline; the
    /// message names no secret (the URL's query is not included).
    pub async fn get(&self, url: &Url, max: usize) -> Result<Vec<u8>, String> {
        let exchange = async {
            let mut resp = self
                .http
                .get(url.request_url())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(describe)?;
            let status = resp.status();
            if status != reqwest::StatusCode::OK {
                return Err(format!("status {}", status.as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > max as u64) {
                return Err(format!("response larger than {max} bytes"));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(describe)? {
                if body.len() + chunk.len() > max {
                    return Err(format!("response larger than {max} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("timed out after {}s", self.timeout.as_secs()))?
    }

    /// OpenID Connect discovery: reads `{issuer}/.well-known/openid-configuration` and returns its `jwks_uri`.
    ///
    /// # Errors
    /// The fetch fails, the document is not JSON, its `issuer` differs from `issuer`, or `jwks_uri` is missing,
    /// not an http(s) URL, or plain http under an https issuer.
    pub async fn discover(&self, issuer: &Url) -> Result<Url, String> {
        let base = issuer.to_string();
        let well_known = format!(
            "{}/.well-known/openid-configuration",
            base.trim_end_matches('/')
        );
        let url = Url::parse_http(&well_known)?;
        let body = self.get(&url, 256 * 1024).await?;
        jwks_uri(&body, &base)
    }
}

/// The `jwks_uri` of a discovery document, checked against the configured issuer.
///
/// # Errors
/// As for [`IdpClient::discover`].
pub fn jwks_uri(body: &[u8], issuer: &str) -> Result<Url, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("discovery document: not JSON: {e}"))?;
    let said = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
    if said.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err("discovery document names another issuer".into());
    }
    let uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("discovery document has no jwks_uri")?;
    let url = Url::parse_http(uri).map_err(|e| format!("discovery jwks_uri: {e}"))?;
    if issuer.starts_with("https://") && !uri.starts_with("https://") {
        return Err("discovery jwks_uri is plain http under an https issuer".into());
    }
    Ok(url)
}

fn describe(e: reqwest::Error) -> String {
    // reqwest's Display names the URL with its query; say what failed without it.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connect failed"
    } else if e.is_redirect() {
        "redirect refused"
    } else if e.is_body() || e.is_decode() {
        "body could not be read"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_documents_are_checked() {
        let issuer = "https://idp/realms/r";
        let ok = br#"{"issuer":"https://idp/realms/r","jwks_uri":"https://idp/realms/r/certs"}"#;
        assert_eq!(
            jwks_uri(ok, issuer).expect("ok").to_string(),
            "https://idp/realms/r/certs"
        );
        for bad in [
            &br#"{"issuer":"https://evil","jwks_uri":"https://idp/certs"}"#[..],
            br#"{"issuer":"https://idp/realms/r","jwks_uri":"http://idp/certs"}"#,
            br#"{"issuer":"https://idp/realms/r","jwks_uri":"ftp://idp/certs"}"#,
            br#"{"issuer":"https://idp/realms/r"}"#,
            br#"{"issuer":"https://idp/realms/r","jwks_uri":7}"#,
            b"<html>",
        ] {
            assert!(
                jwks_uri(bad, issuer).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
