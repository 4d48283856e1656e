//! Live Activity pushes (`push_type = 'liveactivity'`: the lock-screen and Dynamic
//! Island cards of a delivery, a ride, a match), checked before sending as Apple's
//! ActivityKit documents them. APNs takes a malformed one with a 200 and the device
//! drops it, so the row would say `sent` for nothing: here it fails with the reason.
//!
//! `aps.event` is what the push does:
//!
//! - `start` (push-to-start, to the token `pushToStartTokenUpdates` gave): the activity's
//!   `attributes-type` (its `ActivityAttributes` type's name) and `attributes`, its first
//!   `content-state`, and an `alert` (title and body) to show; iOS 18's
//!   `input-push-token` or `input-push-channel` ask for the new activity's update token
//!   or subscribe it to a broadcast channel;
//! - `update` (to the activity's own token, from `pushTokenUpdates`): a new
//!   `content-state`, no attributes;
//! - `end`: a last `content-state`, and `dismissal-date` when it should leave the lock
//!   screen (else iOS keeps it up to four hours).
//!
//! Every event carries `timestamp` (seconds since 1970): the device ignores an event
//! older than the last it applied. `stale-date` and `relevance-score` may come with any.

use serde_json::{Map, Value};

/// What `aps.event` can be.
const EVENTS: [&str; 3] = ["start", "update", "end"];

/// Whether `payload` (the row's text, a JSON object) is a Live Activity push Apple's
/// devices apply; `Err` says what is missing or misplaced.
pub fn check(payload: &str) -> Result<(), String> {
    let bad = |what: String| Err(format!("BadPayload: a Live Activity push {what}"));
    let value: Value = match serde_json::from_str(payload) {
        Ok(v) => v,
        Err(e) => return bad(format!("is not JSON: {e}")),
    };
    let Some(aps) = value.get("aps").and_then(Value::as_object) else {
        return bad("needs an \"aps\" object".into());
    };
    let event = match aps.get("event") {
        Some(Value::String(e)) if EVENTS.contains(&e.as_str()) => e.as_str(),
        Some(other) => {
            return bad(format!(
                "needs aps.event \"start\", \"update\" or \"end\", not {other}"
            ))
        }
        None => return bad("needs aps.event (\"start\", \"update\" or \"end\")".into()),
    };
    if !is_seconds(aps.get("timestamp")) {
        return bad(format!(
            "needs aps.timestamp, the event's time in whole seconds since 1970 (the \
             device ignores events older than the last it applied); this {event} has {}",
            shown(aps.get("timestamp"))
        ));
    }
    if !aps.get("content-state").is_some_and(Value::is_object) {
        return bad(format!(
            "needs aps.content-state, an object (the activity's ContentState), on a {event}"
        ));
    }
    for key in ["stale-date", "dismissal-date"] {
        if aps.contains_key(key) && !is_seconds(aps.get(key)) {
            return bad(format!(
                "has aps.{key} {}: seconds since 1970",
                shown(aps.get(key))
            ));
        }
    }
    if aps.contains_key("relevance-score") && !aps["relevance-score"].is_number() {
        return bad("has an aps.relevance-score that is not a number".into());
    }
    match event {
        "start" => start(aps).map_or(Ok(()), bad),
        _ => not_start(aps, event).map_or(Ok(()), bad),
    }
}

/// What a `start` needs besides what every event does.
fn start(aps: &Map<String, Value>) -> Option<String> {
    let attributes_type = aps.get("attributes-type").and_then(Value::as_str);
    if attributes_type.is_none_or(str::is_empty) {
        return Some(
            "to start needs aps.attributes-type, the name of the app's ActivityAttributes \
             type"
                .into(),
        );
    }
    if !aps.get("attributes").is_some_and(Value::is_object) {
        return Some("to start needs aps.attributes, an object".into());
    }
    if !aps
        .get("alert")
        .is_some_and(|a| a.is_object() || a.is_string())
    {
        return Some("to start needs aps.alert (its title and body are shown)".into());
    }
    if aps.contains_key("dismissal-date") {
        return Some("has aps.dismissal-date on a start: it belongs to an end".into());
    }
    None
}

/// What an `update` or an `end` may not carry.
fn not_start(aps: &Map<String, Value>, event: &str) -> Option<String> {
    let only_start = [
        "attributes-type",
        "attributes",
        "input-push-token",
        "input-push-channel",
    ];
    if let Some(key) = only_start.iter().find(|k| aps.contains_key(**k)) {
        return Some(format!(
            "has aps.{key} on an {event}: only a start carries it"
        ));
    }
    if event == "update" && aps.contains_key("dismissal-date") {
        return Some("has aps.dismissal-date on an update: it belongs to an end".into());
    }
    None
}

/// Whether `payload` is a Live Activity push a broadcast channel can carry: one [`check`]
/// passes, of an `update` or an `end`. A channel cannot start an activity (ActivityKit:
/// "You can't use broadcast push notifications to start a Live Activity").
pub fn check_broadcast(payload: &str) -> Result<(), String> {
    check(payload)?;
    let event: Option<String> = serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| v["aps"]["event"].as_str().map(str::to_owned));
    if event.as_deref() == Some("start") {
        return Err(
            "BadPayload: a broadcast cannot start a Live Activity (aps.event \"start\"): \
             send the start to each device's push-to-start token, with \
             aps.input-push-channel naming the channel, and broadcast its updates and end"
                .into(),
        );
    }
    Ok(())
}

/// A non-negative whole number.
fn is_seconds(value: Option<&Value>) -> bool {
    value.and_then(Value::as_u64).is_some()
}

fn shown(value: Option<&Value>) -> String {
    match value {
        None => "none".into(),
        Some(v) => {
            let text = v.to_string();
            match text.char_indices().nth(40) {
                Some((i, _)) => format!("{}…", &text[..i]),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn start_payload() -> Value {
        json!({"aps": {
            "event": "start", "timestamp": 1_700_000_000,
            "attributes-type": "DeliveryAttributes", "attributes": {"order": "1234"},
            "content-state": {"eta": "12:30"},
            "alert": {"title": "Your order", "body": "is on its way"},
            "input-push-token": 1
        }})
    }

    fn with(mut v: Value, f: impl FnOnce(&mut Map<String, Value>)) -> String {
        f(v["aps"].as_object_mut().unwrap());
        v.to_string()
    }

    #[test]
    fn the_three_events_as_apple_documents_them_pass() {
        assert_eq!(check(&start_payload().to_string()), Ok(()));
        let update = json!({"aps": {"event": "update", "timestamp": 1_700_000_100,
                                    "content-state": {"eta": "12:40"}, "stale-date": 1_700_003_600,
                                    "relevance-score": 75.5}});
        assert_eq!(check(&update.to_string()), Ok(()));
        let end = json!({"aps": {"event": "end", "timestamp": 1_700_000_200,
                                 "content-state": {"eta": "delivered"},
                                 "dismissal-date": 1_700_001_000}});
        assert_eq!(check(&end.to_string()), Ok(()));
    }

    #[test]
    fn what_a_device_would_drop_fails_with_the_reason() {
        let update = json!({"aps": {"event": "update", "timestamp": 1, "content-state": {}}});
        let cases = [
            ("[1]".to_owned(), "needs an \"aps\" object"),
            (
                json!({"aps": {"alert": "hi"}}).to_string(),
                "needs aps.event",
            ),
            (
                with(start_payload(), |a| {
                    a.insert("event".into(), json!("pause"));
                }),
                "not \"pause\"",
            ),
            (
                with(start_payload(), |a| {
                    a.remove("timestamp");
                }),
                "needs aps.timestamp",
            ),
            (
                with(start_payload(), |a| {
                    a.insert("timestamp".into(), json!("now"));
                }),
                "needs aps.timestamp",
            ),
            (
                with(start_payload(), |a| {
                    a.insert("timestamp".into(), json!(1.5));
                }),
                "needs aps.timestamp",
            ),
            (
                with(start_payload(), |a| {
                    a.remove("content-state");
                }),
                "needs aps.content-state",
            ),
            (
                with(start_payload(), |a| {
                    a.remove("attributes-type");
                }),
                "aps.attributes-type",
            ),
            (
                with(start_payload(), |a| {
                    a.insert("attributes".into(), json!("x"));
                }),
                "aps.attributes, an object",
            ),
            (
                with(start_payload(), |a| {
                    a.remove("alert");
                }),
                "needs aps.alert",
            ),
            (
                with(start_payload(), |a| {
                    a.insert("dismissal-date".into(), json!(5));
                }),
                "belongs to an end",
            ),
            (
                with(update.clone(), |a| {
                    a.insert("attributes".into(), json!({}));
                }),
                "only a start carries it",
            ),
            (
                with(update.clone(), |a| {
                    a.insert("input-push-channel".into(), json!("x"));
                }),
                "only a start carries it",
            ),
            (
                with(update.clone(), |a| {
                    a.insert("dismissal-date".into(), json!(5));
                }),
                "belongs to an end",
            ),
            (
                with(update.clone(), |a| {
                    a.insert("stale-date".into(), json!(-1));
                }),
                "aps.stale-date -1",
            ),
            (
                with(update, |a| {
                    a.insert("relevance-score".into(), json!("high"));
                }),
                "relevance-score",
            ),
        ];
        for (payload, expected) in cases {
            let e = check(&payload).unwrap_err();
            assert!(e.starts_with("BadPayload: a Live Activity push "), "{e}");
            assert!(e.contains(expected), "{payload}: {e}");
        }
    }

    #[test]
    fn a_channel_carries_updates_and_ends_but_never_a_start() {
        let update = json!({"aps": {"event": "update", "timestamp": 1, "content-state": {}}});
        assert_eq!(check_broadcast(&update.to_string()), Ok(()));
        let end = json!({"aps": {"event": "end", "timestamp": 2, "content-state": {}}});
        assert_eq!(check_broadcast(&end.to_string()), Ok(()));
        let e = check_broadcast(&start_payload().to_string()).unwrap_err();
        assert!(
            e.contains("a broadcast cannot start a Live Activity"),
            "{e}"
        );
        assert!(e.contains("input-push-channel"), "{e}");
        // What any Live Activity push needs is checked first.
        let e = check_broadcast(r#"{"aps": {"event": "update"}}"#).unwrap_err();
        assert!(e.contains("needs aps.timestamp"), "{e}");
    }
}
