//! Path prefix to upstream: the Go gateway's `routes.yaml`, read unchanged, plus `UPSTREAM_WS_URL` as the fallback.
//!
//! The file is a YAML list (or a mapping with a `routes:` list) of entries with `prefix`, `upstream`,
//! `copySubProtocol` and `preserveQuery`. `upstream` is one URL (the Go format) or a list of them. The first entry
//! whose prefix starts the request path wins; the fallback matches every path.

use std::path::Path;

use serde::Deserialize;

use crate::config::CommaList;
use crate::mqtt_acl::Template;
use crate::net::WsUrl;

/// Most upstream URLs one route lists (each may resolve to several endpoints, capped apart).
pub const MAX_UPSTREAM_URLS: usize = 64;

/// One route: where requests under `prefix` go and what of the request travels with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path prefix (`/` for the fallback).
    pub prefix: String,
    /// The upstream URLs, at least one: every address each resolves to is an endpoint.
    pub upstreams: Vec<WsUrl>,
    /// Forward the client's `Sec-WebSocket-Protocol` offer (token entries are always removed).
    pub copy_subprotocol: bool,
    /// Forward the client's query string (the token parameter is always removed).
    pub preserve_query: bool,
    /// Accept the JWT as the MQTT CONNECT password on this route.
    pub mqtt_connect_auth: Option<bool>,
    /// `MQTT_USERNAME_CLAIM` on this route (`mqttUsernameClaim`, or `mqtt_username_claim`); `None` takes the
    /// global setting.
    pub mqtt_username_claim: Option<String>,
    /// `MQTT_PUBLISH_ACL` on this route (`mqttPublishAcl`, or `mqtt_publish_acl`); `None` takes the global setting.
    pub mqtt_publish_acl: Option<Vec<Template>>,
    /// `MQTT_SUBSCRIBE_ACL` on this route (`mqttSubscribeAcl`, or `mqtt_subscribe_acl`); `None` takes the global
    /// setting.
    pub mqtt_subscribe_acl: Option<Vec<Template>>,
}

impl Route {
    /// Whether the route names an MQTT setting of its own, so every session on it is MQTT.
    #[must_use]
    pub fn has_mqtt_settings(&self) -> bool {
        self.mqtt_username_claim.is_some()
            || self.mqtt_publish_acl.is_some()
            || self.mqtt_subscribe_acl.is_some()
    }

    /// The path and query to request from `upstream` (one of this route's URLs) for a client request target.
    ///
    /// An upstream URL with a path is the full target; one without (`ws://host:port` or `/`) receives the client's
    /// path. The upstream URL's own query comes first, then the client's when `preserveQuery` holds.
    #[must_use]
    pub fn upstream_target(
        &self,
        upstream: &WsUrl,
        client_path: &str,
        client_query: Option<&str>,
    ) -> String {
        let mut target = if upstream.has_path {
            upstream.path().to_owned()
        } else {
            client_path.to_owned()
        };
        let mut parts: Vec<&str> = Vec::new();
        if let Some(q) = upstream.query().filter(|q| !q.is_empty()) {
            parts.push(q);
        }
        if self.preserve_query {
            if let Some(q) = client_query.filter(|q| !q.is_empty()) {
                parts.push(q);
            }
        }
        if !parts.is_empty() {
            target.push('?');
            target.push_str(&parts.join("&"));
        }
        target
    }
}

/// The ordered routes and the fallback.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// A route file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not have the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An entry is invalid.
    #[error("{path}: route {index} (prefix `{prefix}`): {message}")]
    Entry {
        /// The file.
        path: String,
        /// 1-based position in the list.
        index: usize,
        /// Its prefix.
        prefix: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteEntry {
    prefix: String,
    upstream: OneOrMany,
    #[serde(default)]
    copy_sub_protocol: Option<bool>,
    #[serde(default)]
    preserve_query: Option<bool>,
    #[serde(default)]
    mqtt_connect_auth: Option<bool>,
    #[serde(default, alias = "mqtt_username_claim")]
    mqtt_username_claim: Option<String>,
    #[serde(default, alias = "mqtt_publish_acl")]
    mqtt_publish_acl: Option<CommaList>,
    #[serde(default, alias = "mqtt_subscribe_acl")]
    mqtt_subscribe_acl: Option<CommaList>,
}

/// `upstream:` as one URL (the Go format) or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RouteFile {
    List(Vec<RouteEntry>),
    Wrapped { routes: Vec<RouteEntry> },
}

impl RouteTable {
    /// Routes in order, then the fallback (prefix `/`) when `fallback` lists any URL.
    #[must_use]
    pub fn new(mut routes: Vec<Route>, fallback: Vec<WsUrl>) -> RouteTable {
        if !fallback.is_empty() {
            routes.push(Route {
                prefix: "/".to_owned(),
                upstreams: fallback,
                copy_subprotocol: true,
                preserve_query: true,
                mqtt_connect_auth: None,
                mqtt_username_claim: None,
                mqtt_publish_acl: None,
                mqtt_subscribe_acl: None,
            });
        }
        RouteTable { routes }
    }

    /// Reads a `routes.yaml`.
    ///
    /// # Errors
    /// Unreadable file, bad YAML, an unknown key, a prefix not starting with `/`, or a bad upstream URL.
    pub fn from_file(path: &Path, fallback: Vec<WsUrl>) -> Result<RouteTable, RouteError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
            path: name.clone(),
            source,
        })?;
        RouteTable::from_yaml(&text, &name, fallback)
    }

    /// Parses the text of a `routes.yaml`; `name` is used in errors.
    ///
    /// # Errors
    /// As for [`RouteTable::from_file`].
    pub fn from_yaml(
        text: &str,
        name: &str,
        fallback: Vec<WsUrl>,
    ) -> Result<RouteTable, RouteError> {
        let entries = if text.trim().is_empty() {
            Vec::new()
        } else {
            match serde_saphyr::from_str::<RouteFile>(text) {
                Ok(RouteFile::List(v) | RouteFile::Wrapped { routes: v }) => v,
                Err(_) => {
                    // The untagged enum hides the real problem; ask the list shape again for its message.
                    let message = match serde_saphyr::from_str::<Vec<RouteEntry>>(text) {
                        Err(e) => e.to_string(),
                        Ok(_) => "expected a list of routes".to_owned(),
                    };
                    return Err(RouteError::Parse {
                        path: name.to_owned(),
                        message,
                    });
                }
            }
        };
        let mut routes = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let bad = |message: String| RouteError::Entry {
                path: name.to_owned(),
                index: i + 1,
                prefix: e.prefix.clone(),
                message,
            };
            if !e.prefix.starts_with('/') {
                return Err(bad("prefix must start with `/`".into()));
            }
            let urls = match &e.upstream {
                OneOrMany::One(u) => std::slice::from_ref(u),
                OneOrMany::Many(list) => list.as_slice(),
            };
            if urls.is_empty() || urls.len() > MAX_UPSTREAM_URLS {
                return Err(bad(format!(
                    "upstream: between 1 and {MAX_UPSTREAM_URLS} URLs, got {}",
                    urls.len()
                )));
            }
            let upstreams = urls
                .iter()
                .map(|u| WsUrl::parse_ws(u).map_err(|m| bad(format!("upstream: {m}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let mqtt_username_claim = match e.mqtt_username_claim.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(c) if c.len() <= 128 && !c.chars().any(char::is_control) => Some(c.to_owned()),
                Some(_) => {
                    return Err(bad(
                        "mqttUsernameClaim: a claim name of at most 128 printable characters"
                            .into(),
                    ))
                }
            };
            let acl = |v: &Option<CommaList>, key: &str| match v {
                None => Ok(None),
                Some(list) => {
                    crate::config::templates(&list.0).map_err(|m| bad(format!("{key}: {m}")))
                }
            };
            let mqtt_publish_acl = acl(&e.mqtt_publish_acl, "mqttPublishAcl")?;
            let mqtt_subscribe_acl = acl(&e.mqtt_subscribe_acl, "mqttSubscribeAcl")?;
            routes.push(Route {
                prefix: e.prefix.clone(),
                upstreams,
                copy_subprotocol: e.copy_sub_protocol.unwrap_or(true),
                preserve_query: e.preserve_query.unwrap_or(true),
                mqtt_connect_auth: e.mqtt_connect_auth,
                mqtt_username_claim,
                mqtt_publish_acl,
                mqtt_subscribe_acl,
            });
        }
        Ok(RouteTable::new(routes, fallback))
    }

    /// The first route whose prefix starts `path` on a segment boundary: `/feed` matches `/feed` and `/feed/x`,
    /// not `/feedback-admin`. A prefix ending in `/` matches everything under it.
    #[must_use]
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.position(path).map(|i| &self.routes[i])
    }

    /// The position of [`RouteTable::find`]'s route in [`RouteTable::routes`].
    #[must_use]
    pub fn position(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| {
            path.strip_prefix(r.prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || r.prefix.ends_with('/') || rest.starts_with('/')
            })
        })
    }

    /// Every route in order, the fallback last.
    #[must_use]
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether no route is configured at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Number of routes, the fallback included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Adds a fallback route when none is configured (used by `--dev` for its echo upstream).
    pub fn set_fallback_if_empty(&mut self, upstream: WsUrl) {
        if !self.routes.iter().any(|r| r.prefix == "/") {
            *self = RouteTable::new(std::mem::take(&mut self.routes), vec![upstream]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_FORMAT: &str = "\
- prefix: /mqtt
  upstream: ws://rabbit:15675/ws
  copySubProtocol: true
  preserveQuery: false
- prefix: /raw
  upstream: wss://backend.internal
";

    #[test]
    fn the_topic_rules_are_route_keys_as_a_string_or_a_list_in_either_spelling() {
        let t = RouteTable::from_yaml(
            "- prefix: /a\n  upstream: ws://a:1\n  mqttPublishAcl: 'devices/{sub}/#, t/{claim:tenant}/#'\n\
             - prefix: /b\n  upstream: ws://b:1\n  mqtt_subscribe_acl:\n  - 'devices/{sub}/#'\n\
             - prefix: /c\n  upstream: ws://c:1\n",
            "r.yaml",
            Vec::new(),
        )
        .expect("valid");
        let r = t.routes();
        let names = |v: &Option<Vec<Template>>| {
            v.as_ref()
                .map(|ts| ts.iter().map(|t| t.as_str().to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(
            names(&r[0].mqtt_publish_acl),
            Some(vec!["devices/{sub}/#".into(), "t/{claim:tenant}/#".into()])
        );
        assert_eq!(
            names(&r[1].mqtt_subscribe_acl),
            Some(vec!["devices/{sub}/#".into()])
        );
        assert!(r[0].has_mqtt_settings() && r[1].has_mqtt_settings() && !r[2].has_mqtt_settings());
        let e = RouteTable::from_yaml(
            "- prefix: /a\n  upstream: ws://a:1\n  mqttPublishAcl: 'a/#/b'\n",
            "r.yaml",
            Vec::new(),
        )
        .expect_err("invalid filter");
        assert!(e.to_string().contains("mqttPublishAcl"), "{e}");
    }

    #[test]
    fn the_mqtt_username_claim_is_a_route_key_in_either_spelling() {
        let t = RouteTable::from_yaml(
            "- prefix: /a\n  upstream: ws://a:1\n  mqttUsernameClaim: sub\n\
             - prefix: /b\n  upstream: ws://b:1\n  mqtt_username_claim: ' tenant '\n\
             - prefix: /c\n  upstream: ws://c:1\n",
            "routes.yaml",
            Vec::new(),
        )
        .expect("valid");
        let claims: Vec<_> = t
            .routes()
            .iter()
            .map(|r| r.mqtt_username_claim.as_deref())
            .collect();
        assert_eq!(claims, vec![Some("sub"), Some("tenant"), None]);
        let long = format!(
            "- prefix: /a\n  upstream: ws://a:1\n  mqttUsernameClaim: {}\n",
            "c".repeat(129)
        );
        assert!(RouteTable::from_yaml(&long, "routes.yaml", Vec::new()).is_err());
    }

    #[test]
    fn first_matching_prefix_wins_and_fallback_catches_the_rest() {
        let fallback = vec![WsUrl::parse_ws("ws://fallback:1/").expect("url")];
        let t = RouteTable::from_yaml(GO_FORMAT, "routes.yaml", fallback).expect("parses");
        assert_eq!(
            t.find("/mqtt/x").expect("route").upstreams[0].host,
            "rabbit"
        );
        assert_eq!(
            t.find("/raw").expect("route").upstreams[0].host,
            "backend.internal"
        );
        assert_eq!(
            t.find("/other").expect("fallback").upstreams[0].host,
            "fallback"
        );
        assert_eq!(t.position("/other"), Some(2));
        let t = RouteTable::from_yaml(GO_FORMAT, "routes.yaml", vec![]).expect("parses");
        assert!(t.find("/other").is_none());
        // Prefixes match whole segments only.
        assert!(t.find("/rawfeed").is_none());
        assert!(t.find("/raw/").is_some() && t.find("/raw/x").is_some());
        let t = RouteTable::from_yaml("- prefix: /feed/\n  upstream: ws://a/\n", "r", vec![])
            .expect("parses");
        assert!(t.find("/feed/x").is_some() && t.find("/feedback-admin").is_none());
    }

    #[test]
    fn wrapped_form_and_targets() {
        let wrapped = "routes:\n  - prefix: /mqtt\n    upstream: ws://rabbit:15675/ws\n    preserveQuery: false\n  \
- prefix: /raw\n    upstream: wss://backend.internal\n";
        let t = RouteTable::from_yaml(wrapped, "r", vec![]).expect("wrapped");
        let mqtt = t.find("/mqtt").expect("route");
        assert_eq!(
            mqtt.upstream_target(&mqtt.upstreams[0], "/mqtt", Some("a=1")),
            "/ws"
        );
        let raw = t.find("/raw/feed").expect("route");
        assert_eq!(
            raw.upstream_target(&raw.upstreams[0], "/raw/feed", Some("a=1")),
            "/raw/feed?a=1"
        );
    }

    #[test]
    fn upstream_may_be_a_list() {
        let yaml = "- prefix: /mqtt\n  upstream:\n    - ws://broker-0:9001/mqtt\n    - ws://broker-1:9001\n";
        let t = RouteTable::from_yaml(yaml, "r", vec![]).expect("list");
        let r = t.find("/mqtt/x").expect("route");
        let hosts: Vec<&str> = r.upstreams.iter().map(|u| u.host.as_str()).collect();
        assert_eq!(hosts, ["broker-0", "broker-1"]);
        // Each URL keeps its own path rule.
        assert_eq!(r.upstream_target(&r.upstreams[0], "/mqtt/x", None), "/mqtt");
        assert_eq!(
            r.upstream_target(&r.upstreams[1], "/mqtt/x", None),
            "/mqtt/x"
        );
        let err = RouteTable::from_yaml("- prefix: /a\n  upstream: []\n", "r.yaml", vec![])
            .expect_err("empty list");
        assert!(err.to_string().contains("upstream"), "{err}");
        let err = RouteTable::from_yaml(
            "- prefix: /a\n  upstream: [ws://a/, http://b/]\n",
            "r.yaml",
            vec![],
        )
        .expect_err("one bad URL");
        assert!(err.to_string().contains("upstream"), "{err}");
    }

    #[test]
    fn errors_name_the_problem() {
        let err = RouteTable::from_yaml(
            "- prefix: /a\n  upstream: ws://a/\n  bogus: 1\n",
            "r.yaml",
            vec![],
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = RouteTable::from_yaml("- prefix: a\n  upstream: ws://a/\n", "r.yaml", vec![])
            .expect_err("prefix");
        assert!(err.to_string().contains("prefix"), "{err}");
        let err = RouteTable::from_yaml("- prefix: /a\n  upstream: http://a/\n", "r.yaml", vec![])
            .expect_err("url");
        assert!(err.to_string().contains("upstream"), "{err}");
    }
}
