//! Request validation, as APNs documents it: a pure function of the request head, the
//! payload and the connection's authentication, answering `Ok` or the status and reason
//! Apple would send. No I/O, no clock: the provider-token check is passed in. What each
//! push type requires (topic, payload limit, priorities) is [`crate::push_type`]'s.
//!
//! Order of checks (Apple does not document one; this one answers the most fundamental
//! problem first): `:path` (404), `:method` (405), missing device token, repeated headers,
//! provider token (403), the `apns-*` headers, the device token's format, then the payload.
//!
//! Choices where Apple's documentation leaves room, so a request the emulator accepts is
//! one APNs accepts too:
//! - Device tokens must be even-length hex, 64 to 200 digits (either case). Apple's are 64
//!   today; Apple says not to assume a fixed length, so longer ones are accepted.
//! - A push type whose required topic suffix does not match `apns-topic` (a `voip` push to
//!   the bare bundle id, an `alert` to `….voip`) is `InvalidPushType`.
//! - A topic for another bundle id than the emulator serves is `DeviceTokenNotForTopic`
//!   under token auth (the key may push to every app of the team; the device belongs to
//!   another one) and `TopicDisallowed` under certificate auth (the certificate is for one
//!   app only).
//! - A payload that is not a JSON object: Apple documents no reason for it; the emulator
//!   answers `400 PayloadEmpty` (the payload carries no notification).

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::push_type::{PushType, MAX_COLLAPSE_ID};
use crate::reason;

pub(crate) const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
pub(crate) const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
pub(crate) const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
pub(crate) const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
pub(crate) const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
pub(crate) const APNS_ID: HeaderName = HeaderName::from_static("apns-id");

/// The shortest device token accepted, in hex digits (Apple's are 64 today).
pub const MIN_DEVICE_TOKEN_HEX: usize = 64;
/// The longest device token accepted, in hex digits: room for Apple to grow them.
pub const MAX_DEVICE_TOKEN_HEX: usize = 200;

const DEVICE_PATH: &str = "/3/device/";

/// A refused request: the status and documented reason APNs would answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
}

const fn reject(status: u16, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// How the connection authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Nothing asked (the emulator's open mode).
    None,
    /// A provider token (JWT) in every request's `authorization` header.
    Token,
    /// A client certificate, verified during the TLS handshake.
    Certificate,
}

/// What requests are checked against.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The bundle id served; `None` accepts any topic.
    pub bundle: Option<String>,
    pub auth: AuthMode,
}

/// What a valid head says about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub push_type: PushType,
    /// The priority APNs applies (the header's, else the push type's default).
    pub priority: i16,
    pub expiration: Option<u64>,
}

/// Checks everything but the payload. `provider_token` is called with the
/// `authorization` header under token auth only, and says whether it is acceptable.
pub fn check_head(
    head: &Parts,
    policy: &Policy,
    provider_token: impl FnOnce(&HeaderValue) -> Result<(), Rejection>,
) -> Result<Checked, Rejection> {
    let token = match device_token(head.uri.path()) {
        Some(token) => token,
        None if is_device_path_without_token(head.uri.path()) => "",
        None => return Err(reject(404, reason::BAD_PATH)),
    };
    if head.method != Method::POST {
        return Err(reject(405, reason::METHOD_NOT_ALLOWED));
    }
    if token.is_empty() {
        return Err(reject(400, reason::MISSING_DEVICE_TOKEN));
    }
    let headers = &head.headers;
    if headers.len() != headers.keys_len() {
        return Err(reject(400, reason::DUPLICATE_HEADERS));
    }
    if policy.auth == AuthMode::Token {
        match headers.get(AUTHORIZATION) {
            Some(value) => provider_token(value)?,
            None => return Err(reject(403, reason::MISSING_PROVIDER_TOKEN)),
        }
    }
    let push_type = match headers.get(APNS_PUSH_TYPE) {
        None => PushType::Alert,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(PushType::from_header)
            .ok_or(reject(400, reason::INVALID_PUSH_TYPE))?,
    };
    check_topic(headers.get(APNS_TOPIC), push_type, policy)?;
    let priority = match headers.get(APNS_PRIORITY) {
        None => Some(push_type.default_priority()),
        Some(v) => ascii_number(v).and_then(|p| i16::try_from(p).ok()),
    }
    .filter(|p| push_type.allows_priority(*p))
    .ok_or(reject(400, reason::BAD_PRIORITY))?;
    let expiration = match headers.get(APNS_EXPIRATION) {
        None => None,
        Some(v) => Some(ascii_number(v).ok_or(reject(400, reason::BAD_EXPIRATION_DATE))?),
    };
    if let Some(v) = headers.get(APNS_COLLAPSE_ID) {
        if v.len() > MAX_COLLAPSE_ID {
            return Err(reject(400, reason::BAD_COLLAPSE_ID));
        }
    }
    if let Some(v) = headers.get(APNS_ID) {
        if !is_canonical_uuid(v.as_bytes()) {
            return Err(reject(400, reason::BAD_MESSAGE_ID));
        }
    }
    if !is_device_token(token) {
        return Err(reject(400, reason::BAD_DEVICE_TOKEN));
    }
    Ok(Checked {
        push_type,
        priority,
        expiration,
    })
}

fn check_topic(
    topic: Option<&HeaderValue>,
    push_type: PushType,
    policy: &Policy,
) -> Result<(), Rejection> {
    let Some(topic) = topic else {
        // With a certificate (or no auth) APNs takes the certificate's topic.
        return match policy.auth {
            AuthMode::Token => Err(reject(400, reason::MISSING_TOPIC)),
            AuthMode::None | AuthMode::Certificate => Ok(()),
        };
    };
    let topic = topic
        .to_str()
        .ok()
        .filter(|t| !t.is_empty() && !t.contains(|c: char| c.is_ascii_whitespace()))
        .ok_or(reject(400, reason::BAD_TOPIC))?;
    if !push_type.topic_matches(topic) {
        return Err(reject(400, reason::INVALID_PUSH_TYPE));
    }
    if let Some(bundle) = &policy.bundle {
        let base = match push_type.topic_suffix() {
            Some(suffix) => topic.strip_suffix(suffix).unwrap_or(topic),
            None => topic,
        };
        if base != bundle {
            return Err(match policy.auth {
                AuthMode::Certificate => reject(400, reason::TOPIC_DISALLOWED),
                AuthMode::None | AuthMode::Token => reject(400, reason::DEVICE_TOKEN_NOT_FOR_TOPIC),
            });
        }
    }
    Ok(())
}

/// Checks the payload of a request whose head passed [`check_head`].
pub fn check_payload(checked: &Checked, payload: &[u8]) -> Result<(), Rejection> {
    if payload.is_empty() {
        return Err(reject(400, reason::PAYLOAD_EMPTY));
    }
    if payload.len() > checked.push_type.max_payload() {
        return Err(reject(413, reason::PAYLOAD_TOO_LARGE));
    }
    if !is_json_object(payload) {
        return Err(reject(400, reason::PAYLOAD_EMPTY));
    }
    Ok(())
}

/// [`check_head`] then [`check_payload`].
pub fn check(
    head: &Parts,
    payload: &[u8],
    policy: &Policy,
    provider_token: impl FnOnce(&HeaderValue) -> Result<(), Rejection>,
) -> Result<Checked, Rejection> {
    let checked = check_head(head, policy, provider_token)?;
    check_payload(&checked, payload)?;
    Ok(checked)
}

/// The device token of a `/3/device/<token>` path (`Some("")` when it is missing).
pub fn device_token(path: &str) -> Option<&str> {
    path.strip_prefix(DEVICE_PATH)
}

fn is_device_path_without_token(path: &str) -> bool {
    path == "/3/device"
}

/// Even-length hex of an accepted length.
pub fn is_device_token(token: &str) -> bool {
    (MIN_DEVICE_TOKEN_HEX..=MAX_DEVICE_TOKEN_HEX).contains(&token.len())
        && token.len() % 2 == 0
        && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `8-4-4-4-12` hex digits, either case: the only form `apns-id` may take.
pub fn is_canonical_uuid(id: &[u8]) -> bool {
    id.len() == 36
        && id.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The request's `apns-id` if it is a valid one (answers echo it).
pub(crate) fn request_apns_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers
        .get(APNS_ID)
        .filter(|v| is_canonical_uuid(v.as_bytes()))
}

/// Digits only (no sign, no blanks), fitting a u64.
pub(crate) fn ascii_number(value: &HeaderValue) -> Option<u64> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// A syntactically valid JSON document whose top level is an object. Apple checks no
/// deeper (it does not look for `aps`), and neither does this.
fn is_json_object(payload: &[u8]) -> bool {
    let starts_with_brace = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    starts_with_brace && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn token_policy() -> Policy {
        Policy {
            bundle: Some("com.example.app".into()),
            auth: AuthMode::Token,
        }
    }

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    /// A valid token-auth alert request, with `changes` applied to its headers:
    /// `("name", None)` removes, `("name", Some(v))` sets.
    fn request(changes: &[(&str, Option<&str>)]) -> Parts {
        let mut headers: Vec<(&str, &str)> = vec![
            ("authorization", "bearer good"),
            ("apns-topic", "com.example.app"),
        ];
        for (name, value) in changes {
            headers.retain(|(n, _)| n != name);
            if let Some(v) = value {
                headers.push((name, v));
            }
        }
        head("POST", &format!("/3/device/{TOKEN}"), &headers)
    }

    fn accept_good(v: &HeaderValue) -> Result<(), Rejection> {
        match v.as_bytes() {
            b"bearer good" => Ok(()),
            _ => Err(reject(403, reason::INVALID_PROVIDER_TOKEN)),
        }
    }

    fn outcome(
        parts: &Parts,
        payload: &str,
        policy: &Policy,
    ) -> Result<Checked, (u16, &'static str)> {
        check(parts, payload.as_bytes(), policy, accept_good).map_err(|r| (r.status, r.reason))
    }

    fn reason_of(parts: &Parts, policy: &Policy) -> Option<(u16, &'static str)> {
        outcome(parts, r#"{"aps":{}}"#, policy).err()
    }

    #[test]
    fn a_valid_request_passes_with_defaults() {
        let checked = outcome(&request(&[]), r#"{"aps":{"alert":"hi"}}"#, &token_policy()).unwrap();
        assert_eq!(
            checked,
            Checked {
                push_type: PushType::Alert,
                priority: 10,
                expiration: None
            }
        );
        let all = request(&[
            ("apns-push-type", Some("background")),
            ("apns-priority", Some("5")),
            ("apns-expiration", Some("0")),
            ("apns-collapse-id", Some(&"c".repeat(64))),
            ("apns-id", Some(ID)),
        ]);
        let checked = outcome(&all, r#"{"aps":{"content-available":1}}"#, &token_policy()).unwrap();
        assert_eq!(checked.push_type, PushType::Background);
        assert_eq!(checked.priority, 5);
        assert_eq!(checked.expiration, Some(0));
    }

    #[test]
    fn path_and_method() {
        let p = token_policy();
        assert_eq!(
            reason_of(&head("POST", "/3/devices/ab", &[]), &p),
            Some((404, "BadPath"))
        );
        assert_eq!(
            reason_of(&head("POST", "/", &[]), &p),
            Some((404, "BadPath"))
        );
        assert_eq!(
            reason_of(&head("POST", "/2/device/ab", &[]), &p),
            Some((404, "BadPath"))
        );
        let get = head("GET", &format!("/3/device/{TOKEN}"), &[]);
        assert_eq!(reason_of(&get, &p), Some((405, "MethodNotAllowed")));
        let put = head("PUT", &format!("/3/device/{TOKEN}"), &[]);
        assert_eq!(reason_of(&put, &p), Some((405, "MethodNotAllowed")));
        for path in ["/3/device/", "/3/device"] {
            let missing = head("POST", path, &[("authorization", "bearer good")]);
            assert_eq!(reason_of(&missing, &p), Some((400, "MissingDeviceToken")));
        }
    }

    #[test]
    fn device_token_format() {
        let p = token_policy();
        let with = |token: &str| {
            head(
                "POST",
                &format!("/3/device/{token}"),
                &[
                    ("authorization", "bearer good"),
                    ("apns-topic", "com.example.app"),
                ],
            )
        };
        for good in [
            TOKEN.to_owned(),
            TOKEN.to_uppercase(),
            "ab".repeat(100),
            "0".repeat(64),
        ] {
            assert_eq!(reason_of(&with(&good), &p), None, "{good}");
        }
        for bad in [
            "abc".to_owned(),
            "0".repeat(62),
            "0".repeat(65),
            "0".repeat(202),
            format!("{}zz", &TOKEN[..62]),
            format!("{TOKEN}/extra"),
        ] {
            assert_eq!(
                reason_of(&with(&bad), &p),
                Some((400, "BadDeviceToken")),
                "{bad}"
            );
        }
        assert!(is_device_token(TOKEN));
    }

    #[test]
    fn repeated_headers() {
        let p = token_policy();
        let twice = head(
            "POST",
            &format!("/3/device/{TOKEN}"),
            &[
                ("authorization", "bearer good"),
                ("apns-topic", "com.example.app"),
                ("apns-priority", "10"),
                ("apns-priority", "10"),
            ],
        );
        assert_eq!(reason_of(&twice, &p), Some((400, "DuplicateHeaders")));
        let auth_twice = head(
            "POST",
            &format!("/3/device/{TOKEN}"),
            &[
                ("authorization", "bearer good"),
                ("authorization", "bearer good"),
                ("apns-topic", "com.example.app"),
            ],
        );
        assert_eq!(reason_of(&auth_twice, &p), Some((400, "DuplicateHeaders")));
    }

    #[test]
    fn provider_token_is_checked_under_token_auth_only() {
        let p = token_policy();
        assert_eq!(
            reason_of(&request(&[("authorization", None)]), &p),
            Some((403, "MissingProviderToken"))
        );
        assert_eq!(
            reason_of(&request(&[("authorization", Some("bearer bad"))]), &p),
            Some((403, "InvalidProviderToken"))
        );
        // Authentication comes before header validation.
        assert_eq!(
            reason_of(
                &request(&[("authorization", None), ("apns-priority", Some("7"))]),
                &p
            ),
            Some((403, "MissingProviderToken"))
        );
        let open = Policy {
            auth: AuthMode::None,
            ..token_policy()
        };
        let unchecked = request(&[("authorization", Some("bearer bad"))]);
        let never = |_: &HeaderValue| -> Result<(), Rejection> { panic!("called") };
        assert!(check(&unchecked, b"{}", &open, never).is_ok());
        let cert = Policy {
            auth: AuthMode::Certificate,
            ..token_policy()
        };
        assert!(check(&request(&[("authorization", None)]), b"{}", &cert, never).is_ok());
    }

    #[test]
    fn push_types() {
        let p = token_policy();
        for bad in ["Alert", "", "push", "alert "] {
            assert_eq!(
                reason_of(&request(&[("apns-push-type", Some(bad))]), &p),
                Some((400, "InvalidPushType")),
                "{bad:?}"
            );
        }
        for push_type in PushType::all() {
            let topic = format!("com.example.app{}", push_type.topic_suffix().unwrap_or(""));
            let parts = request(&[
                ("apns-push-type", Some(push_type.name())),
                ("apns-topic", Some(&topic)),
                ("apns-priority", Some("5")),
            ]);
            assert_eq!(reason_of(&parts, &p), None, "{push_type}");
        }
    }

    #[test]
    fn topics() {
        let p = token_policy();
        let voip = |topic: &str| {
            request(&[
                ("apns-push-type", Some("voip")),
                ("apns-topic", Some(topic)),
            ])
        };
        assert_eq!(reason_of(&voip("com.example.app.voip"), &p), None);
        assert_eq!(
            reason_of(&voip("com.example.app"), &p),
            Some((400, "InvalidPushType"))
        );
        assert_eq!(
            reason_of(
                &request(&[("apns-topic", Some("com.example.app.voip"))]),
                &p
            ),
            Some((400, "InvalidPushType"))
        );
        assert_eq!(
            reason_of(&voip("com.other.app.voip"), &p),
            Some((400, "DeviceTokenNotForTopic"))
        );
        assert_eq!(
            reason_of(&request(&[("apns-topic", Some("com.other.app"))]), &p),
            Some((400, "DeviceTokenNotForTopic"))
        );
        let cert = Policy {
            auth: AuthMode::Certificate,
            ..token_policy()
        };
        assert_eq!(
            reason_of(&request(&[("apns-topic", Some("com.other.app"))]), &cert),
            Some((400, "TopicDisallowed"))
        );
        for bad in ["", "com.example app"] {
            assert_eq!(
                reason_of(&request(&[("apns-topic", Some(bad))]), &p),
                Some((400, "BadTopic")),
                "{bad:?}"
            );
        }
        assert_eq!(
            reason_of(&request(&[("apns-topic", None)]), &p),
            Some((400, "MissingTopic"))
        );
        // Without token auth the certificate's topic applies.
        assert_eq!(reason_of(&request(&[("apns-topic", None)]), &cert), None);
        // No bundle configured: any topic with the right suffix.
        let any = Policy {
            bundle: None,
            ..token_policy()
        };
        assert_eq!(
            reason_of(&request(&[("apns-topic", Some("org.any"))]), &any),
            None
        );
        assert_eq!(
            reason_of(&voip("org.any"), &any),
            Some((400, "InvalidPushType"))
        );
    }

    #[test]
    fn priorities() {
        let p = token_policy();
        for good in ["10", "5", "1"] {
            assert_eq!(
                reason_of(&request(&[("apns-priority", Some(good))]), &p),
                None
            );
        }
        for bad in ["7", "0", "", "high", "-5", " 5", "99999999999999999999"] {
            assert_eq!(
                reason_of(&request(&[("apns-priority", Some(bad))]), &p),
                Some((400, "BadPriority")),
                "{bad:?}"
            );
        }
        let background = |priority: &str| {
            request(&[
                ("apns-push-type", Some("background")),
                ("apns-priority", Some(priority)),
            ])
        };
        assert_eq!(reason_of(&background("10"), &p), Some((400, "BadPriority")));
        assert_eq!(reason_of(&background("5"), &p), None);
        // Without the header APNs uses 10, whatever the push type: an error here.
        let unset = request(&[("apns-push-type", Some("background"))]);
        assert_eq!(reason_of(&unset, &p), Some((400, "BadPriority")));
    }

    #[test]
    fn expirations() {
        let p = token_policy();
        for good in ["0", "1700000000", "18446744073709551615"] {
            let parts = request(&[("apns-expiration", Some(good))]);
            assert_eq!(reason_of(&parts, &p), None, "{good}");
        }
        for bad in ["-1", "soon", "1.5", "", "18446744073709551616", "+5"] {
            assert_eq!(
                reason_of(&request(&[("apns-expiration", Some(bad))]), &p),
                Some((400, "BadExpirationDate")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn collapse_ids() {
        let p = token_policy();
        let long = "c".repeat(65);
        assert_eq!(
            reason_of(&request(&[("apns-collapse-id", Some(&long))]), &p),
            Some((400, "BadCollapseId"))
        );
        assert_eq!(
            reason_of(&request(&[("apns-collapse-id", Some("x"))]), &p),
            None
        );
    }

    #[test]
    fn message_ids() {
        let p = token_policy();
        for good in [ID, &ID.to_uppercase()] {
            assert_eq!(reason_of(&request(&[("apns-id", Some(good))]), &p), None);
        }
        for bad in [
            "123e4567e89b12d3a456426614174000",
            "{123e4567-e89b-12d3-a456-426614174000}",
            "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
            "123e4567-e89b-12d3-a456-42661417400g",
            "123e4567-e89b-12d3-a4560426614174000",
            "",
        ] {
            assert_eq!(
                reason_of(&request(&[("apns-id", Some(bad))]), &p),
                Some((400, "BadMessageId")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn payloads() {
        let p = token_policy();
        let alert = request(&[]);
        let voip = request(&[
            ("apns-push-type", Some("voip")),
            ("apns-topic", Some("com.example.app.voip")),
        ]);
        let sized = |n: usize| format!(r#"{{"a":"{}"}}"#, "x".repeat(n - 8));
        assert_eq!(sized(4096).len(), 4096);
        assert!(outcome(&alert, &sized(4096), &p).is_ok());
        assert_eq!(
            outcome(&alert, &sized(4097), &p),
            Err((413, "PayloadTooLarge"))
        );
        assert!(outcome(&voip, &sized(5120), &p).is_ok());
        assert_eq!(
            outcome(&voip, &sized(5121), &p),
            Err((413, "PayloadTooLarge"))
        );
        assert_eq!(outcome(&alert, "", &p), Err((400, "PayloadEmpty")));
        for bad in ["[1]", "\"s\"", "42", "{", "{} {}", "{\"a\":}", "   "] {
            assert_eq!(
                outcome(&alert, bad, &p),
                Err((400, "PayloadEmpty")),
                "{bad:?}"
            );
        }
        assert!(outcome(&alert, " {\"aps\":{}}\n", &p).is_ok());
        assert!(outcome(&alert, "{}", &p).is_ok());
    }

    #[test]
    fn echoed_ids() {
        let parts = request(&[("apns-id", Some(ID))]);
        assert_eq!(request_apns_id(&parts.headers).unwrap(), ID);
        let parts = request(&[("apns-id", Some("nope"))]);
        assert_eq!(request_apns_id(&parts.headers), None);
    }
}
