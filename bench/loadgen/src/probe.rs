//! What `churn` reads from and asks of the gateway: its open file count and RSS from `/proc`, its session gauge and
//! close counters from the admin listener's `/metrics`, and `POST /admin/revoke` to close one session by `jti`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest `/metrics` answer read.
const MAX_METRICS: usize = 1 << 20;
/// Time allowed for one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway process and its admin listener.
pub(crate) struct Gateway {
    pub(crate) pid: u32,
    pub(crate) admin: SocketAddr,
}

/// One reading of the gateway's resources.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resources {
    pub(crate) fds: u64,
    /// VmRSS: what the pass/fail check uses.
    pub(crate) rss_kib: u64,
    /// RssAnon (heap, stacks): where a leak would show.
    pub(crate) anon_kib: u64,
    /// RssFile (the binary and libraries paged in): grows as new code paths run, whatever the sessions do.
    pub(crate) file_kib: u64,
}

impl Gateway {
    /// Open file descriptors (entries of `/proc/PID/fd`) and the RSS figures of `/proc/PID/status`.
    pub(crate) fn resources(&self) -> Result<Resources, String> {
        let dir = format!("/proc/{}/fd", self.pid);
        let fds = std::fs::read_dir(&dir)
            .map_err(|e| format!("reading {dir}: {e}"))?
            .count() as u64;
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{path} has no {name}"))
        };
        Ok(Resources {
            fds,
            rss_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:")?,
            file_kib: field("RssFile:")?,
        })
    }

    /// The `/metrics` text.
    pub(crate) async fn metrics(&self) -> Result<String, String> {
        let admin = self.admin;
        let scrape = async {
            let mut tcp = TcpStream::connect(admin).await?;
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .await?;
            let mut body = Vec::new();
            (&mut tcp)
                .take(MAX_METRICS as u64)
                .read_to_end(&mut body)
                .await?;
            Ok::<_, std::io::Error>(body)
        };
        let body = tokio::time::timeout(SCRAPE_TIMEOUT, scrape)
            .await
            .map_err(|_| format!("scraping http://{admin}/metrics timed out"))?
            .map_err(|e| format!("scraping http://{admin}/metrics: {e}"))?;
        let text = String::from_utf8_lossy(&body);
        if !text.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "http://{admin}/metrics answered {:?}",
                text.lines().next().unwrap_or("")
            ));
        }
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    }

    /// `POST /admin/revoke` of one token id, authenticated with the admin secret; the HTTP status.
    pub(crate) async fn revoke_jti(
        &self,
        secret: &str,
        jti: &str,
        exp: i64,
    ) -> Result<u16, String> {
        let admin = self.admin;
        let body = serde_json::json!({"jti": jti, "exp": exp, "reason": "churn"}).to_string();
        let req = format!(
            "POST /admin/revoke HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {secret}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let call = async {
            let mut tcp = TcpStream::connect(admin).await?;
            tcp.write_all(req.as_bytes()).await?;
            let mut resp = Vec::new();
            (&mut tcp).take(64 * 1024).read_to_end(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let resp = tokio::time::timeout(SCRAPE_TIMEOUT, call)
            .await
            .map_err(|_| "the revoke call timed out".to_string())?
            .map_err(|e| format!("the revoke call: {e}"))?;
        // "HTTP/1.1 200 OK": the status is the second word of the first line.
        String::from_utf8_lossy(&resp)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "the revoke call got no HTTP status".to_string())
    }

    /// `ws_active_sessions` now.
    pub(crate) async fn active_sessions(&self) -> Result<u64, String> {
        let text = self.metrics().await?;
        sample(&text, "ws_active_sessions")
            .map(|v| v.max(0.0) as u64)
            .ok_or_else(|| "/metrics has no ws_active_sessions".to_string())
    }
}

/// The value of an unlabelled sample.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The samples of `name` by the value of `label` (e.g. `ws_session_closes_total` by `reason`).
pub(crate) fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let open = format!("{label}=\"");
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(v) = labels
            .split_once(&open)
            .and_then(|(_, r)| r.split_once('"'))
        else {
            continue;
        };
        if let Some(x) = value.split_whitespace().next().and_then(|x| x.parse().ok()) {
            out.insert(v.0.to_owned(), x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ws_active_sessions Sessions relaying now.\n\
        # TYPE ws_active_sessions gauge\n\
        ws_active_sessions 3\n\
        ws_active_sessions_other 9\n\
        ws_session_closes_total{reason=\"closed\"} 10\n\
        ws_session_closes_total{reason=\"token_expired\"} 2\n\
        # EOF\n";

    #[test]
    fn reads_samples() {
        assert_eq!(sample(TEXT, "ws_active_sessions"), Some(3.0));
        assert_eq!(sample(TEXT, "ws_missing"), None);
        let closes = by_label(TEXT, "ws_session_closes_total", "reason");
        assert_eq!(closes.get("closed"), Some(&10.0));
        assert_eq!(closes.get("token_expired"), Some(&2.0));
        assert_eq!(closes.len(), 2);
    }
}
