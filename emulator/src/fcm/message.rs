//! The body of `messages:send`, checked as FCM documents it (the `projects.messages`
//! reference, `ErrorCode`'s INVALID_ARGUMENT causes): pure, from bytes to the message and
//! its target, or the 400 Google would answer.
//!
//! `{"validate_only": bool, "message": Message}`, where `Message` is
//!
//! - `data`: a map of string to string; no reserved key (`from`, `message_type`, `gcm`,
//!   any key starting with `google` or `gcm.notification.`);
//! - `notification`: `title`, `body`, `image`, strings;
//! - `android`: `collapse_key`, `priority` (`NORMAL` or `HIGH`, either case), `ttl` (a
//!   Duration string, `"3.5s"`, 0 to 4 weeks), `restricted_package_name`, `data` (as
//!   above), `notification` (an object; its many keys are not checked), `fcm_options`,
//!   `direct_boot_ok`, `bandwidth_constrained_ok`, `restricted_satellite_ok`;
//! - `webpush`, `apns`, `fcm_options`: objects, their contents not checked;
//! - `name`: output only, ignored;
//! - exactly one target: `token`, `topic` or `condition`.
//!
//! As Google's JSON parser does (proto3 JSON), field names may be snake_case or
//! lowerCamelCase, a `null` field is an absent one, and an unknown name or a value of the
//! wrong type is refused with the parser's wording ("Invalid JSON payload received.
//! Unknown name ...", "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"),
//! with no `FcmError` detail; FCM's own checks (target, token, reserved keys, size, TTL)
//! add `FcmError` `INVALID_ARGUMENT`.
//!
//! Size: the bytes of the keys and string values of `data`, `notification`,
//! `android.data` and `android.notification` may be at most [`MAX_PAYLOAD_BYTES`], or
//! [`MAX_TOPIC_PAYLOAD_BYTES`] for a message to a topic (`ErrorCode`: "4096 bytes for
//! most messages, or 2048 bytes in the case of messages to topics. This includes both the
//! keys and the values.").
//!
//! Registration tokens have no documented format: the emulator refuses an empty one and
//! one with characters outside `A-Z a-z 0-9 - _ :` (those of every token FCM issues).

use serde_json::{Map, Value};

pub const MAX_PAYLOAD_BYTES: usize = 4096;
pub const MAX_TOPIC_PAYLOAD_BYTES: usize = 2048;
/// The longest `android.ttl` (four weeks).
pub const MAX_TTL_SECS: u64 = 2_419_200;

const REQUEST_FIELDS: &[&str] = &["validate_only", "message"];
const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
];
const NOTIFICATION_FIELDS: &[&str] = &["title", "body", "image"];
const ANDROID_FIELDS: &[&str] = &[
    "collapse_key",
    "priority",
    "ttl",
    "restricted_package_name",
    "data",
    "notification",
    "fcm_options",
    "direct_boot_ok",
    "bandwidth_constrained_ok",
    "restricted_satellite_ok",
];
const TARGETS: [&str; 3] = ["token", "topic", "condition"];
const TYPE_PREFIX: &str = "type.googleapis.com/google.firebase.fcm.v1.";

/// Whom a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Token(String),
    Topic(String),
    Condition(String),
}

impl Target {
    /// The registration token, topic name or condition.
    pub fn as_str(&self) -> &str {
        match self {
            Target::Token(s) | Target::Topic(s) | Target::Condition(s) => s,
        }
    }
}

/// A valid `messages:send` body.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub validate_only: bool,
    /// `message`, as sent.
    pub message: Value,
    pub target: Target,
}

/// A refused body: what to answer 400 `INVALID_ARGUMENT` with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    /// The field violated, as Google names it (`message.data[0].value`).
    pub field: Option<String>,
    /// FCM's own check (an `FcmError` `INVALID_ARGUMENT` detail), not the JSON parser's.
    pub fcm: bool,
}

fn parser_error(message: String, field: Option<&str>) -> Invalid {
    Invalid {
        message,
        field: field.map(str::to_owned),
        fcm: false,
    }
}

fn fcm_error(message: impl Into<String>, field: &str) -> Invalid {
    Invalid {
        message: message.into(),
        field: Some(field.to_owned()),
        fcm: true,
    }
}

fn wrong_type(at: &str, type_name: &str, value: &Value) -> Invalid {
    parser_error(
        format!("Invalid value at '{at}' ({type_name}), {value}"),
        Some(at),
    )
}

/// Checks a `messages:send` body.
pub fn check_send(body: &[u8]) -> Result<SendRequest, Invalid> {
    let request: Value = serde_json::from_slice(body).map_err(|e| {
        parser_error(
            format!("Invalid JSON payload received. Unexpected token: {e}."),
            None,
        )
    })?;
    let Value::Object(request) = request else {
        return Err(parser_error(
            format!("Invalid JSON payload received. Expected an object, not {request}."),
            None,
        ));
    };
    let request = fields(&request, REQUEST_FIELDS, None)?;
    let validate_only = match request.get("validate_only") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong_type("validate_only", "TYPE_BOOL", other)),
    };
    let Some(message) = request.get("message") else {
        return Err(no_recipient());
    };
    let Value::Object(raw) = message else {
        return Err(wrong_type(
            "message",
            &format!("{TYPE_PREFIX}Message"),
            message,
        ));
    };
    let m = fields(raw, MESSAGE_FIELDS, Some("message"))?;
    for name in ["name", "token", "topic", "condition"] {
        string(&m, name, "message")?;
    }
    let data = string_map(&m, "data", "message", "Message.DataEntry")?;
    let notification = object(&m, "notification", "message", "Notification")?;
    if let Some(n) = notification {
        let n = fields(n, NOTIFICATION_FIELDS, Some("message.notification"))?;
        for name in NOTIFICATION_FIELDS {
            string(&n, name, "message.notification")?;
        }
    }
    let android = object(&m, "android", "message", "AndroidConfig")?;
    let (android_data, android_notification) = match android {
        Some(a) => check_android(a)?,
        None => (None, None),
    };
    object(&m, "webpush", "message", "WebpushConfig")?;
    object(&m, "apns", "message", "ApnsConfig")?;
    object(&m, "fcm_options", "message", "FcmOptions")?;

    let set: Vec<&str> = TARGETS.into_iter().filter(|t| m.contains_key(*t)).collect();
    let target = match set.as_slice() {
        [] => return Err(no_recipient()),
        [one] => {
            let value = m[*one].as_str().unwrap_or_default().to_owned();
            match *one {
                "token" => Target::Token(value),
                "topic" => Target::Topic(value),
                _ => Target::Condition(value),
            }
        }
        [_, second, ..] => {
            return Err(parser_error(
                format!(
                    "Invalid JSON payload received. Oneof field 'target' is already set. \
                     Cannot set '{second}'"
                ),
                None,
            ))
        }
    };
    check_target(&target)?;
    for (map, at) in [
        (data, "message.data"),
        (android_data, "message.android.data"),
    ] {
        if let Some(key) = map.and_then(|m| m.keys().find(|k| is_reserved(k))) {
            return Err(fcm_error(
                format!("Invalid data payload key: {key:?} is reserved by FCM"),
                at,
            ));
        }
    }
    let size = [data, notification, android_data, android_notification]
        .into_iter()
        .flatten()
        .map(payload_bytes)
        .sum::<usize>();
    let limit = match target {
        Target::Topic(_) => MAX_TOPIC_PAYLOAD_BYTES,
        _ => MAX_PAYLOAD_BYTES,
    };
    if size > limit {
        return Err(fcm_error(
            format!(
                "Message is too big: its data and notification payload is {size} bytes, \
                 more than FCM's limit of {limit}"
            ),
            "message",
        ));
    }
    Ok(SendRequest {
        validate_only,
        message: (*message).clone(),
        target,
    })
}

type Fields<'a> = std::collections::HashMap<String, &'a Value>;

/// The object's fields by their snake_case name, `null` ones left out; an unknown name is
/// refused as Google's parser does.
fn fields<'a>(
    object: &'a Map<String, Value>,
    known: &[&str],
    at: Option<&str>,
) -> Result<Fields<'a>, Invalid> {
    let mut out = Fields::new();
    for (name, value) in object {
        let snake = snake_case(name);
        if !known.contains(&snake.as_str()) {
            let place = at.map(|a| format!(" at '{a}'")).unwrap_or_default();
            return Err(parser_error(
                format!("Invalid JSON payload received. Unknown name {name:?}{place}: Cannot find field."),
                at,
            ));
        }
        if !value.is_null() {
            out.insert(snake, value);
        }
    }
    Ok(out)
}

/// `fcmOptions` → `fcm_options`: proto3 JSON accepts either.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn string<'a>(fields: &Fields<'a>, name: &str, at: &str) -> Result<Option<&'a str>, Invalid> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(&format!("{at}.{name}"), "TYPE_STRING", other)),
    }
}

fn object<'a>(
    fields: &Fields<'a>,
    name: &str,
    at: &str,
    type_name: &str,
) -> Result<Option<&'a Map<String, Value>>, Invalid> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(wrong_type(
            &format!("{at}.{name}"),
            &format!("{TYPE_PREFIX}{type_name}"),
            other,
        )),
    }
}

fn string_map<'a>(
    fields: &Fields<'a>,
    name: &str,
    at: &str,
    entry_type: &str,
) -> Result<Option<&'a Map<String, Value>>, Invalid> {
    let Some(map) = object(fields, name, at, entry_type)? else {
        return Ok(None);
    };
    for (i, value) in map.values().enumerate() {
        if !value.is_string() {
            return Err(wrong_type(
                &format!("{at}.{name}[{i}].value"),
                "TYPE_STRING",
                value,
            ));
        }
    }
    Ok(Some(map))
}

type AndroidPayload<'a> = (
    Option<&'a Map<String, Value>>,
    Option<&'a Map<String, Value>>,
);

fn check_android(android: &Map<String, Value>) -> Result<AndroidPayload<'_>, Invalid> {
    const AT: &str = "message.android";
    let a = fields(android, ANDROID_FIELDS, Some(AT))?;
    for name in ["collapse_key", "restricted_package_name"] {
        string(&a, name, AT)?;
    }
    for name in [
        "direct_boot_ok",
        "bandwidth_constrained_ok",
        "restricted_satellite_ok",
    ] {
        if let Some(value) = a.get(name).filter(|v| !v.is_boolean()) {
            return Err(wrong_type(&format!("{AT}.{name}"), "TYPE_BOOL", value));
        }
    }
    if let Some(priority) = a.get("priority") {
        let known = priority
            .as_str()
            .is_some_and(|p| p.eq_ignore_ascii_case("normal") || p.eq_ignore_ascii_case("high"));
        if !known {
            return Err(wrong_type(
                "message.android.priority",
                &format!("{TYPE_PREFIX}AndroidMessagePriority"),
                priority,
            ));
        }
    }
    if let Some(ttl) = a.get("ttl") {
        let Some(seconds) = ttl.as_str().and_then(duration_seconds) else {
            return Err(wrong_type(
                "message.android.ttl",
                "type.googleapis.com/google.protobuf.Duration",
                ttl,
            ));
        };
        if seconds > MAX_TTL_SECS {
            return Err(fcm_error(
                format!("The TTL is {seconds} seconds; it must be 0 to {MAX_TTL_SECS} (4 weeks)"),
                "message.android.ttl",
            ));
        }
    }
    let data = string_map(&a, "data", AT, "AndroidConfig.DataEntry")?;
    let notification = object(&a, "notification", AT, "AndroidNotification")?;
    object(&a, "fcm_options", AT, "AndroidFcmOptions")?;
    Ok((data, notification))
}

/// A proto3 JSON Duration (`"3s"`, `"3.000000001s"`, `"0.5s"`) in whole seconds.
fn duration_seconds(text: &str) -> Option<u64> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (number, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f) || f.len() > 9) {
        return None;
    }
    whole.parse().ok()
}

fn no_recipient() -> Invalid {
    fcm_error("Recipient of the message is not set.", "message")
}

fn check_target(target: &Target) -> Result<(), Invalid> {
    match target {
        Target::Token(token) => {
            let valid = !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
            if !valid {
                return Err(fcm_error(
                    "The registration token is not a valid FCM registration token",
                    "message.token",
                ));
            }
        }
        Target::Topic(topic) => {
            let valid = !topic.is_empty()
                && topic.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%')
                });
            if !valid {
                return Err(fcm_error(
                    format!("Invalid topic name {topic:?}: it must match [a-zA-Z0-9-_.~%]+, without /topics/"),
                    "message.topic",
                ));
            }
        }
        Target::Condition(condition) => {
            if condition.trim().is_empty() {
                return Err(fcm_error("The condition is empty", "message.condition"));
            }
        }
    }
    Ok(())
}

/// FCM's own keys, which a data payload may not use.
fn is_reserved(key: &str) -> bool {
    matches!(key, "from" | "message_type" | "gcm")
        || key.starts_with("google")
        || key.starts_with("gcm.notification.")
}

/// The bytes of an object's keys and string values (arrays of strings counted too).
fn payload_bytes(object: &Map<String, Value>) -> usize {
    let value_bytes = |v: &Value| match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    object.iter().map(|(k, v)| k.len() + value_bytes(v)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> SendRequest {
        check_send(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn refused(body: &str) -> Invalid {
        match check_send(body.as_bytes()) {
            Ok(r) => panic!("{body} was accepted: {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn valid_messages() {
        let r = ok(
            r#"{"message": {"token": "abc:APA91b-x_y", "data": {"k": "v"},
                       "notification": {"title": "T", "body": "B"}}}"#,
        );
        assert_eq!(r.target, Target::Token("abc:APA91b-x_y".into()));
        assert!(!r.validate_only);
        assert_eq!(r.message["data"]["k"], "v");
        let r = ok(r#"{"validateOnly": true, "message": {"topic": "news.daily~1%2"}}"#);
        assert_eq!(
            (r.validate_only, r.target),
            (true, Target::Topic("news.daily~1%2".into()))
        );
        let r = ok(r#"{"message": {"condition": "'a' in topics", "token": null}}"#);
        assert_eq!(r.target, Target::Condition("'a' in topics".into()));
        ok(
            r#"{"message": {"token": "t", "name": "ignored", "fcmOptions": {"analytics_label": "x"},
               "webpush": {}, "apns": {"payload": {"aps": {}}},
               "android": {"collapseKey": "c", "priority": "high", "ttl": "3.5s",
                           "restricted_package_name": "com.example", "direct_boot_ok": true,
                           "data": {"a": "b"}, "notification": {"channel_id": "x", "body_loc_args": ["1"]},
                           "fcm_options": {}}}}"#,
        );
        ok(r#"{"message": {"token": "t", "android": {"priority": "NORMAL", "ttl": "2419200s"}}}"#);
    }

    #[test]
    fn the_parser_refuses_unknown_names_and_wrong_types() {
        let e = refused(r#"{"message": {"token": "t", "priority": "high"}}"#);
        assert_eq!(
            e,
            Invalid {
                message: "Invalid JSON payload received. Unknown name \"priority\" at 'message': Cannot find field.".into(),
                field: Some("message".into()),
                fcm: false,
            }
        );
        let e = refused(r#"{"message": {"token": "t"}, "to": "x"}"#);
        assert_eq!(
            e.message,
            "Invalid JSON payload received. Unknown name \"to\": Cannot find field."
        );
        let e =
            refused(r#"{"message": {"token": "t", "notification": {"title": "a", "data": {}}}}"#);
        assert!(
            e.message
                .contains("Unknown name \"data\" at 'message.notification'"),
            "{e:?}"
        );
        let e = refused(r#"{"message": {"token": "t", "android": {"time_to_live": 3}}}"#);
        assert!(e.message.contains("at 'message.android'"), "{e:?}");

        let e = refused(r#"{"message": {"token": "t", "data": {"a": "1", "b": 12}}}"#);
        assert_eq!(
            e.message,
            "Invalid value at 'message.data[1].value' (TYPE_STRING), 12"
        );
        assert_eq!(
            (e.field.as_deref(), e.fcm),
            (Some("message.data[1].value"), false)
        );
        let e = refused(r#"{"message": {"token": "t", "data": {"a": true}}}"#);
        assert_eq!(e.field.as_deref(), Some("message.data[0].value"));
        let e = refused(r#"{"message": {"token": 7}}"#);
        assert_eq!(
            e.message,
            "Invalid value at 'message.token' (TYPE_STRING), 7"
        );
        let e = refused(r#"{"message": {"token": "t", "data": ["a"]}}"#);
        assert_eq!(e.field.as_deref(), Some("message.data"));
        let e = refused(r#"{"message": {"token": "t", "android": {"priority": "urgent"}}}"#);
        assert_eq!(e.field.as_deref(), Some("message.android.priority"));
        for ttl in [
            r#""1h""#,
            r#""s""#,
            r#""1.s""#,
            "30",
            r#""-1s""#,
            r#""1.0000000001s""#,
        ] {
            let e = refused(&format!(
                r#"{{"message": {{"token": "t", "android": {{"ttl": {ttl}}}}}}}"#
            ));
            assert_eq!(e.field.as_deref(), Some("message.android.ttl"), "{ttl}");
        }
        let e = refused(r#"{"message": {"token": "t", "android": {"direct_boot_ok": "yes"}}}"#);
        assert!(e.message.contains("(TYPE_BOOL)"), "{e:?}");
        let e = refused(r#"{"validate_only": 1, "message": {"token": "t"}}"#);
        assert!(e.message.contains("(TYPE_BOOL)"));
        assert!(refused("not json")
            .message
            .starts_with("Invalid JSON payload received."));
        assert!(refused("[1]")
            .message
            .starts_with("Invalid JSON payload received."));
        let e = refused(r#"{"message": "t"}"#);
        assert_eq!(e.field.as_deref(), Some("message"));
    }

    #[test]
    fn exactly_one_target() {
        for body in [
            r#"{"message": {"data": {"a": "b"}}}"#,
            r#"{}"#,
            r#"{"message": {"token": null}}"#,
        ] {
            let e = refused(body);
            assert_eq!(
                e,
                Invalid {
                    message: "Recipient of the message is not set.".into(),
                    field: Some("message".into()),
                    fcm: true,
                },
                "{body}"
            );
        }
        let e = refused(r#"{"message": {"token": "t", "topic": "x"}}"#);
        assert_eq!(
            e.message,
            "Invalid JSON payload received. Oneof field 'target' is already set. Cannot set 'topic'"
        );
        assert!(!e.fcm);
        refused(r#"{"message": {"token": "t", "topic": "x", "condition": "c"}}"#);
    }

    #[test]
    fn fcms_own_checks() {
        for token in ["", "a b", "a/b", "é"] {
            let e = refused(&format!(r#"{{"message": {{"token": "{token}"}}}}"#));
            assert_eq!(
                (e.message.as_str(), e.field.as_deref(), e.fcm),
                (
                    "The registration token is not a valid FCM registration token",
                    Some("message.token"),
                    true
                ),
                "{token:?}"
            );
        }
        for topic in ["/topics/news", "", "a b"] {
            let e = refused(&format!(r#"{{"message": {{"topic": "{topic}"}}}}"#));
            assert_eq!(e.field.as_deref(), Some("message.topic"), "{topic:?}");
        }
        assert_eq!(
            refused(r#"{"message": {"condition": " "}}"#)
                .field
                .as_deref(),
            Some("message.condition")
        );
        for key in [
            "from",
            "message_type",
            "gcm",
            "google.x",
            "googleapis",
            "gcm.notification.title",
        ] {
            let e = refused(&format!(
                r#"{{"message": {{"token": "t", "data": {{"{key}": "v"}}}}}}"#
            ));
            assert_eq!(
                (e.field.as_deref(), e.fcm),
                (Some("message.data"), true),
                "{key}"
            );
            let e = refused(&format!(
                r#"{{"message": {{"token": "t", "android": {{"data": {{"{key}": "v"}}}}}}}}"#
            ));
            assert_eq!(e.field.as_deref(), Some("message.android.data"), "{key}");
        }
        ok(
            r#"{"message": {"token": "t", "data": {"collapse_key": "v", "fromage": "v", "gcm_x": "v"}}}"#,
        );
        let e = refused(r#"{"message": {"token": "t", "android": {"ttl": "2419201s"}}}"#);
        assert_eq!(
            (e.field.as_deref(), e.fcm),
            (Some("message.android.ttl"), true)
        );
    }

    #[test]
    fn payload_size_counts_keys_and_values_of_data_and_notification() {
        // {"k": v}: 1 + len(v) bytes.
        let data = |n: usize| {
            format!(
                r#"{{"message": {{"token": "t", "data": {{"k": "{}"}}}}}}"#,
                "x".repeat(n - 1)
            )
        };
        ok(&data(4096));
        let e = refused(&data(4097));
        assert_eq!((e.field.as_deref(), e.fcm), (Some("message"), true));
        assert!(e.message.contains("4097 bytes"), "{e:?}");
        // Split across data, notification and android: 1+2000 + 5+1000 + 4+1086 = 4096.
        let split = |last: usize| {
            format!(
                r#"{{"message": {{"token": "t", "data": {{"k": "{}"}}, "notification": {{"title": "{}"}},
                "android": {{"data": {{"abcd": "{}"}}}}}}}}"#,
                "x".repeat(2000),
                "y".repeat(1000),
                "z".repeat(last)
            )
        };
        ok(&split(1086));
        refused(&split(1087));
        let topic = |n: usize| {
            format!(
                r#"{{"message": {{"topic": "t", "data": {{"k": "{}"}}}}}}"#,
                "x".repeat(n - 1)
            )
        };
        ok(&topic(2048));
        assert!(refused(&topic(2049)).message.contains("limit of 2048"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration_seconds("0s"), Some(0));
        assert_eq!(duration_seconds("3.000000001s"), Some(3));
        assert_eq!(duration_seconds("3"), None);
        assert_eq!(
            snake_case("restrictedPackageName"),
            "restricted_package_name"
        );
    }
}
