//! The Origin policy. Unset means no browser Origin is allowed (fail closed; the Go gateway let every Origin
//! through). Entries are exact origins (`https://app.example.com`), subdomain wildcards (`https://*.example.com`,
//! which does not match the apex), any port (`http://localhost:*`), or `*` for any origin, only when written.

/// One allowed-origin pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// Scheme, host suffix (starting with `.`), port (`None` = the scheme default, `Some("*")` = any).
    Wildcard {
        scheme: String,
        suffix: String,
        port: Option<String>,
    },
    /// Exact scheme and host, any port.
    AnyPort {
        scheme: String,
        host: String,
    },
}

/// The allowed Origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    patterns: Vec<Pattern>,
}

impl OriginPolicy {
    /// Parses the `WS_ALLOWED_ORIGINS` entries.
    ///
    /// # Errors
    /// An entry that is not `*` or `scheme://host[:port]` (with an optional `*.` host prefix or `:*` port).
    pub fn parse(entries: &[String]) -> Result<OriginPolicy, String> {
        let mut patterns = Vec::new();
        for raw in entries {
            let e = raw.trim().trim_end_matches('/').to_ascii_lowercase();
            if e == "*" {
                patterns.push(Pattern::Any);
                continue;
            }
            let (scheme, rest) = e
                .split_once("://")
                .ok_or_else(|| format!("`{raw}` is not scheme://host[:port]"))?;
            if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
                return Err(format!("`{raw}` is not scheme://host[:port]"));
            }
            let (host, port) = split_port(rest);
            if let Some(sub) = host.strip_prefix("*.") {
                if sub.is_empty() || sub.contains('*') {
                    return Err(format!("`{raw}`: a wildcard needs a domain after `*.`"));
                }
                patterns.push(Pattern::Wildcard {
                    scheme: scheme.to_owned(),
                    suffix: format!(".{sub}"),
                    port: port.map(str::to_owned),
                });
            } else if host.contains('*') {
                return Err(format!(
                    "`{raw}`: `*` is allowed only as the first label (`*.example.com`)"
                ));
            } else if port == Some("*") {
                patterns.push(Pattern::AnyPort {
                    scheme: scheme.to_owned(),
                    host: host.to_owned(),
                });
            } else {
                patterns.push(Pattern::Exact(e.clone()));
            }
        }
        Ok(OriginPolicy { patterns })
    }

    /// Whether any Origin at all is allowed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `origin` (an `Origin` header value) is allowed.
    #[must_use]
    pub fn allows(&self, origin: &str) -> bool {
        let o = origin.trim().to_ascii_lowercase();
        let Some((scheme, rest)) = o.split_once("://") else {
            // `null` and other opaque origins match only `*` or a literal entry.
            return self
                .patterns
                .iter()
                .any(|p| *p == Pattern::Any || *p == Pattern::Exact(o.clone()));
        };
        let (host, port) = split_port(rest);
        self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(e) => *e == o,
            Pattern::Wildcard {
                scheme: s,
                suffix,
                port: want,
            } => {
                s == scheme
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && match want.as_deref() {
                        Some("*") => true,
                        w => w == port,
                    }
            }
            Pattern::AnyPort { scheme: s, host: h } => s == scheme && h == host,
        })
    }
}

/// Splits `host[:port]`, keeping IPv6 brackets in the host.
fn split_port(rest: &str) -> (&str, Option<&str>) {
    if rest.starts_with('[') {
        return match rest.rsplit_once("]:") {
            Some((h, p)) => (&rest[..h.len() + 1], Some(p)),
            None => (rest, None),
        };
    }
    match rest.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(list: &[&str]) -> OriginPolicy {
        OriginPolicy::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("valid")
    }

    #[test]
    fn matching() {
        let p = policy(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:*",
        ]);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!p.allows("http://app.example.com"));
        assert!(!p.allows("https://app.example.com:8443"));
        assert!(!p.allows("https://app.example.com.evil.net"));
        assert!(p.allows("https://a.b.example.org"));
        assert!(
            !p.allows("https://example.org"),
            "wildcard does not match the apex"
        );
        assert!(!p.allows("https://evilexample.org"));
        assert!(p.allows("http://localhost:5173"));
        assert!(!p.allows("null"));
        assert!(policy(&["*"]).allows("null"));
        assert!(
            !policy(&[]).allows("https://app.example.com"),
            "unset refuses every Origin"
        );
    }

    #[test]
    fn bad_entries() {
        for bad in [
            "example.com",
            "https://",
            "https://a.*.com",
            "https://*.",
            "https://a/b",
        ] {
            assert!(OriginPolicy::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
