//! An outbox row as FCM's `messages:send` body. For an FCM app the row's `payload` is
//! FCM's `message` object without its target (`notification`, `data`, `android`,
//! `webpush`, `apns`, `fcm_options`), and `device_token` is the registration token.
//!
//! What FCM would refuse is refused here first, with a reason that names the rule, so
//! the row fails at once instead of costing a request. The body is built around the
//! payload's own text, as the APNs request is: no number is re-serialized.

use serde_json::Value;

use super::expiry::{self, Expiry};

/// FCM's limit on a message (keys and values included).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// The `message` fields a row may set.
pub const KNOWN_KEYS: [&str; 6] = [
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
];
/// The longest registration token accepted (they are about 160 characters today).
const MAX_TOKEN_LEN: usize = 4096;

/// The request body for `token` and the row's `payload` text (a JSON object), with the
/// row's `expiry` on each platform's field when it has one, or why the row cannot be
/// sent.
pub fn body(token: &str, payload: &str, expiry: Option<Expiry>) -> Result<String, String> {
    check_token(token)?;
    check_payload(payload)?;
    let inner = payload.trim();
    // `{` + the payload's members (if any) + `}`, the token first.
    let with_expiry;
    let members = match expiry {
        None => inner[1..inner.len() - 1].trim(),
        Some(e) => {
            with_expiry = expiry::members(inner, e)?;
            &with_expiry
        }
    };
    let token = serde_json::to_string(token).expect("a string serializes");
    Ok(match members.is_empty() {
        true => format!(r#"{{"message":{{"token":{token}}}}}"#),
        false => format!(r#"{{"message":{{"token":{token},{members}}}}}"#),
    })
}

/// A registration token: FCM's characters only (letters, digits, `-`, `_`, `:`).
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err("not an FCM registration token (empty or too long)".to_owned());
    }
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':')))
    {
        return Err(format!(
            "not an FCM registration token: {c:?} is not one of its characters"
        ));
    }
    Ok(())
}

/// The rules FCM documents for a message, checked on the row's payload.
pub fn check_payload(payload: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let Value::Object(message) = value else {
        return Err("the payload is not a JSON object (FCM's message)".to_owned());
    };
    for (key, v) in &message {
        match key.as_str() {
            "token" | "topic" | "condition" => {
                return Err(format!(
                    "the payload names a target ({key:?}): for an FCM app the row's device_token \
                     is the target"
                ))
            }
            k if !KNOWN_KEYS.contains(&k) => {
                return Err(format!(
                    "unknown key {k:?} in an FCM message (known: {})",
                    KNOWN_KEYS.join(", ")
                ))
            }
            // Google reads a null field as an absent one.
            _ if !(v.is_object() || v.is_null()) => {
                return Err(format!("{key:?} must be a JSON object"))
            }
            _ => {}
        }
    }
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(&Value::Object(message.clone()), |v, k| v.get(k))
            .filter(|v| !v.is_null())
            .cloned()
    };
    if let Some(data) = field(&["data"]) {
        check_data("data", &data)?;
    }
    if let Some(data) = field(&["android", "data"]) {
        check_data("android.data", &data)?;
    }
    // "The total size of the payload data ... includes both the keys and the values":
    // what reaches the device, the data and the notification, Android's own included.
    let size: usize = [
        field(&["data"]),
        field(&["notification"]),
        field(&["android", "data"]),
        field(&["android", "notification"]),
    ]
    .iter()
    .flatten()
    .map(keys_and_values)
    .sum();
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the FCM message carries {size} bytes of keys and values (data and notification), \
             over FCM's limit of {MAX_MESSAGE_BYTES}"
        ));
    }
    Ok(())
}

/// The bytes of an object's keys and values (a string's own bytes, anything else's JSON).
fn keys_and_values(object: &Value) -> usize {
    object.as_object().map_or(0, |map| {
        map.iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        Value::String(s) => s.len(),
                        other => other.to_string().len(),
                    }
            })
            .sum()
    })
}

/// `data` maps strings to strings, and FCM keeps some keys for itself.
fn check_data(field: &str, data: &Value) -> Result<(), String> {
    let Value::Object(data) = data else {
        return Err(format!("{field:?} must be a JSON object of strings"));
    };
    for (key, value) in data {
        if !value.is_string() {
            return Err(format!(
                "{field}.{key} must be a string (FCM data values are strings), not {value}"
            ));
        }
        if matches!(key.as_str(), "from" | "message_type" | "gcm")
            || key.starts_with("google")
            || key.starts_with("gcm.notification.")
        {
            return Err(format!("{field}.{key}: a key FCM reserves for itself"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_wraps_the_payload_text_with_the_token_first() {
        let token = "dXf1:APA91b-_x";
        assert_eq!(
            body(
                token,
                r#"{"data": {"price": "1.10"}, "notification": {"title": "Hi"}}"#,
                None
            )
            .unwrap(),
            r#"{"message":{"token":"dXf1:APA91b-_x","data": {"price": "1.10"}, "notification": {"title": "Hi"}}}"#
        );
        assert_eq!(
            body(token, " {} ", None).unwrap(),
            r#"{"message":{"token":"dXf1:APA91b-_x"}}"#
        );
        // Numbers stay as written (an android.ttl in seconds is a string; a priority is not).
        let b = body(
            token,
            r#"{"android": {"ttl": "3.5s", "notification": {"notification_count": 1e0}}}"#,
            None,
        )
        .unwrap();
        assert!(b.contains("1e0"), "{b}");
        let parsed: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(parsed["message"]["token"], token);
    }

    #[test]
    fn what_fcm_would_refuse_is_refused_first() {
        for (token, payload, expected) in [
            ("", "{}", "not an FCM registration token"),
            ("abc def", "{}", "' ' is not one of its characters"),
            ("t", r#"{"token": "x"}"#, "names a target (\"token\")"),
            ("t", r#"{"topic": "news"}"#, "names a target (\"topic\")"),
            (
                "t",
                r#"{"aps": {}}"#,
                "unknown key \"aps\" in an FCM message",
            ),
            ("t", r#"{"data": {"n": 1}}"#, "data.n must be a string"),
            ("t", r#"{"data": ["a"]}"#, "\"data\" must be a JSON object"),
            (
                "t",
                r#"{"android": {"data": {"n": true}}}"#,
                "android.data.n must be a string",
            ),
            (
                "t",
                r#"{"data": {"from": "x"}}"#,
                "data.from: a key FCM reserves",
            ),
            ("t", r#"{"data": {"google.c.a": "x"}}"#, "reserves"),
            ("t", r#"{"data": {"gcm": "x"}}"#, "reserves"),
            (
                "t",
                r#"{"data": {"gcm.notification.title": "x"}}"#,
                "reserves",
            ),
            (
                "t",
                r#"{"notification": "hi"}"#,
                "\"notification\" must be a JSON object",
            ),
            ("t", "[1]", "not a JSON object"),
        ] {
            let error = body(token, payload, None).unwrap_err();
            assert!(
                error.contains(expected),
                "{payload}: {error:?} lacks {expected:?}"
            );
        }
        // The limit counts the keys and values that reach the device: 1 + 4095 fits.
        let fits = format!(r#"{{"data": {{"k": "{}"}}}}"#, "x".repeat(4095));
        body("t", &fits, None).unwrap();
        let over = format!(r#"{{"data": {{"k": "{}"}}}}"#, "x".repeat(4096));
        let error = body("t", &over, None).unwrap_err();
        assert!(error.contains("4097 bytes of keys and values"), "{error}");
        // Split across data, notification and android: 1+2000 + 5+1000 + 4+1087 = 4097.
        let split = format!(
            r#"{{"data": {{"k": "{}"}}, "notification": {{"title": "{}"}}, "android": {{"data": {{"kkkk": "{}"}}}}}}"#,
            "x".repeat(2000),
            "x".repeat(1000),
            "x".repeat(1087)
        );
        assert!(body("t", &split, None).unwrap_err().contains("4097 bytes"));
        // What does not reach the device as data (apns overrides, options) is not counted,
        // and Google reads a null field as absent.
        let apns = format!(
            r#"{{"data": {{"k": "v"}}, "apns": {{"payload": {{"aps": {{"alert": "{}"}}}}}}, "webpush": null}}"#,
            "x".repeat(5000)
        );
        body("t", &apns, None).unwrap();
        // Keys that merely look reserved are the app's own.
        body(
            "t",
            r#"{"data": {"fromage": "v", "gcm_x": "v", "collapse_key": "v"}}"#,
            None,
        )
        .unwrap();
    }
}
