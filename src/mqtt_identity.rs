//! The verified identity in the MQTT CONNECT (issue 16, rule 1). Brokers authorize by the CONNECT's username and
//! client id; without this, a client holding alice's token could send `username=bob`. On routes that carry MQTT, when
//! any of these settings is on, the gateway parses the client's whole CONNECT, rewrites it from the verified token
//! and re-encodes it:
//!
//! - `MQTT_USERNAME_CLAIM`: the username becomes that claim's value (a token without it is refused);
//! - `MQTT_USERNAME_FORMAT=go`: the Go gateway's `<user>|<role1,role2>` (roles of `realm_access.roles`, then of
//!   each `resource_access.*.roles`, without repeats); `<user>` is the username claim's value, else `sub`;
//! - `MQTT_PASSWORD_FORWARD=drop`: the password (and its flag) are removed;
//! - `JWT_FORWARD_CLAIMS`: for MQTT 5, each forwarded claim also goes as a user property named like its header;
//!   user properties of the client with those names are removed first, so they cannot be forged;
//! - `MQTT_CLIENT_ID_POLICY`: the client id must equal `sub`, or start with it (see [`ClientIdPolicy`]).
//!
//! Everything after the CONNECT stays raw bytes, unless topic rules or re-authentication apply
//! ([`crate::mqtt_acl`], [`crate::mqtt_filter`]).

use crate::auth::Identity;
use crate::mqtt::{put_varint, MqttError, Reader};

/// How the username is written (`MQTT_USERNAME_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsernameFormat {
    /// The claim's value as it is.
    #[default]
    Plain,
    /// `<user>|<role1,role2>`, as the Go gateway wrote it.
    Go,
}

/// What happens to the CONNECT password (`MQTT_PASSWORD_FORWARD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasswordForward {
    /// Forwarded as the client sent it (RabbitMQ's OAuth 2 backend verifies the token itself).
    #[default]
    Keep,
    /// Removed, with its flag.
    Drop,
}

/// Which client ids a token may use (`MQTT_CLIENT_ID_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientIdPolicy {
    /// Any client id (the broker decides).
    #[default]
    Any,
    /// `sub` itself, or `sub` followed by one of [`CLIENT_ID_SEPARATORS`] and anything: with `sub=alice`,
    /// `alice`, `alice-phone`, `alice:1` pass; `alicex`, `bob` and an empty id do not.
    PrefixSubject,
    /// Exactly `sub`.
    EqualSubject,
}

/// The characters that may follow `sub` in a client id under `prefix-subject`.
pub const CLIENT_ID_SEPARATORS: [char; 4] = ['-', '_', ':', '.'];

/// The CONNECT rewrite of one route: the global settings with the route's overrides applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttSettings {
    /// `MQTT_USERNAME_CLAIM`.
    pub username_claim: Option<String>,
    /// `MQTT_USERNAME_FORMAT`.
    pub username_format: UsernameFormat,
    /// `MQTT_PASSWORD_FORWARD`.
    pub password_forward: PasswordForward,
    /// `MQTT_CLIENT_ID_POLICY`.
    pub client_id_policy: ClientIdPolicy,
}

impl MqttSettings {
    /// Whether the CONNECT must be read and rewritten (`user_properties`: JWT_FORWARD_CLAIMS lists claims). With
    /// everything at its default, the CONNECT is forwarded byte for byte, as before.
    #[must_use]
    pub fn active(&self, user_properties: bool) -> bool {
        user_properties || *self != MqttSettings::default()
    }
}

/// Why a verified identity may not use a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The client id is outside `MQTT_CLIENT_ID_POLICY`.
    #[error("client identifier not valid for this token")]
    ClientId,
    /// The token lacks the username claim (or `sub`), or its value cannot be an MQTT string.
    #[error("token has no usable MQTT username claim")]
    Username,
}

impl IdentityError {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(self) -> &'static str {
        match self {
            IdentityError::ClientId => "mqtt_client_id",
            IdentityError::Username => "mqtt_username_claim",
        }
    }
}

/// A CONNECT split into its fields; properties are kept raw (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPacket {
    /// Protocol name (`MQTT`, or `MQIsdp` for 3.1).
    pub name: Vec<u8>,
    /// Protocol level.
    pub level: u8,
    /// Connect flags.
    pub flags: u8,
    /// Keep alive, seconds.
    pub keep_alive: u16,
    /// CONNECT properties, without their length (MQTT 5; empty otherwise).
    pub properties: Vec<u8>,
    /// Client identifier.
    pub client_id: Vec<u8>,
    /// Will properties (MQTT 5), topic and payload, when the will flag is set.
    pub will: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    /// Username, when its flag is set.
    pub username: Option<Vec<u8>>,
    /// Password, when its flag is set.
    pub password: Option<Vec<u8>>,
}

/// Splits a complete CONNECT packet (fixed header included, nothing after it) into its fields. The caller has
/// already checked it with [`crate::mqtt::parse_connect`]; this is the second, field-keeping pass.
///
/// # Errors
/// Anything but a well-formed CONNECT.
pub fn split_connect(packet: &[u8]) -> Result<ConnectPacket, MqttError> {
    let mut r = Reader {
        buf: packet,
        pos: 0,
    };
    if r.u8()? != 0x10 {
        return Err(MqttError::Malformed("first packet is not CONNECT"));
    }
    let len = r.varint()?;
    if r.pos.checked_add(len) != Some(packet.len()) {
        return Err(MqttError::Malformed("remaining length does not fit"));
    }
    let name = r.binary()?.to_vec();
    let level = r.u8()?;
    match (name.as_slice(), level) {
        (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
        _ => return Err(MqttError::Malformed("unknown protocol name or level")),
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(MqttError::Malformed("reserved flag set"));
    }
    let keep_alive = r.u16()?;
    let properties = if level == 5 {
        let n = r.varint()?;
        r.take(n)?.to_vec()
    } else {
        Vec::new()
    };
    let client_id = r.binary()?.to_vec();
    let will = if flags & 0x04 != 0 {
        let props = if level == 5 {
            let n = r.varint()?;
            r.take(n)?.to_vec()
        } else {
            Vec::new()
        };
        let topic = r.binary()?.to_vec();
        let payload = r.binary()?.to_vec();
        Some((props, topic, payload))
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    if r.pos != packet.len() {
        return Err(MqttError::Malformed("trailing bytes in CONNECT"));
    }
    Ok(ConnectPacket {
        name,
        level,
        flags,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

fn put_binary(out: &mut Vec<u8>, v: &[u8]) -> Result<(), MqttError> {
    let n = u16::try_from(v.len()).map_err(|_| MqttError::TooLarge)?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

/// Largest remaining length MQTT can express.
const MAX_REMAINING: usize = 268_435_455;

impl ConnectPacket {
    /// The packet's bytes, flags recomputed from the fields that are present.
    ///
    /// # Errors
    /// A field longer than 65,535 bytes, or a packet longer than MQTT can express.
    pub fn encode(&self) -> Result<Vec<u8>, MqttError> {
        let mut flags = self.flags & 0x3e;
        if self.will.is_none() {
            flags &= !0x3c;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        let mut body = Vec::with_capacity(64 + self.client_id.len() + self.properties.len());
        put_binary(&mut body, &self.name)?;
        body.push(self.level);
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == 5 {
            put_varint(&mut body, self.properties.len());
            body.extend_from_slice(&self.properties);
        }
        put_binary(&mut body, &self.client_id)?;
        if let Some((props, topic, payload)) = &self.will {
            if self.level == 5 {
                put_varint(&mut body, props.len());
                body.extend_from_slice(props);
            }
            put_binary(&mut body, topic)?;
            put_binary(&mut body, payload)?;
        }
        if let Some(u) = &self.username {
            put_binary(&mut body, u)?;
        }
        if let Some(p) = &self.password {
            put_binary(&mut body, p)?;
        }
        if body.len() > MAX_REMAINING {
            return Err(MqttError::TooLarge);
        }
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(0x10);
        put_varint(&mut out, body.len());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// Removes the user properties (0x26) whose names are in `names` (ASCII case-insensitive) from a CONNECT property
/// list, then appends `add` as user properties.
///
/// # Errors
/// A property list that does not parse, or a name or value longer than an MQTT string.
fn set_user_properties(
    props: &[u8],
    names: &[&str],
    add: &[(String, String)],
) -> Result<Vec<u8>, MqttError> {
    let mut r = Reader { buf: props, pos: 0 };
    let mut out = Vec::with_capacity(props.len());
    while r.pos < props.len() {
        let start = r.pos;
        let id = r.varint()?;
        let keep = match id {
            // Session expiry, maximum packet size.
            0x11 | 0x27 => r.take(4).map(|_| true)?,
            // Receive maximum, topic alias maximum.
            0x21 | 0x22 => r.take(2).map(|_| true)?,
            // Request response / problem information.
            0x19 | 0x17 => r.take(1).map(|_| true)?,
            // Authentication method and data.
            0x15 | 0x16 => r.binary().map(|_| true)?,
            0x26 => {
                let key = r.binary()?;
                r.binary()?;
                !names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(key))
            }
            _ => return Err(MqttError::Malformed("unknown CONNECT property")),
        };
        if keep {
            out.extend_from_slice(&props[start..r.pos]);
        }
    }
    for (k, v) in add {
        out.push(0x26);
        put_binary(&mut out, k.as_bytes())?;
        put_binary(&mut out, v.as_bytes())?;
    }
    Ok(out)
}

/// The Authentication Method (0x15) of an MQTT 5 CONNECT's property list, and the list without it and without the
/// Authentication Data (0x16): what the broker gets when the gateway handles re-authentication itself.
///
/// # Errors
/// A property list that does not parse.
pub fn take_auth(props: &[u8]) -> Result<(Option<Vec<u8>>, Vec<u8>), MqttError> {
    let mut r = Reader { buf: props, pos: 0 };
    let mut out = Vec::with_capacity(props.len());
    let mut method = None;
    while r.pos < props.len() {
        let start = r.pos;
        let keep = match r.varint()? {
            0x11 | 0x27 => r.take(4).map(|_| true)?,
            0x21 | 0x22 => r.take(2).map(|_| true)?,
            0x19 | 0x17 => r.take(1).map(|_| true)?,
            0x15 => {
                method = Some(r.binary()?.to_vec());
                false
            }
            0x16 => r.binary().map(|_| false)?,
            0x26 => {
                r.binary()?;
                r.binary().map(|_| true)?
            }
            _ => return Err(MqttError::Malformed("unknown CONNECT property")),
        };
        if keep {
            out.extend_from_slice(&props[start..r.pos]);
        }
    }
    Ok((method, out))
}

/// Whether `client_id` fits `policy` for `subject`.
#[must_use]
pub fn client_id_allowed(policy: ClientIdPolicy, client_id: &[u8], subject: Option<&str>) -> bool {
    let Some(sub) = subject.filter(|s| !s.is_empty()) else {
        return policy == ClientIdPolicy::Any;
    };
    match policy {
        ClientIdPolicy::Any => true,
        ClientIdPolicy::EqualSubject => client_id == sub.as_bytes(),
        ClientIdPolicy::PrefixSubject => match client_id.strip_prefix(sub.as_bytes()) {
            Some([]) => true,
            Some([next, ..]) => CLIENT_ID_SEPARATORS
                .iter()
                .any(|c| u8::try_from(*c).is_ok_and(|c| c == *next)),
            None => false,
        },
    }
}

/// The username the settings give `identity`, or `None` to keep the client's.
///
/// # Errors
/// [`IdentityError::Username`] when the claim (or `sub`) is missing or too long for an MQTT string.
pub fn username(
    settings: &MqttSettings,
    identity: &Identity,
) -> Result<Option<String>, IdentityError> {
    let user = match &settings.username_claim {
        Some(claim) => Some(
            identity
                .claims
                .iter()
                .find(|(c, _)| c == claim)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
                .ok_or(IdentityError::Username)?,
        ),
        None if settings.username_format == UsernameFormat::Go => Some(
            identity
                .subject
                .clone()
                .filter(|v| !v.is_empty())
                .ok_or(IdentityError::Username)?,
        ),
        None => None,
    };
    let user = match (user, settings.username_format) {
        (Some(u), UsernameFormat::Go) => Some(format!("{u}|{}", identity.roles.join(","))),
        (u, _) => u,
    };
    if user
        .as_ref()
        .is_some_and(|u| u.len() > usize::from(u16::MAX))
    {
        return Err(IdentityError::Username);
    }
    Ok(user)
}

/// Applies the settings to a parsed CONNECT: the client id check, then the username, the password and the user
/// properties.
///
/// # Errors
/// [`IdentityError`] when the identity may not use this CONNECT.
pub fn rewrite(
    settings: &MqttSettings,
    identity: &Identity,
    mut packet: ConnectPacket,
) -> Result<ConnectPacket, IdentityError> {
    if !client_id_allowed(
        settings.client_id_policy,
        &packet.client_id,
        identity.subject.as_deref(),
    ) {
        return Err(IdentityError::ClientId);
    }
    if let Some(u) = username(settings, identity)? {
        packet.username = Some(u.into_bytes());
    }
    if settings.password_forward == PasswordForward::Drop {
        packet.password = None;
    }
    if packet.level == 5 && !identity.forwarded.is_empty() {
        let names: Vec<&str> = identity.forwarded.iter().map(|(h, _)| h.as_str()).collect();
        // Invariant: the properties parsed once already (see `rewrite_connect`); a failure here is malformed input
        // and is refused as a missing identity rather than forwarded.
        packet.properties = set_user_properties(&packet.properties, &names, &identity.forwarded)
            .map_err(|_| IdentityError::Username)?;
    }
    Ok(packet)
}

/// The rewritten bytes of the complete CONNECT `packet`.
///
/// # Errors
/// `Err(Ok(_))`: the CONNECT is malformed (or its properties are); `Err(Err(_))`: the identity may not use it.
pub fn rewrite_connect(
    settings: &MqttSettings,
    identity: &Identity,
    packet: &[u8],
) -> Result<Vec<u8>, Result<MqttError, IdentityError>> {
    let parsed = split_connect(packet).map_err(Ok)?;
    if parsed.level == 5 {
        // Check the property list before anything depends on it.
        set_user_properties(&parsed.properties, &[], &[]).map_err(Ok)?;
    }
    let out = rewrite(settings, identity, parsed).map_err(Err)?;
    out.encode().map_err(Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &str) -> Identity {
        Identity {
            subject: Some(sub.to_owned()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            forwarded: Vec::new(),
            limit_claim: None,
            claims: vec![("sub".into(), sub.into()), ("tenant".into(), "t1".into())],
            roles: vec!["admin".into(), "reader".into()],
        }
    }

    fn field(b: &mut Vec<u8>, v: &[u8]) {
        b.extend_from_slice(&(v.len() as u16).to_be_bytes());
        b.extend_from_slice(v);
    }

    /// A CONNECT built by hand, independently of [`ConnectPacket::encode`].
    fn connect(
        level: u8,
        client: &[u8],
        user: Option<&[u8]>,
        pass: Option<&[u8]>,
        will: bool,
        props: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        field(&mut body, if level == 3 { b"MQIsdp" } else { b"MQTT" });
        body.push(level);
        let mut flags = 0x02;
        if will {
            flags |= 0x04 | 0x08 | 0x20;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if pass.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        field(&mut body, client);
        if will {
            if level == 5 {
                body.extend_from_slice(&[2, 0x01, 0x01]); // payload format indicator
            }
            field(&mut body, b"will/t");
            field(&mut body, b"bye");
        }
        if let Some(u) = user {
            field(&mut body, u);
        }
        if let Some(p) = pass {
            field(&mut body, p);
        }
        let mut out = vec![0x10];
        put_varint(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    fn claim(name: &str) -> MqttSettings {
        MqttSettings {
            username_claim: Some(name.into()),
            ..MqttSettings::default()
        }
    }

    #[test]
    fn defaults_change_nothing_and_split_encode_round_trips() {
        for level in [3, 4, 5] {
            for will in [false, true] {
                for pass in [None, Some(&b"tok.en"[..])] {
                    let props: &[u8] = if level == 5 {
                        &[0x11, 0, 0, 0, 10]
                    } else {
                        &[]
                    };
                    let bytes = connect(level, b"alice-1", Some(b"bob"), pass, will, props);
                    assert!(crate::mqtt::parse_connect(&bytes).expect("valid").is_some());
                    assert_eq!(
                        split_connect(&bytes)
                            .expect("splits")
                            .encode()
                            .expect("encodes"),
                        bytes
                    );
                    let same =
                        rewrite_connect(&MqttSettings::default(), &identity("alice"), &bytes)
                            .expect("ok");
                    assert_eq!(same, bytes, "level {level} will {will}");
                }
            }
        }
    }

    #[test]
    fn the_username_claim_replaces_the_username_and_drop_removes_the_password() {
        for level in [4, 5] {
            for will in [false, true] {
                let props: &[u8] = if level == 5 { &[0x21, 0, 10] } else { &[] };
                let bytes = connect(level, b"c", Some(b"bob"), Some(b"tok.en"), will, props);
                let out = rewrite_connect(&claim("sub"), &identity("alice"), &bytes).expect("ok");
                assert_eq!(
                    out,
                    connect(level, b"c", Some(b"alice"), Some(b"tok.en"), will, props)
                );
                let drop = MqttSettings {
                    password_forward: PasswordForward::Drop,
                    ..claim("tenant")
                };
                let out = rewrite_connect(&drop, &identity("alice"), &bytes).expect("ok");
                assert_eq!(out, connect(level, b"c", Some(b"t1"), None, will, props));
                // No username at all from the client: one is added, with its flag.
                let bare = connect(level, b"c", None, None, will, props);
                let out = rewrite_connect(&claim("sub"), &identity("alice"), &bare).expect("ok");
                assert_eq!(out, connect(level, b"c", Some(b"alice"), None, will, props));
            }
        }
        // A token without the claim is refused.
        let bytes = connect(4, b"c", Some(b"bob"), None, false, &[]);
        assert_eq!(
            rewrite_connect(&claim("missing"), &identity("alice"), &bytes),
            Err(Err(IdentityError::Username))
        );
    }

    #[test]
    fn the_go_format_lists_roles() {
        let go = MqttSettings {
            username_format: UsernameFormat::Go,
            ..MqttSettings::default()
        };
        let bytes = connect(4, b"c", Some(b"bob"), None, false, &[]);
        let out = rewrite_connect(&go, &identity("alice"), &bytes).expect("ok");
        assert_eq!(
            out,
            connect(4, b"c", Some(b"alice|admin,reader"), None, false, &[])
        );
        let mut none = identity("alice");
        none.roles.clear();
        let out = rewrite_connect(&go, &none, &bytes).expect("ok");
        assert_eq!(out, connect(4, b"c", Some(b"alice|"), None, false, &[]));
    }

    #[test]
    fn forwarded_claims_become_user_properties_and_forged_ones_go() {
        let mut id = identity("alice");
        id.forwarded = vec![("X-Tenant".into(), "t1".into())];
        let mut forged = vec![0x11, 0, 0, 0, 10, 0x26];
        field(&mut forged, b"x-tenant");
        field(&mut forged, b"evil");
        forged.push(0x26);
        field(&mut forged, b"other");
        field(&mut forged, b"kept");
        let bytes = connect(5, b"c", None, None, true, &forged);
        let out = rewrite_connect(&MqttSettings::default(), &id, &bytes).expect("ok");
        let mut want = vec![0x11, 0, 0, 0, 10, 0x26];
        field(&mut want, b"other");
        field(&mut want, b"kept");
        want.push(0x26);
        field(&mut want, b"X-Tenant");
        field(&mut want, b"t1");
        assert_eq!(out, connect(5, b"c", None, None, true, &want));
        // 3.1.1 has no properties: unchanged.
        let bytes = connect(4, b"c", None, None, false, &[]);
        assert_eq!(
            rewrite_connect(&MqttSettings::default(), &id, &bytes).expect("ok"),
            bytes
        );
        // An unknown property is malformed.
        let bad = connect(5, b"c", None, None, false, &[0x7f, 0]);
        assert!(matches!(
            rewrite_connect(&MqttSettings::default(), &id, &bad),
            Err(Ok(_))
        ));
    }

    #[test]
    fn the_authentication_method_and_data_are_taken_out() {
        let mut props = vec![0x11, 0, 0, 0, 10, 0x15];
        field(&mut props, b"jwt");
        props.push(0x16);
        field(&mut props, b"a.b.c");
        props.extend_from_slice(&[0x21, 0, 5]);
        let (method, rest) = take_auth(&props).expect("valid");
        assert_eq!(method.as_deref(), Some(&b"jwt"[..]));
        assert_eq!(rest, [0x11, 0, 0, 0, 10, 0x21, 0, 5]);
        assert!(take_auth(&[0x15, 0, 9]).is_err());
    }

    #[test]
    fn client_id_policies() {
        use ClientIdPolicy::*;
        let sub = Some("alice");
        for (id, prefix, equal) in [
            (&b"alice"[..], true, true),
            (b"alice-phone", true, false),
            (b"alice:1", true, false),
            (b"alice_x", true, false),
            (b"alice.x", true, false),
            (b"alicex", false, false),
            (b"alic", false, false),
            (b"bob", false, false),
            (b"", false, false),
            (b"victim-device", false, false),
        ] {
            assert!(client_id_allowed(Any, id, sub));
            assert_eq!(client_id_allowed(PrefixSubject, id, sub), prefix, "{id:?}");
            assert_eq!(client_id_allowed(EqualSubject, id, sub), equal, "{id:?}");
        }
        assert!(!client_id_allowed(PrefixSubject, b"x", None));
        let policy = MqttSettings {
            client_id_policy: PrefixSubject,
            ..MqttSettings::default()
        };
        let bytes = connect(5, b"victim-device", None, None, false, &[]);
        assert_eq!(
            rewrite_connect(&policy, &identity("alice"), &bytes),
            Err(Err(IdentityError::ClientId))
        );
    }

    #[test]
    fn long_values_and_malformed_packets_are_errors_not_panics() {
        let mut id = identity("alice");
        id.claims[0].1 = "a".repeat(70_000);
        let bytes = connect(4, b"c", None, None, false, &[]);
        assert_eq!(
            rewrite_connect(&claim("sub"), &id, &bytes),
            Err(Err(IdentityError::Username))
        );
        let bytes = connect(5, b"c", Some(b"u"), Some(b"p"), true, &[0x11, 0, 0, 0, 1]);
        for cut in 0..bytes.len() {
            assert!(split_connect(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }
}
