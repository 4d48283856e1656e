//! A row as a Web Push request (RFC 8030, section 5), as a pure function: `POST` to the
//! subscription's endpoint, the payload encrypted (`encrypt`) and the VAPID
//! authorization (`vapid`) added by the caller. The row's columns become headers:
//!
//! - `TTL`: the whole seconds left until `expires_at` (0 when already past: deliver now
//!   or never), or the app's default when the row has none. The push service may keep a
//!   message for less, and says so in its answer's `TTL`;
//! - `Urgency` (RFC 8030, section 5.3), from `priority`, as APNs's 10 and 5 read:
//!   10 is `high`, 5 to 9 `normal`, 1 to 4 `low`, 0 `very-low`; NULL sends no header
//!   (the service's default, `normal`); anything else is refused;
//! - `Topic` (section 5.4), from `collapse_id`: a newer message with the same topic
//!   replaces one still undelivered. At most 32 characters of the base64url alphabet, or
//!   the row is refused;
//! - `Content-Encoding: aes128gcm`, `Content-Type: application/octet-stream`.
//!
//! `topic` and a `push_type` other than `alert` are APNs's and refused, saying so, as for
//! FCM. So is a payload too large to encrypt into 4096 bytes, before any encryption.

use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version};

use super::encrypt;
use super::subscription::Subscription;
use crate::transport::Notification;

/// The most characters a `Topic` may have (RFC 8030, section 5.4).
pub const MAX_TOPIC_LEN: usize = 32;

/// How soon the push service should deliver (RFC 8030, section 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    VeryLow,
    Low,
    Normal,
    High,
}

impl Urgency {
    /// A row's `priority`: `Ok(None)` for NULL (no header), `Err` out of 0..=10.
    pub fn of_priority(priority: Option<i16>) -> Result<Option<Urgency>, String> {
        Ok(match priority {
            None => None,
            Some(10) => Some(Urgency::High),
            Some(5..=9) => Some(Urgency::Normal),
            Some(1..=4) => Some(Urgency::Low),
            Some(0) => Some(Urgency::VeryLow),
            Some(p) => {
                return Err(format!(
                    "priority {p} is not a Web Push urgency: 10 (high), 5 to 9 (normal), \
                     1 to 4 (low), 0 (very-low), or NULL for the push service's default \
                     (normal)"
                ))
            }
        })
    }

    /// The header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }
}

/// A request ready to go, but for its authorization and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct WebPushRequest {
    /// The endpoint.
    pub uri: Uri,
    /// The endpoint's origin: the VAPID token's audience.
    pub origin: String,
    /// `TTL`, in seconds.
    pub ttl: u64,
    pub urgency: Option<Urgency>,
    pub topic: Option<String>,
}

impl WebPushRequest {
    /// The request, with `authorization` (`vapid t=..., k=...`); its body is the
    /// encrypted payload.
    pub fn to_http(&self, authorization: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_2;
        let headers = request.headers_mut();
        headers.insert(HeaderName::from_static("ttl"), self.ttl.into());
        if let Some(urgency) = self.urgency {
            headers.insert(
                HeaderName::from_static("urgency"),
                HeaderValue::from_static(urgency.as_str()),
            );
        }
        // A topic is base64url (checked in `build`): always a valid header value.
        if let Some(Ok(topic)) = self.topic.as_deref().map(HeaderValue::from_str) {
            headers.insert(HeaderName::from_static("topic"), topic);
        }
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("aes128gcm"));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        // A VAPID authorization is base64url, '.', ',', ' ' and '=': always valid.
        if let Ok(value) = HeaderValue::from_str(authorization) {
            headers.insert(AUTHORIZATION, value);
        }
        request
    }
}

/// The request for row `n` to the browser of `sub` (the row's `device_token`, parsed),
/// or why the row cannot be sent. `now` is when it is sent: the row's `expires_at`
/// becomes the time left then; `default_ttl` is the app's, for rows without one.
pub fn build(
    n: &Notification,
    sub: &Subscription,
    default_ttl: Duration,
    now: SystemTime,
) -> Result<WebPushRequest, String> {
    check_apns_columns(n)?;
    let urgency = Urgency::of_priority(n.priority)?;
    let topic = n.collapse_id.as_deref().map(topic).transpose()?;
    encrypt::check_size(n.payload.len())?;
    let ttl = match n.expires_at {
        Some(at) => at.duration_since(now).unwrap_or_default(),
        None => default_ttl,
    };
    Ok(WebPushRequest {
        uri: sub.uri().clone(),
        origin: sub.origin().to_owned(),
        ttl: ttl.as_secs(),
        urgency,
        topic,
    })
}

/// `collapse_id` as a `Topic`, or the rule it breaks.
fn topic(collapse_id: &str) -> Result<String, String> {
    let base64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let len = collapse_id.chars().count();
    if len == 0 || len > MAX_TOPIC_LEN || !collapse_id.chars().all(base64url) {
        let found = match len {
            0 => "it is empty".to_owned(),
            len if len > MAX_TOPIC_LEN => format!("it has {len}"),
            _ => "it has other characters".to_owned(),
        };
        return Err(format!(
            "collapse_id cannot be a Web Push Topic: 1 to {MAX_TOPIC_LEN} characters of \
             A-Z a-z 0-9 - _ (RFC 8030, 5.4), and {found}"
        ));
    }
    Ok(collapse_id.to_owned())
}

/// The outbox's APNs-only columns mean nothing to Web Push: a row that sets one would
/// not be sent as its writer meant, so it fails, saying so.
fn check_apns_columns(n: &Notification) -> Result<(), String> {
    if n.topic.is_some() {
        return Err(
            "topic is an APNs column (a bundle id); a Web Push row goes to its \
             device_token, the browser's subscription: leave topic NULL"
                .to_owned(),
        );
    }
    if n.push_type != "alert" {
        return Err(format!(
            "push_type {:?} is an APNs column; for Web Push, leave it 'alert': the \
             service worker decides what the payload shows",
            n.push_type
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webpush::subscription::tests::subscription;
    use std::time::UNIX_EPOCH;

    const ENDPOINT: &str = "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk?x=1";
    const DAY: Duration = Duration::from_secs(86_400);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn row() -> Notification {
        Notification {
            id: 1,
            app: "web".into(),
            device_token: String::new(),
            payload: r#"{"title": "Hello"}"#.into(),
            push_type: "alert".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts: 0,
            broadcast: None,
        }
    }

    fn build_row(n: &Notification) -> Result<WebPushRequest, String> {
        build(n, &subscription(ENDPOINT), DAY, now())
    }

    #[test]
    fn a_row_becomes_a_post_to_its_endpoint() {
        let r = build_row(&row()).unwrap();
        assert_eq!(
            r,
            WebPushRequest {
                uri: ENDPOINT.parse().unwrap(),
                origin: "https://updates.push.services.mozilla.com".into(),
                ttl: 86_400,
                urgency: None,
                topic: None,
            }
        );
        let http = r.to_http("vapid t=a.b.c, k=BP4z");
        assert_eq!(http.method(), Method::POST);
        assert_eq!(
            http.uri().path_and_query().unwrap(),
            "/wpush/v2/gAAAAABk?x=1"
        );
        assert_eq!(
            http.uri().authority().unwrap(),
            "updates.push.services.mozilla.com"
        );
        let h = http.headers();
        assert_eq!(h["ttl"], "86400");
        assert_eq!(h[CONTENT_ENCODING], "aes128gcm");
        assert_eq!(h[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(h[AUTHORIZATION], "vapid t=a.b.c, k=BP4z");
        assert!(h.get("urgency").is_none() && h.get("topic").is_none());
    }

    #[test]
    fn ttl_is_the_time_left_in_whole_seconds() {
        let mut n = row();
        for (expires_at, ttl) in [
            (now() + Duration::from_millis(90_999), 90),
            (now(), 0),
            (now() - Duration::from_secs(5), 0),
            (now() + 60 * DAY, 60 * 86_400),
        ] {
            n.expires_at = Some(expires_at);
            assert_eq!(build_row(&n).unwrap().ttl, ttl);
        }
    }

    #[test]
    fn priority_becomes_urgency() {
        let mut n = row();
        for (priority, urgency) in [
            (Some(10), Some("high")),
            (Some(9), Some("normal")),
            (Some(5), Some("normal")),
            (Some(4), Some("low")),
            (Some(1), Some("low")),
            (Some(0), Some("very-low")),
            (None, None),
        ] {
            n.priority = priority;
            let http = build_row(&n).unwrap().to_http("vapid t=x, k=y");
            let header = http.headers().get("urgency").map(|v| v.to_str().unwrap());
            assert_eq!(header, urgency, "{priority:?}");
        }
        for out_of_range in [11, -1, i16::MAX] {
            n.priority = Some(out_of_range);
            let e = build_row(&n).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "priority {out_of_range} is not a Web Push urgency"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn collapse_id_becomes_topic_within_its_rule() {
        let mut n = row();
        let longest = "aZ09-_".repeat(6)[..32].to_owned();
        n.collapse_id = Some(longest.clone());
        let http = build_row(&n).unwrap().to_http("vapid t=x, k=y");
        assert_eq!(http.headers()["topic"], longest.as_str());
        for (bad, found) in [
            ("a".repeat(33), "and it has 33"),
            ("with space".into(), "and it has other characters"),
            ("a.b".into(), "and it has other characters"),
            ("a=".into(), "and it has other characters"),
            ("é".into(), "and it has other characters"),
            (String::new(), "and it is empty"),
        ] {
            n.collapse_id = Some(bad.clone());
            let e = build_row(&n).unwrap_err();
            assert!(
                e.starts_with("collapse_id cannot be a Web Push Topic: 1 to 32"),
                "{e}"
            );
            assert!(e.ends_with(found), "{bad:?}: {e}");
        }
    }

    #[test]
    fn apns_columns_and_large_payloads_fail_the_row() {
        type Set = fn(&mut Notification);
        let cases: [(Set, &str); 3] = [
            (|n| n.topic = Some("com.example".into()), "leave topic NULL"),
            (|n| n.push_type = "background".into(), "leave it 'alert'"),
            (
                |n| n.payload = "x".repeat(3994),
                "the payload is 3994 bytes; Web Push carries at most 3993",
            ),
        ];
        for (set, hint) in cases {
            let mut n = row();
            set(&mut n);
            let e = build_row(&n).unwrap_err();
            assert!(e.contains(hint), "{e}");
        }
        let mut n = row();
        n.payload = "x".repeat(3993);
        assert!(build_row(&n).is_ok());
    }
}
