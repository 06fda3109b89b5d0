//! Topic rules at the edge (issue 16, rule 2): `MQTT_PUBLISH_ACL` and `MQTT_SUBSCRIBE_ACL` are lists of topic-filter
//! templates such as `devices/{sub}/#` or `tenants/{claim:tenant}/#`, filled in from the verified token.
//!
//! - A PUBLISH topic is allowed when it matches one of the publish filters (MQTT wildcard semantics: `+` one level,
//!   `#` the rest, and a topic starting with `$` is not matched by a leading wildcard).
//! - A SUBSCRIBE filter is allowed when it is *contained in* one of the subscribe filters: every topic it could match
//!   is matched by that filter (`devices/alice/#` allows `devices/alice/+/t`, denies `devices/+/t` and `#`). For a
//!   shared subscription `$share/group/filter`, the filter part is checked.
//! - A claim value is put in as it is; a value that is empty or holds `+`, `#`, `/` or NUL would change the
//!   filter's shape, so the template that names it matches nothing (so does a template whose claim is missing).
//!   No escaping exists in MQTT topic filters, so refusing is the only safe rule.

use crate::auth::Identity;

/// Longest template or filter accepted (an MQTT string is at most 65,535 bytes).
pub const MAX_FILTER_BYTES: usize = 65_535;

/// What the gateway does when a packet is outside the rules (`MQTT_ACL_DENY_ACTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyAction {
    /// Drop the PUBLISH (acknowledged by the gateway for QoS 1 and 2) or fail the SUBSCRIBE entry; the session
    /// stays up.
    #[default]
    Ignore,
    /// End the session: MQTT 5 DISCONNECT 0x87, then Close 1008.
    Disconnect,
}

/// The topic rules of one route: the global settings with the route's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclSettings {
    /// `MQTT_PUBLISH_ACL`: `None` leaves PUBLISH unchecked.
    pub publish: Option<Vec<Template>>,
    /// `MQTT_SUBSCRIBE_ACL`: `None` leaves SUBSCRIBE unchecked.
    pub subscribe: Option<Vec<Template>>,
    /// `MQTT_ACL_DENY_ACTION`.
    pub deny: DenyAction,
}

impl AclSettings {
    /// Whether any rule applies, so the session's packets must be read.
    #[must_use]
    pub fn active(&self) -> bool {
        self.publish.is_some() || self.subscribe.is_some()
    }

    /// The claims the templates name (`{claim:NAME}`), which the verifier must keep.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.publish
            .iter()
            .chain(self.subscribe.iter())
            .flatten()
            .flat_map(Template::claims)
    }
}

/// A topic-filter template, checked when the settings are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

/// Why a template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`, or a placeholder other than `{sub}` and `{claim:NAME}`.
    #[error("`{0}`: placeholders are {{sub}} and {{claim:NAME}}")]
    Placeholder(String),
    /// Not a valid MQTT topic filter once filled in.
    #[error("`{0}`: not a valid MQTT topic filter")]
    Filter(String),
}

enum Piece<'a> {
    Text(&'a str),
    Sub,
    Claim(&'a str),
}

/// Splits a template into text and placeholders.
fn pieces(t: &str) -> Result<Vec<Piece<'_>>, ()> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or(())?;
        let name = &after[..close];
        out.push(match name {
            "sub" => Piece::Sub,
            _ => match name.strip_prefix("claim:") {
                Some(c) if !c.is_empty() && !c.contains('{') && c.len() <= 128 => Piece::Claim(c),
                _ => return Err(()),
            },
        });
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(());
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

impl Template {
    /// Checks a template: placeholders well formed, and a valid topic filter when they are filled in.
    ///
    /// # Errors
    /// [`TemplateError`] naming the template.
    pub fn parse(t: &str) -> Result<Template, TemplateError> {
        let t = t.trim();
        let ps = pieces(t).map_err(|()| TemplateError::Placeholder(t.to_owned()))?;
        let sample: String = ps
            .iter()
            .map(|p| match p {
                Piece::Text(s) => s,
                Piece::Sub | Piece::Claim(_) => "x",
            })
            .collect();
        if !valid_filter(&sample) {
            return Err(TemplateError::Filter(t.to_owned()));
        }
        Ok(Template(t.to_owned()))
    }

    /// The template as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The claims the template names (`{claim:NAME}`).
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        pieces(&self.0)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| match p {
                Piece::Claim(c) => Some(c),
                _ => None,
            })
    }

    /// The filter for `identity`, or `None` when a value it needs is missing or unsafe (see the module docs).
    #[must_use]
    pub fn fill(&self, identity: &Identity) -> Option<String> {
        let mut out = String::with_capacity(self.0.len() + 16);
        // Invariant: parse() accepted the placeholders.
        for p in pieces(&self.0).ok()? {
            let value = match p {
                Piece::Text(s) => {
                    out.push_str(s);
                    continue;
                }
                Piece::Sub => identity.subject.as_deref()?,
                Piece::Claim(c) => identity
                    .claims
                    .iter()
                    .find(|(n, _)| n == c)
                    .map(|(_, v)| v.as_str())?,
            };
            if !safe_value(value) {
                return None;
            }
            out.push_str(value);
        }
        (out.len() <= MAX_FILTER_BYTES && valid_filter(&out)).then_some(out)
    }
}

/// A claim value that cannot change a filter's shape.
#[must_use]
pub fn safe_value(v: &str) -> bool {
    !v.is_empty() && !v.contains(['+', '#', '/', '\0'])
}

/// Whether `f` is a valid MQTT topic filter: non-empty, no NUL, `#` only as the whole last level, `+` only as a
/// whole level.
#[must_use]
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` is a valid topic name to publish to: non-empty, no wildcard, no NUL.
#[must_use]
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` matches the topic name `topic` (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7).
#[must_use]
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), Some(tl)) => return !(first && tl.starts_with('$')),
            // `a/#` also matches `a`.
            (Some("#"), None) => return !first,
            (Some("+"), Some(tl)) => {
                if first && tl.starts_with('$') {
                    return false;
                }
            }
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// Whether every topic `inner` could match is matched by `outer` (both valid filters).
#[must_use]
pub fn filter_contains(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut first = true;
    loop {
        match (o.next(), i.next()) {
            // `#` covers the rest, except `$` topics at the first level: `#` does not match `$SYS/x`.
            (Some("#"), Some(il)) => return !(first && il.starts_with('$')),
            (Some("#"), None) => return !first,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(il)) => {
                if first && il.starts_with('$') {
                    return false;
                }
            }
            (Some(ol), Some(il)) => {
                if il == "+" || ol != il {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// The filter part of a subscription: `$share/group/filter` gives `filter`; `None` for a malformed share.
#[must_use]
pub fn subscription_filter(requested: &str) -> Option<&str> {
    match requested.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/')?;
            (!group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty())
                .then_some(filter)
        }
        None => Some(requested),
    }
}

/// The rules of one session: the templates filled in from its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRules {
    /// Publish filters, `None` when unchecked.
    pub publish: Option<Vec<String>>,
    /// Subscribe filters, `None` when unchecked.
    pub subscribe: Option<Vec<String>>,
}

impl SessionRules {
    /// The filters of `settings` for `identity` (templates that resolve to nothing are left out).
    #[must_use]
    pub fn new(settings: &AclSettings, identity: &Identity) -> SessionRules {
        let fill = |ts: &Option<Vec<Template>>| {
            ts.as_ref()
                .map(|ts| ts.iter().filter_map(|t| t.fill(identity)).collect())
        };
        SessionRules {
            publish: fill(&settings.publish),
            subscribe: fill(&settings.subscribe),
        }
    }

    /// Whether a PUBLISH to `topic` may pass.
    #[must_use]
    pub fn may_publish(&self, topic: &str) -> bool {
        match &self.publish {
            None => true,
            Some(fs) => valid_topic(topic) && fs.iter().any(|f| topic_matches(f, topic)),
        }
    }

    /// Whether a SUBSCRIBE to `requested` may pass.
    #[must_use]
    pub fn may_subscribe(&self, requested: &str) -> bool {
        match &self.subscribe {
            None => true,
            Some(fs) => subscription_filter(requested)
                .filter(|f| valid_filter(f))
                .is_some_and(|f| fs.iter().any(|o| filter_contains(o, f))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &str, tenant: Option<&str>) -> Identity {
        Identity {
            subject: Some(sub.to_owned()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            forwarded: Vec::new(),
            limit_claim: None,
            claims: tenant
                .map(|t| vec![("tenant".to_owned(), t.to_owned())])
                .unwrap_or_default(),
            roles: Vec::new(),
        }
    }

    #[test]
    fn topic_matching_follows_the_spec() {
        for (f, t, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a//c", true),
            ("+", "", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(topic_matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn containment_of_filters() {
        for (outer, inner, want) in [
            ("devices/alice/#", "devices/alice/+/t", true),
            ("devices/alice/#", "devices/alice/#", true),
            ("devices/alice/#", "devices/alice", true),
            ("devices/alice/#", "devices/+/t", false),
            ("devices/alice/#", "#", false),
            ("devices/alice/#", "devices/#", false),
            ("devices/alice/#", "devices/alicex/t", false),
            ("devices/+/t", "devices/alice/t", true),
            ("devices/+/t", "devices/+/t", true),
            ("devices/+/t", "devices/#", false),
            ("devices/+/t", "devices/a/t/x", false),
            ("a/b", "a/b", true),
            ("a/b", "a/+", false),
            ("#", "a/#", true),
            ("#", "$SYS/#", false),
            ("+/#", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
        ] {
            assert_eq!(filter_contains(outer, inner), want, "{outer} ⊇ {inner}");
        }
    }

    #[test]
    fn containment_agrees_with_matching_on_samples() {
        let filters = [
            "a/#", "a/+", "a/b", "+/b", "#", "a/+/c", "+", "a", "+/+", "$s/#",
        ];
        let topics = [
            "a", "a/b", "a/c", "x/b", "a/b/c", "a/x/c", "$s/a", "b", "", "a/",
        ];
        for o in filters {
            for i in filters {
                if filter_contains(o, i) {
                    for t in topics {
                        if topic_matches(i, t) {
                            assert!(topic_matches(o, t), "{o} ⊇ {i} but {t}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn templates_fill_in_safe_claims_only() {
        let t = Template::parse("tenants/{claim:tenant}/devices/{sub}/#").expect("valid");
        assert_eq!(t.claims().collect::<Vec<_>>(), ["tenant"]);
        assert_eq!(
            t.fill(&identity("alice", Some("t1"))).as_deref(),
            Some("tenants/t1/devices/alice/#")
        );
        assert_eq!(t.fill(&identity("alice", None)), None, "missing claim");
        for bad in ["+", "#", "a/b", "", "x\0"] {
            assert_eq!(t.fill(&identity(bad, Some("t1"))), None, "sub {bad:?}");
            assert_eq!(t.fill(&identity("alice", Some(bad))), None, "claim {bad:?}");
        }
        for bad in [
            "a/{sub",
            "a/{user}",
            "a/{claim:}",
            "a/}",
            "a/#/b",
            "a/b+",
            "",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert!(Template::parse("dev-{sub}/x").is_ok());
    }

    #[test]
    fn a_claim_with_wildcards_does_not_widen_the_rules() {
        let settings = AclSettings {
            publish: Some(vec![Template::parse("devices/{sub}/#").expect("valid")]),
            subscribe: Some(vec![Template::parse("devices/{sub}/#").expect("valid")]),
            deny: DenyAction::Ignore,
        };
        let evil = SessionRules::new(&settings, &identity("+", None));
        assert!(!evil.may_publish("devices/bob/t"));
        assert!(!evil.may_subscribe("devices/+/#"));
        let evil = SessionRules::new(&settings, &identity("#", None));
        assert!(!evil.may_subscribe("devices/#"));
        let alice = SessionRules::new(&settings, &identity("alice", None));
        assert!(alice.may_publish("devices/alice/t"));
        assert!(!alice.may_publish("devices/bob/t"));
        assert!(
            !alice.may_publish("devices/alice/+"),
            "wildcards in a topic"
        );
        assert!(alice.may_subscribe("devices/alice/+/t"));
        assert!(alice.may_subscribe("$share/g/devices/alice/#"));
        assert!(!alice.may_subscribe("$share/g/devices/#"));
        assert!(!alice.may_subscribe("$share/g"));
        assert!(!alice.may_subscribe("devices/alice/#/x"), "invalid filter");
        assert!(SessionRules::default().may_publish("anything"));
    }
}
