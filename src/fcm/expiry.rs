//! A row's `expires_at` on FCM's wire (pure). Without it FCM keeps an undelivered message
//! for four weeks, so a one-time code could arrive hours late. Each platform has its own
//! field, all set from the row, at send time:
//! - `android.ttl`: the seconds left (`"3600s"`), at most FCM's four weeks;
//! - `apns.headers.apns-expiration`: the moment, in epoch seconds (iOS targets);
//! - `webpush.headers.TTL`: the seconds left (browsers).
//!
//! A payload that sets its own keeps it where it is earlier than the row's: the earlier
//! wins. Only the three blocks touched are written anew (their numbers re-serialized);
//! every other member of the payload keeps its text.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The longest `android.ttl` FCM takes: four weeks.
pub const MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// When a row's message stops mattering, as FCM's fields take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Whole seconds left (none when already past), at most [`MAX_TTL`].
    pub ttl_secs: u64,
    /// The moment itself, epoch seconds (0 before 1970).
    pub at_epoch: u64,
}

impl Expiry {
    pub fn of(expires_at: SystemTime, now: SystemTime) -> Expiry {
        let left = expires_at.duration_since(now).unwrap_or_default();
        Expiry {
            ttl_secs: left.min(MAX_TTL).as_secs(),
            at_epoch: expires_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The payload's members (without the braces), with the expiry set in each platform's
/// block. `payload` has passed `message::check_payload` (a JSON object of known blocks).
pub fn members(payload: &str, expiry: Expiry) -> Result<String, String> {
    let mut members: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let seconds = |secs: u64| Value::String(format!("{secs}s"));
    edit(&mut members, "android", |android| {
        earlier(android, "ttl", expiry.ttl_secs, parse_fcm_seconds, seconds)
    })?;
    edit(&mut members, "apns", |apns| {
        headers(apns, |h| {
            let epoch = |at: u64| Value::String(at.to_string());
            earlier(h, "apns-expiration", expiry.at_epoch, parse_integer, epoch)
        })
    })?;
    edit(&mut members, "webpush", |webpush| {
        headers(webpush, |h| {
            let secs = |s: u64| Value::String(s.to_string());
            earlier(h, "TTL", expiry.ttl_secs, parse_integer, secs)
        })
    })?;
    let text: Vec<String> = members
        .iter()
        .map(|(key, value)| {
            let key = serde_json::to_string(key).expect("a string serializes");
            format!("{key}:{}", value.get())
        })
        .collect();
    Ok(text.join(","))
}

/// Applies `f` to the object under `key`, made when absent or null.
fn edit(
    members: &mut BTreeMap<String, Box<RawValue>>,
    key: &str,
    f: impl FnOnce(&mut Map<String, Value>),
) -> Result<(), String> {
    let mut block = match members.get(key) {
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(map)) => map,
            Ok(Value::Null) => Map::new(),
            // check_payload refuses anything else; leave it as written.
            _ => return Ok(()),
        },
        None => Map::new(),
    };
    f(&mut block);
    let raw = serde_json::value::to_raw_value(&block)
        .map_err(|e| format!("cannot write the payload's {key}: {e}"))?;
    members.insert(key.to_owned(), raw);
    Ok(())
}

/// Applies `f` to the block's `headers` object, made when absent.
fn headers(block: &mut Map<String, Value>, f: impl FnOnce(&mut Map<String, Value>)) {
    let headers = block
        .entry("headers")
        .or_insert_with(|| Value::Object(Map::new()));
    if headers.is_null() {
        *headers = Value::Object(Map::new());
    }
    if let Value::Object(h) = headers {
        f(h);
    }
}

/// Sets `field` to `ours` unless the payload's own value reads as no later.
fn earlier(
    block: &mut Map<String, Value>,
    field: &str,
    ours: u64,
    read: fn(&str) -> Option<f64>,
    write: impl Fn(u64) -> Value,
) {
    let theirs = block.get(field).and_then(Value::as_str).and_then(read);
    if theirs.is_none_or(|t| t > ours as f64) {
        block.insert(field.to_owned(), write(ours));
    }
}

/// FCM's duration: seconds with up to nine fractional digits, then `s` ("3.5s").
fn parse_fcm_seconds(text: &str) -> Option<f64> {
    let secs: f64 = text.strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs)
}

fn parse_integer(text: &str) -> Option<f64> {
    text.trim().parse::<u64>().ok().map(|n| n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn expiry(in_secs: u64) -> Expiry {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        Expiry::of(now + Duration::from_secs(in_secs), now)
    }

    fn message(payload: &str, e: Expiry) -> Value {
        serde_json::from_str(&format!("{{{}}}", members(payload, e).unwrap())).unwrap()
    }

    #[test]
    fn each_platform_gets_the_rows_expiry() {
        let m = message(r#"{"data": {"n": "12345678901234567890"}}"#, expiry(3600));
        assert_eq!(m["android"]["ttl"], "3600s");
        assert_eq!(
            m["apns"]["headers"]["apns-expiration"],
            (NOW + 3600).to_string()
        );
        assert_eq!(m["webpush"]["headers"]["TTL"], "3600");
        assert_eq!(m["data"]["n"], "12345678901234567890");
    }

    #[test]
    fn the_earlier_of_the_payloads_and_the_rows_wins() {
        let payload = r#"{"android": {"ttl": "60s", "priority": "HIGH"},
                          "apns": {"headers": {"apns-expiration": "9999999999"}},
                          "webpush": {"headers": {"TTL": "30", "Urgency": "high"}}}"#;
        let m = message(payload, expiry(3600));
        assert_eq!(m["android"]["ttl"], "60s", "the payload's, earlier");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(
            m["apns"]["headers"]["apns-expiration"],
            (NOW + 3600).to_string(),
            "the row's, earlier"
        );
        assert_eq!(m["webpush"]["headers"]["TTL"], "30");
        assert_eq!(m["webpush"]["headers"]["Urgency"], "high");
        let m = message(r#"{"android": {"ttl": "nonsense"}}"#, expiry(10));
        assert_eq!(m["android"]["ttl"], "10s", "an unreadable one is replaced");
    }

    #[test]
    fn a_far_expiry_is_capped_at_four_weeks_and_a_past_one_is_zero() {
        assert_eq!(expiry(365 * 24 * 3600).ttl_secs, MAX_TTL.as_secs());
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        let past = Expiry::of(now - Duration::from_secs(5), now);
        assert_eq!(past.ttl_secs, 0);
        assert_eq!(past.at_epoch, NOW - 5);
        let m = message(r#"{"android": null}"#, expiry(7));
        assert_eq!(m["android"]["ttl"], "7s", "null reads as absent");
    }
}
