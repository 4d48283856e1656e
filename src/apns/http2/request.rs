//! One outbox row -> one provider API request, as a pure function.
//!
//! Everything a row can get wrong is decided here, before any request is made: such a row
//! is `failed` with the returned reason and never costs a round trip. The reasons start
//! with the word APNs itself would answer (`BadDeviceToken`, `PayloadTooLarge`, ...) so a
//! row reads the same whether we or Apple refused it.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use uuid::Uuid;

use crate::apns::push_type::{PushType, MAX_COLLAPSE_ID};
use crate::config::{AppConfig, Endpoint, Environment};
use crate::transport::Notification;

pub const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
pub const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
pub const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
pub const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
pub const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
pub const APNS_ID: HeaderName = HeaderName::from_static("apns-id");

/// A request ready to go out on any connection of its app, as many times as it takes
/// (a request the server never processed is sent again on another connection).
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    pub uri: http::Uri,
    /// Every `apns-*` header; `authorization` is added per attempt (the JWT may change).
    pub headers: HeaderMap,
    /// The row's payload text, byte for byte.
    pub body: Bytes,
    /// Also sent as `apns-id`, so our logs and Apple's name the same push.
    pub apns_id: Uuid,
    pub push_type: PushType,
}

impl ApnsRequest {
    /// The `http::Request` for one attempt; `bearer` is the provider token under token auth.
    pub fn to_http(&self, bearer: Option<&str>) -> http::Request<()> {
        to_http(http::Method::POST, &self.uri, &self.headers, bearer)
    }
}

/// One attempt's HTTP/2 request to APNs (a push or a channel management call), with the
/// provider token as `authorization` under token auth.
pub fn to_http(
    method: http::Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    bearer: Option<&str>,
) -> http::Request<()> {
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers.clone();
    if let Some(token) = bearer {
        // A JWT is base64url and dots: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&format!("bearer {token}")) {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
    }
    request
}

/// `host[:port]` of the provider API for `endpoint` (the port only when it is not 443).
pub fn authority(endpoint: &Endpoint) -> String {
    let (host, port) = host_port(endpoint);
    let host = if host.contains(':') {
        format!("[{host}]") // IPv6 literal
    } else {
        host.to_owned()
    };
    match port {
        443 => host,
        port => format!("{host}:{port}"),
    }
}

/// The host and port to connect to for `endpoint` (HTTP/2 provider API).
pub fn host_port(endpoint: &Endpoint) -> (&str, u16) {
    match endpoint {
        Endpoint::Apple(Environment::Production) => ("api.push.apple.com", 443),
        Endpoint::Apple(Environment::Sandbox) => ("api.sandbox.push.apple.com", 443),
        Endpoint::Custom { host, port } => (host.as_str(), *port),
        Endpoint::PerRow => unreachable!("only a Web Push app has no endpoint (config::apps)"),
    }
}

/// Builds the request for `n`, or says why the row must fail without one.
/// `apns_id` is a parameter so the function stays pure; callers pass `Uuid::new_v4()`.
/// A push to a device; a broadcast row (one naming a channel) is [`super::broadcast`]'s.
pub fn build(n: &Notification, app: &AppConfig, apns_id: Uuid) -> Result<ApnsRequest, String> {
    check_token(&n.device_token)?;
    let push_type: PushType = n.push_type.parse().map_err(|_| {
        let known: Vec<_> = PushType::ALL.iter().map(|p| p.as_str()).collect();
        format!(
            "InvalidPushType: unknown push type {:?} (known: {})",
            n.push_type,
            known.join(", ")
        )
    })?;
    let topic = topic(n, app, push_type)?;

    let mut headers = HeaderMap::new();
    headers.insert(APNS_PUSH_TYPE, HeaderValue::from_static(push_type.as_str()));
    headers.insert(
        APNS_TOPIC,
        HeaderValue::from_str(&topic).map_err(|_| {
            format!("BadTopic: topic {topic:?} has characters a header cannot carry")
        })?,
    );
    if let Some(priority) = n.priority.or(push_type.priority_when_unset()) {
        if !matches!(priority, 1 | 5 | 10) {
            return Err(format!(
                "BadPriority: priority {priority} is not one of 1, 5 and 10"
            ));
        }
        if !push_type.allows_priority(priority) {
            return Err(format!(
                "BadPriority: priority {priority} is not allowed for {push_type} pushes \
                 (they need 5 or 1)"
            ));
        }
        headers.insert(APNS_PRIORITY, HeaderValue::from(priority));
    }
    if let Some(expires_at) = n.expires_at {
        // Before 1970 is nonsense a CHECK would catch; 0 ("try once, do not store") is
        // the closest meaning.
        let secs = expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        headers.insert(APNS_EXPIRATION, HeaderValue::from(secs));
    }
    if let Some(collapse_id) = &n.collapse_id {
        if collapse_id.len() > MAX_COLLAPSE_ID {
            return Err(format!(
                "BadCollapseId: collapse id is {} bytes, the limit is {MAX_COLLAPSE_ID}",
                collapse_id.len()
            ));
        }
        headers.insert(
            APNS_COLLAPSE_ID,
            HeaderValue::from_str(collapse_id).map_err(|_| {
                "BadCollapseId: collapse id has characters a header cannot carry".to_owned()
            })?,
        );
    }
    headers.insert(
        APNS_ID,
        HeaderValue::from_str(&apns_id.hyphenated().to_string()).expect("a UUID is ASCII"),
    );

    let body = payload(n, push_type)?;
    let uri = format!(
        "https://{}/3/device/{}",
        authority(&app.endpoint),
        n.device_token
    )
    .parse::<http::Uri>()
    .map_err(|e| format!("cannot build the request URI: {e}"))?;
    Ok(ApnsRequest {
        uri,
        headers,
        body,
        apns_id,
        push_type,
    })
}

fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("MissingDeviceToken: the device token is empty".to_owned());
    }
    let described = || {
        format!(
            "the device token ({} characters, starting {:?})",
            token.chars().count(),
            crate::transport::short_token(token)
        )
    };
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("BadDeviceToken: {} is not hex", described()));
    }
    if token.len() % 2 != 0 {
        return Err(format!(
            "BadDeviceToken: {} has an odd number of hex digits",
            described()
        ));
    }
    Ok(())
}

fn topic(n: &Notification, app: &AppConfig, push_type: PushType) -> Result<String, String> {
    let topic = push_type
        .topic_for(n.topic.as_deref(), app.topic.as_deref())
        .ok_or_else(|| {
            format!(
                "MissingTopic: the row has no topic and [apps.{}] sets none",
                app.name
            )
        })?;
    if !push_type.topic_matches(&topic) {
        return Err(match push_type.topic_suffix() {
            Some(suffix) => format!(
                "BadTopic: topic {topic:?} does not fit push type {push_type}, which needs \
                 a bundle id followed by {suffix:?}"
            ),
            None if topic.is_empty() => "MissingTopic: the row's topic is empty".to_owned(),
            None => format!(
                "BadTopic: topic {topic:?} carries another push type's suffix, which push \
                 type {push_type} cannot use"
            ),
        });
    }
    Ok(topic)
}

/// The body: the row's payload text as it is (never re-serialized, so no number is
/// rounded), once it is a JSON object within the push type's limit, counted in the bytes
/// sent.
fn payload(n: &Notification, push_type: PushType) -> Result<Bytes, String> {
    match crate::transport::payload_kind(&n.payload) {
        Ok(None) => {}
        Ok(Some(kind)) => {
            return Err(format!(
                "the payload is {kind}, not a JSON object like {{\"aps\": {{...}}}}"
            ))
        }
        Err(e) => return Err(format!("BadPayload: the payload is not JSON: {e}")),
    }
    if push_type == PushType::LiveActivity {
        crate::apns::live_activity::check(&n.payload)?;
    }
    let limit = push_type.max_payload();
    if n.payload.len() > limit {
        return Err(format!(
            "PayloadTooLarge: payload is {} bytes, the limit for {push_type} pushes is {limit}",
            n.payload.len()
        ));
    }
    Ok(Bytes::copy_from_slice(n.payload.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Auth, CertificateAuth, Protocol};
    use serde_json::json;
    use std::time::{Duration, SystemTime};

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn app(endpoint: Endpoint) -> AppConfig {
        AppConfig {
            name: "default".into(),
            topic: Some("com.example.app".into()),
            endpoint,
            ca_file: None,
            protocol: Protocol::Http2,
            connections: 1,
            request_timeout: Duration::from_secs(10),
            auth: Auth::Certificate(CertificateAuth {
                file: "ck.pem".into(),
                passphrase_file: None,
            }),
            binary: Default::default(),
            channels: None,
            proxy: Default::default(),
        }
    }

    fn row() -> Notification {
        Notification {
            id: 1,
            app: "default".into(),
            device_token: TOKEN.into(),
            payload: json!({"aps": {"alert": "hi"}}).to_string(),
            push_type: "alert".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts: 0,
            broadcast: None,
        }
    }

    fn build_ok(n: &Notification) -> ApnsRequest {
        build(
            n,
            &app(Endpoint::Apple(Environment::Production)),
            Uuid::nil(),
        )
        .unwrap()
    }

    fn build_err(n: &Notification) -> String {
        build(
            n,
            &app(Endpoint::Apple(Environment::Production)),
            Uuid::nil(),
        )
        .unwrap_err()
    }

    fn header<'a>(r: &'a ApnsRequest, name: &HeaderName) -> Option<&'a str> {
        r.headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn a_plain_alert() {
        let r = build_ok(&row());
        assert_eq!(
            r.uri.to_string(),
            format!("https://api.push.apple.com/3/device/{TOKEN}")
        );
        assert_eq!(header(&r, &APNS_PUSH_TYPE), Some("alert"));
        assert_eq!(header(&r, &APNS_TOPIC), Some("com.example.app"));
        assert_eq!(
            header(&r, &APNS_ID),
            Some("00000000-0000-0000-0000-000000000000")
        );
        for absent in [&APNS_PRIORITY, &APNS_EXPIRATION, &APNS_COLLAPSE_ID] {
            assert_eq!(header(&r, absent), None, "{absent}");
        }
        assert_eq!(&r.body[..], br#"{"aps":{"alert":"hi"}}"#);

        let http = r.to_http(Some("a.b.c"));
        assert_eq!(http.method(), http::Method::POST);
        assert_eq!(http.version(), http::Version::HTTP_2);
        assert_eq!(http.headers()[AUTHORIZATION], "bearer a.b.c");
        assert!(r.to_http(None).headers().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn authority_follows_the_endpoint() {
        assert_eq!(
            authority(&Endpoint::Apple(Environment::Sandbox)),
            "api.sandbox.push.apple.com"
        );
        let custom = |host: &str, port| Endpoint::Custom {
            host: host.into(),
            port,
        };
        assert_eq!(authority(&custom("127.0.0.1", 2197)), "127.0.0.1:2197");
        assert_eq!(authority(&custom("::1", 8443)), "[::1]:8443");
        assert_eq!(authority(&custom("gw.example.com", 443)), "gw.example.com");
        let r = build(&row(), &app(custom("127.0.0.1", 2197)), Uuid::nil()).unwrap();
        assert_eq!(r.uri.authority().unwrap().as_str(), "127.0.0.1:2197");
    }

    #[test]
    fn optional_headers_when_the_row_sets_them() {
        let mut n = row();
        n.priority = Some(5);
        n.collapse_id = Some("score".into());
        n.expires_at = Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_900));
        let r = build_ok(&n);
        assert_eq!(header(&r, &APNS_PRIORITY), Some("5"));
        assert_eq!(header(&r, &APNS_COLLAPSE_ID), Some("score"));
        assert_eq!(header(&r, &APNS_EXPIRATION), Some("1700000000"));
    }

    #[test]
    fn topics() {
        let mut n = row();
        n.push_type = "voip".into();
        assert_eq!(
            header(&build_ok(&n), &APNS_TOPIC),
            Some("com.example.app.voip")
        );
        n.topic = Some("com.other.app.voip".into());
        assert_eq!(
            header(&build_ok(&n), &APNS_TOPIC),
            Some("com.other.app.voip")
        );

        n.topic = Some("com.other.app".into());
        let e = build_err(&n);
        assert!(
            e.starts_with("BadTopic: topic \"com.other.app\" does not fit push type voip"),
            "{e}"
        );
        assert!(e.contains("\".voip\""), "{e}");

        let mut n = row();
        n.topic = Some("com.example.app.voip".into());
        assert!(build_err(&n).starts_with("BadTopic: "));

        let mut n = row();
        n.topic = Some(String::new());
        assert!(build_err(&n).starts_with("MissingTopic: "));

        let mut a = app(Endpoint::Apple(Environment::Production));
        a.topic = None;
        let e = build(&row(), &a, Uuid::nil()).unwrap_err();
        assert_eq!(
            e,
            "MissingTopic: the row has no topic and [apps.default] sets none"
        );

        let mut n = row();
        n.topic = Some("com.example\napp".into());
        assert!(build_err(&n).starts_with("BadTopic: "));
    }

    #[test]
    fn device_tokens_must_be_even_length_hex() {
        let mut n = row();
        n.device_token = "ABCDEF0123".into(); // short and upper case: fine
        build_ok(&n);
        n.device_token = String::new();
        assert!(build_err(&n).starts_with("MissingDeviceToken: "));
        n.device_token = "abc".into();
        let e = build_err(&n);
        assert!(
            e.starts_with("BadDeviceToken: ") && e.contains("odd number"),
            "{e}"
        );
        n.device_token = "zz".repeat(32);
        let e = build_err(&n);
        assert_eq!(
            e,
            "BadDeviceToken: the device token (64 characters, starting \"zzzzzzzz\") is not hex"
        );
        n.device_token = "ab/../cd".into();
        assert!(build_err(&n).starts_with("BadDeviceToken: "));
    }

    #[test]
    fn unknown_push_types() {
        let mut n = row();
        n.push_type = "Alert".into();
        let e = build_err(&n);
        assert!(
            e.starts_with("InvalidPushType: unknown push type \"Alert\" (known: alert, background"),
            "{e}"
        );
    }

    #[test]
    fn priorities() {
        let mut n = row();
        for ok in [1, 5, 10] {
            n.priority = Some(ok);
            build_ok(&n);
        }
        n.priority = Some(7);
        assert_eq!(
            build_err(&n),
            "BadPriority: priority 7 is not one of 1, 5 and 10"
        );
        n.push_type = "background".into();
        n.priority = Some(10);
        assert_eq!(
            build_err(&n),
            "BadPriority: priority 10 is not allowed for background pushes (they need 5 or 1)"
        );
        n.priority = Some(5);
        build_ok(&n);
    }

    #[test]
    fn collapse_ids_up_to_64_bytes() {
        let mut n = row();
        n.collapse_id = Some("x".repeat(64));
        build_ok(&n);
        n.collapse_id = Some("é".repeat(33)); // 66 bytes, 33 characters
        assert_eq!(
            build_err(&n),
            "BadCollapseId: collapse id is 66 bytes, the limit is 64"
        );
        n.collapse_id = Some("a\u{7}b".into());
        assert!(build_err(&n).starts_with("BadCollapseId: "));
    }

    #[test]
    fn payloads_must_be_objects() {
        let mut n = row();
        n.payload = json!(["aps"]).to_string();
        assert_eq!(
            build_err(&n),
            "the payload is an array, not a JSON object like {\"aps\": {...}}"
        );
        n.payload = json!("hi").to_string();
        assert!(build_err(&n).starts_with("the payload is a string"));
    }

    #[test]
    fn payload_limits_by_push_type() {
        // {"aps":{},"x":""} is 17 bytes plus the filler.
        let sized = |total: usize| json!({"aps": {}, "x": "a".repeat(total - 17)}).to_string();
        let mut n = row();
        n.payload = sized(4096);
        assert_eq!(build_ok(&n).body.len(), 4096);
        n.payload = sized(4097);
        assert_eq!(
            build_err(&n),
            "PayloadTooLarge: payload is 4097 bytes, the limit for alert pushes is 4096"
        );
        n.push_type = "voip".into();
        build_ok(&n);
        n.payload = sized(5120);
        build_ok(&n);
        n.payload = sized(5121);
        assert_eq!(
            build_err(&n),
            "PayloadTooLarge: payload is 5121 bytes, the limit for voip pushes is 5120"
        );
    }

    /// PostgreSQL's text for a jsonb payload, as the claim reads it.
    const PG_TEXT: &str = r#"{"pi": 3.14159265358979323846264338327950288, "aps": {"alert": "x"}, "big": 123456789012345678901234567890}"#;

    #[test]
    fn the_body_is_the_rows_text_byte_for_byte() {
        let mut n = row();
        n.payload = PG_TEXT.into();
        assert_eq!(&build_ok(&n).body[..], PG_TEXT.as_bytes());
    }

    #[test]
    fn the_limit_counts_the_bytes_sent() {
        // PostgreSQL's text has a space after each ':' and ',': those bytes count;
        // {"x": "", "aps": {}} is 20 bytes plus the filler.
        let sized = |total: usize| format!(r#"{{"x": "{}", "aps": {{}}}}"#, "a".repeat(total - 20));
        let mut n = row();
        n.payload = sized(4096);
        assert_eq!(build_ok(&n).body.len(), 4096);
        n.payload = sized(4097);
        assert_eq!(
            build_err(&n),
            "PayloadTooLarge: payload is 4097 bytes, the limit for alert pushes is 4096"
        );
    }

    #[test]
    fn payloads_that_are_not_json() {
        let mut n = row();
        n.payload = r#"{"aps": "#.into();
        assert!(build_err(&n).starts_with("BadPayload: the payload is not JSON: "));
        // Beyond f64 is still JSON: not ours to refuse here.
        n.payload = r#"{"aps": {}, "n": 1e400}"#.into();
        assert_eq!(&build_ok(&n).body[..], br#"{"aps": {}, "n": 1e400}"#);
        n.payload = " 12 ".into();
        assert!(build_err(&n).starts_with("the payload is a number"));
    }

    #[test]
    fn expiration_before_the_epoch_means_zero() {
        let mut n = row();
        n.expires_at = Some(SystemTime::UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(header(&build_ok(&n), &APNS_EXPIRATION), Some("0"));
    }
}
