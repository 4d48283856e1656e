//! A broadcast row (one naming a `channel_id`) -> `POST /4/broadcasts/apps/{bundle id}`,
//! as a pure function: one request that APNs delivers to every device subscribed to the
//! channel (iOS 18 Live Activities).
//!
//! Apple's rules are checked first, and a row that breaks one fails with APNs's own word
//! for it: a broadcast is a Live Activity `update` or `end` (a channel cannot start an
//! activity), of at most 5,120 bytes; `apns-priority` and `apns-expiration` are required
//! (a row without them gets 10 and 0); a channel that stores no message takes no nonzero
//! expiration. No `apns-topic`: the bundle id is in the path, and it carries no push type
//! suffix.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

use super::request::{authority, ApnsRequest, APNS_EXPIRATION, APNS_PRIORITY, APNS_PUSH_TYPE};
use crate::apns::push_type::PushType;
use crate::channels::MessageStorage;
use crate::config::AppConfig;
use crate::transport::{payload_kind, Broadcast, Notification};

pub const APNS_CHANNEL_ID: HeaderName = HeaderName::from_static("apns-channel-id");
pub const APNS_REQUEST_ID: HeaderName = HeaderName::from_static("apns-request-id");

/// Apple's limit on a broadcast's payload.
pub const MAX_PAYLOAD: usize = 5120;

/// The priority of a broadcast row without one: Apple requires the header, and 10 is what
/// APNs takes for a push without it.
const DEFAULT_PRIORITY: i16 = 10;

/// Builds the broadcast request for `n`, a row for channel `b`, or says why the row must
/// fail without one. `request_id` goes out as `apns-request-id`.
pub fn build(
    n: &Notification,
    b: &Broadcast,
    app: &AppConfig,
    request_id: Uuid,
) -> Result<ApnsRequest, String> {
    if n.push_type != PushType::LiveActivity.as_str() {
        return Err(format!(
            "InvalidPushType: a broadcast is a Live Activity update or end (push_type \
             'liveactivity'), not push type {:?}",
            n.push_type
        ));
    }
    check_channel_id(&b.channel_id)?;
    let bundle = bundle_id(n, app)?;
    let priority = n.priority.unwrap_or(DEFAULT_PRIORITY);
    if !matches!(priority, 1 | 5 | 10) {
        return Err(format!(
            "BadPriority: priority {priority} is not one of 1, 5 and 10"
        ));
    }
    let expiration = n.expires_at.map_or(0, |at| {
        at.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().max(1))
    });
    if expiration != 0 && b.storage == Some(MessageStorage::None) {
        return Err(
            "BadExpirationDate: the channel stores no message (message_storage 'none'), \
             and APNs refuses a broadcast to it with an expiration: leave expires_at NULL, \
             or broadcast on a channel with message_storage 'most-recent'"
                .into(),
        );
    }
    if n.collapse_id.is_some() {
        return Err(
            "BadRequestParams: a broadcast takes no collapse_id (APNs's broadcast API has \
             no apns-collapse-id)"
                .into(),
        );
    }
    let body = payload(&n.payload)?;

    let mut headers = HeaderMap::new();
    headers.insert(
        APNS_CHANNEL_ID,
        HeaderValue::from_str(&b.channel_id).expect("checked: base64 is a header value"),
    );
    headers.insert(
        APNS_PUSH_TYPE,
        HeaderValue::from_static(PushType::LiveActivity.as_str()),
    );
    headers.insert(APNS_PRIORITY, HeaderValue::from(priority));
    headers.insert(APNS_EXPIRATION, HeaderValue::from(expiration));
    headers.insert(
        APNS_REQUEST_ID,
        HeaderValue::from_str(&request_id.hyphenated().to_string()).expect("a UUID is ASCII"),
    );
    let uri = format!(
        "https://{}/4/broadcasts/apps/{bundle}",
        authority(&app.endpoint)
    )
    .parse::<http::Uri>()
    .map_err(|e| format!("BadTopic: bundle id {bundle:?} cannot be a path: {e}"))?;
    Ok(ApnsRequest {
        uri,
        headers,
        body,
        apns_id: request_id,
        push_type: PushType::LiveActivity,
    })
}

/// APNs's channel ids are base64 (standard or URL-safe), as it gave them.
pub fn check_channel_id(id: &str) -> Result<(), String> {
    let base64 = |c: char| c.is_ascii_alphanumeric() || "+/=_-".contains(c);
    if id.is_empty() {
        return Err("MissingChannelId: the channel id is empty".into());
    }
    if id.len() > 256 || !id.chars().all(base64) {
        return Err(format!(
            "BadChannelId: {:?} is not a channel id APNs gives (base64)",
            crate::transport::short_token(id)
        ));
    }
    Ok(())
}

/// The bundle id the broadcast goes to: the row's `topic`, else the app's, without a push
/// type's suffix (APNs: `TopicDisallowed`).
fn bundle_id<'a>(n: &'a Notification, app: &'a AppConfig) -> Result<&'a str, String> {
    let bundle = n.topic.as_deref().or(app.topic.as_deref()).ok_or_else(|| {
        format!(
            "MissingTopic: the row has no topic and [apps.{}] sets none: a broadcast goes to \
             the app's bundle id",
            app.name
        )
    })?;
    if bundle.contains(".push-type.") {
        return Err(format!(
            "TopicDisallowed: a broadcast goes to the bare bundle id, not {bundle:?}"
        ));
    }
    let path_safe = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
    if bundle.is_empty() || !bundle.chars().all(path_safe) {
        return Err(format!("BadTopic: {bundle:?} is not a bundle id"));
    }
    Ok(bundle)
}

/// The row's payload text as it is, once it is a Live Activity update or end within
/// Apple's limit.
fn payload(text: &str) -> Result<Bytes, String> {
    match payload_kind(text) {
        Ok(None) => {}
        Ok(Some(kind)) => return Err(format!("BadPayload: the payload is {kind}, not an object")),
        Err(e) => return Err(format!("BadPayload: the payload is not JSON: {e}")),
    }
    crate::apns::live_activity::check_broadcast(text)?;
    if text.len() > MAX_PAYLOAD {
        return Err(format!(
            "PayloadTooLarge: payload is {} bytes, the limit for a broadcast is {MAX_PAYLOAD}",
            text.len()
        ));
    }
    Ok(Bytes::copy_from_slice(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Auth, CertificateAuth, Endpoint, Environment, Protocol};
    use serde_json::json;
    use std::time::{Duration, SystemTime};

    fn app() -> AppConfig {
        AppConfig {
            name: "default".into(),
            topic: Some("com.example.app".into()),
            endpoint: Endpoint::Apple(Environment::Production),
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

    const CHANNEL: &str = "dHN0LXNyY2gtY2hubA==";

    fn row(storage: Option<MessageStorage>) -> (Notification, Broadcast) {
        let b = Broadcast {
            channel_id: CHANNEL.into(),
            storage,
        };
        let n = Notification {
            id: 1,
            app: "default".into(),
            device_token: String::new(),
            payload: json!({"aps": {"event": "update", "timestamp": 1_700_000_000,
                                    "content-state": {"score": "1-0"}}})
            .to_string(),
            push_type: "liveactivity".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts: 0,
            broadcast: Some(b.clone()),
        };
        (n, b)
    }

    fn err(n: &Notification, b: &Broadcast) -> String {
        build(n, b, &app(), Uuid::nil()).unwrap_err()
    }

    #[test]
    fn a_broadcast_is_a_post_to_the_bundle_with_the_channel_and_the_required_headers() {
        let (n, b) = row(Some(MessageStorage::None));
        let r = build(&n, &b, &app(), Uuid::nil()).unwrap();
        assert_eq!(
            r.uri.to_string(),
            "https://api.push.apple.com/4/broadcasts/apps/com.example.app"
        );
        let h = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("apns-channel-id").as_deref(), Some(CHANNEL));
        assert_eq!(h("apns-push-type").as_deref(), Some("liveactivity"));
        assert_eq!(h("apns-priority").as_deref(), Some("10"));
        assert_eq!(h("apns-expiration").as_deref(), Some("0"));
        assert_eq!(
            h("apns-request-id").as_deref(),
            Some("00000000-0000-0000-0000-000000000000")
        );
        assert_eq!(h("apns-topic"), None);
        assert_eq!(h("apns-id"), None);
        assert_eq!(r.body, n.payload.as_bytes());
    }

    #[test]
    fn a_channel_that_stores_messages_takes_the_rows_expiry() {
        let (mut n, b) = row(Some(MessageStorage::MostRecent));
        n.expires_at = Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        n.priority = Some(5);
        let r = build(&n, &b, &app(), Uuid::nil()).unwrap();
        assert_eq!(r.headers["apns-expiration"], "1800000000");
        assert_eq!(r.headers["apns-priority"], "5");
        // A channel made elsewhere: its storage is unknown here, and APNs judges.
        let (mut n, b) = row(None);
        n.expires_at = Some(SystemTime::now());
        assert!(build(&n, &b, &app(), Uuid::nil()).is_ok());
    }

    #[test]
    fn what_apple_refuses_fails_before_a_request() {
        let (n, b) = row(Some(MessageStorage::None));
        type Change = Box<dyn Fn(&mut Notification, &mut Broadcast)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|n, _| n.push_type = "alert".into()),
                "InvalidPushType",
            ),
            (
                Box::new(|n, _| n.expires_at = Some(SystemTime::now())),
                "BadExpirationDate: the channel stores no message",
            ),
            (Box::new(|n, _| n.priority = Some(7)), "BadPriority"),
            (
                Box::new(|n, _| n.collapse_id = Some("x".into())),
                "BadRequestParams",
            ),
            (
                Box::new(|n, _| n.topic = Some("com.example.app.push-type.liveactivity".into())),
                "TopicDisallowed",
            ),
            (Box::new(|n, _| n.topic = Some("a b".into())), "BadTopic"),
            (
                Box::new(|_, b| b.channel_id = "not base64!".into()),
                "BadChannelId",
            ),
            (
                Box::new(|_, b| b.channel_id = String::new()),
                "MissingChannelId",
            ),
            (
                Box::new(|n, _| {
                    n.payload = json!({"aps": {"event": "start", "timestamp": 1,
                        "content-state": {}, "attributes-type": "A", "attributes": {},
                        "alert": "go"}})
                    .to_string()
                }),
                "BadPayload: a broadcast cannot start a Live Activity",
            ),
            (
                Box::new(|n, _| {
                    n.payload = json!({"aps": {"event": "update", "timestamp": 1,
                        "content-state": {"pad": "x".repeat(MAX_PAYLOAD)}}})
                    .to_string()
                }),
                "PayloadTooLarge",
            ),
            (Box::new(|n, _| n.payload = "[]".into()), "BadPayload"),
        ];
        for (change, expected) in cases {
            let (mut n, mut b) = (n.clone(), b.clone());
            change(&mut n, &mut b);
            let e = err(&n, &b);
            assert!(e.starts_with(expected), "{expected}: {e}");
        }
    }
}
