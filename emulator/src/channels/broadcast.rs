//! Broadcast publishing (Apple's "Sending broadcast push notification requests to
//! APNs"): `POST /4/broadcasts/apps/<bundle>` on the push listener, to every device
//! subscribed to a channel.
//!
//! Headers: `apns-channel-id` (required), `apns-push-type` (required, `liveactivity`),
//! `apns-priority` (required: 10, 5 or 1), `apns-expiration` (required, epoch seconds),
//! `apns-request-id` and `apns-id` (optional, UUIDs). No `apns-topic`: the path's bundle
//! id is the topic, and the header is ignored. Payload: a JSON object of at most 5120
//! bytes whose `aps.event` is `update` or `end`. Success: 200, an empty body,
//! `apns-request-id` and `apns-unique-id` (a new UUID).
//!
//! Order of checks (Apple documents none; one third-party test server checks the headers
//! in about this order): the path (404), the method (405), the provider token (403), the
//! bundle id, the request ids, `apns-channel-id`'s presence and format, `apns-push-type`,
//! `apns-priority`, `apns-expiration`, then the channel, then the payload.
//!
//! Choices where Apple's pages leave room, or where the live service differs:
//! - `apns-push-type` is compared case-insensitively with `liveactivity`: Apple writes it
//!   `Liveactivity`, `liveactivity` and `LiveActivity` on different pages.
//! - `apns-expiration` missing: 400 `BadExpirationDate`, as the live service answers
//!   (Apple only marks the header required). Nonzero on a "No Message Stored" channel
//!   (policy 0): 400 `BadExpirationDate`, as Apple's table says.
//! - A channel deleted before: 400 `ChannelNotRegistered`; one never made (for this
//!   bundle id): 400 `BadChannelId`. Both as the live service answers.
//! - `aps.event` `start`: Apple says a broadcast cannot start a Live Activity, but names
//!   no reason for trying. The emulator answers 400 `BadRequestParams` (the payload holds
//!   an attribute APNs does not accept here), as it does for a missing `aps` or `event`,
//!   or any other event.
//! - A payload that is JSON but not an object: `BadRequestPayload`.
//! - `apns-request-id` not a UUID: 400 `BadMessageId` (Apple names no reason for it).

use std::time::SystemTime;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method};

use super::reply::{self, Reply, APNS_CHANNEL_ID, APNS_UNIQUE_ID};
use super::{
    channel_id_header, check_caller, is_bundle_segment, reject, Lookup, POLICY_NO_MESSAGE_STORED,
};
use crate::answer::Answer;
use crate::reason;
use crate::record::Record;
use crate::request::read_payload;
use crate::stats::Counters;
use crate::validate::{
    self, Policy, Rejection, APNS_EXPIRATION, APNS_ID, APNS_PRIORITY, APNS_PUSH_TYPE,
};
use crate::Shared;

/// "The maximum payload size for a broadcast push notification is 5 KB (5120 bytes)."
pub const MAX_BROADCAST_PAYLOAD: usize = 5120;

/// The only push type a broadcast may have (compared case-insensitively).
pub const PUSH_TYPE: &str = "liveactivity";

const PREFIX: &str = "/4/broadcasts/apps/";

/// What a valid head says about a broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub bundle: String,
    pub channel_id: String,
    pub priority: u8,
    pub expiration: u64,
}

/// Whether the push listener should treat this path as a broadcast (any other path is
/// a device push's, or `BadPath`).
pub fn is_broadcast_path(path: &str) -> bool {
    path.starts_with(PREFIX)
}

/// Checks everything the head says. `provider_token` is called with the `authorization`
/// header under token auth only.
pub fn check_head(
    head: &Parts,
    policy: &Policy,
    provider_token: impl FnOnce(&HeaderValue) -> Result<(), Rejection>,
) -> Result<Publish, Rejection> {
    let bundle = head
        .uri
        .path()
        .strip_prefix(PREFIX)
        .filter(|b| is_bundle_segment(b))
        .ok_or(reject(404, reason::BAD_PATH))?;
    if head.method != Method::POST {
        return Err(reject(405, reason::METHOD_NOT_ALLOWED));
    }
    let headers = &head.headers;
    check_caller(headers, bundle, policy, provider_token)?;
    if let Some(v) = headers.get(APNS_ID) {
        if !validate::is_canonical_uuid(v.as_bytes()) {
            return Err(reject(400, reason::BAD_MESSAGE_ID));
        }
    }
    let channel_id = channel_id_header(headers)?;
    match headers.get(APNS_PUSH_TYPE) {
        None => return Err(reject(400, reason::MISSING_PUSH_TYPE)),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(PUSH_TYPE.as_bytes()) => {}
        Some(_) => return Err(reject(400, reason::INVALID_PUSH_TYPE)),
    }
    let priority = headers
        .get(APNS_PRIORITY)
        .and_then(validate::ascii_number)
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| matches!(p, 10 | 5 | 1))
        .ok_or(reject(400, reason::BAD_PRIORITY))?;
    let expiration = headers
        .get(APNS_EXPIRATION)
        .and_then(validate::ascii_number)
        .ok_or(reject(400, reason::BAD_EXPIRATION_DATE))?;
    Ok(Publish {
        bundle: bundle.to_owned(),
        channel_id,
        priority,
        expiration,
    })
}

/// Checks the channel the broadcast is for, as the store knows it.
pub fn check_channel(publish: &Publish, channel: Lookup) -> Result<(), Rejection> {
    match channel {
        Lookup::Active(POLICY_NO_MESSAGE_STORED) if publish.expiration != 0 => {
            Err(reject(400, reason::BAD_EXPIRATION_DATE))
        }
        Lookup::Active(_) => Ok(()),
        Lookup::Deleted => Err(reject(400, reason::CHANNEL_NOT_REGISTERED)),
        // As seen live: an id never made is "not properly encoded".
        Lookup::Unknown => Err(reject(400, reason::BAD_CHANNEL_ID)),
    }
}

/// Checks a broadcast's payload.
pub fn check_payload(payload: &[u8]) -> Result<(), Rejection> {
    if payload.is_empty() {
        return Err(reject(400, reason::PAYLOAD_EMPTY));
    }
    if payload.len() > MAX_BROADCAST_PAYLOAD {
        return Err(reject(413, reason::PAYLOAD_TOO_LARGE));
    }
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|_| reject(400, reason::BAD_REQUEST_PAYLOAD))?;
    if !json.is_object() {
        return Err(reject(400, reason::BAD_REQUEST_PAYLOAD));
    }
    // A channel carries `update` and `end` only: "You can't use broadcast push
    // notifications to start a Live Activity" (no reason named; see the module's notes).
    match json
        .pointer("/aps/event")
        .and_then(serde_json::Value::as_str)
    {
        Some("update" | "end") => Ok(()),
        _ => Err(reject(400, reason::BAD_REQUEST_PARAMS)),
    }
}

/// Answers one broadcast whose head was checked already; `None` if the client went away
/// first, else the status answered.
pub(crate) async fn handle(
    shared: &Shared,
    connection: u64,
    head: Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
    checked: Result<Publish, Rejection>,
) -> Option<u16> {
    let latency = shared.faults.latency();
    let _in_flight = shared.counters.request_started();
    let Ok(payload) = read_payload(&mut body, MAX_BROADCAST_PAYLOAD + 1).await else {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    };
    let reply = match &checked {
        Err(rejection) => Reply::rejection(*rejection),
        Ok(publish) => decide(shared, publish, &payload),
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let request_id = reply::request_id(&head.headers);
    if reply.send(&mut respond, request_id.clone()).is_err() {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    }
    shared.counters.answered(reply.status);
    Counters::bump(&shared.counters.broadcasts);
    if shared.recorder.wanted() {
        shared.recorder.record(record(
            connection,
            &head,
            checked.ok(),
            &payload,
            &reply,
            &request_id,
        ));
    }
    Some(reply.status)
}

fn decide(shared: &Shared, publish: &Publish, payload: &[u8]) -> Reply {
    let channel = shared.channels.lookup(&publish.bundle, &publish.channel_id);
    if let Err(rejection) = check_channel(publish, channel).and_then(|()| check_payload(payload)) {
        return Reply::rejection(rejection);
    }
    let faults = &shared.faults;
    match faults
        .scripted_for(&publish.channel_id)
        .or_else(|| faults.random_error())
    {
        Some(answer) if answer != Answer::OK => Reply::answer(&answer),
        _ => Reply::empty(200).with_header(APNS_UNIQUE_ID, reply::new_uuid()),
    }
}

fn record(
    connection: u64,
    head: &Parts,
    publish: Option<Publish>,
    payload: &[u8],
    reply: &Reply,
    request_id: &HeaderValue,
) -> Record {
    let headers: &HeaderMap = &head.headers;
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let bundle = head.uri.path().strip_prefix(PREFIX).map(str::to_owned);
    Record {
        at: SystemTime::now(),
        connection,
        apns_id: request_id.to_str().unwrap_or_default().to_owned(),
        device_token: String::new(),
        topic: publish.as_ref().map(|p| p.bundle.clone()).or(bundle),
        push_type: header(APNS_PUSH_TYPE).map(str::to_owned),
        priority: header(APNS_PRIORITY).and_then(|p| p.parse().ok()),
        expiration: header(APNS_EXPIRATION).and_then(|e| e.parse().ok()),
        collapse_id: None,
        payload: Bytes::copy_from_slice(payload),
        status: reply.status,
        reason: reply.reason.clone(),
        channel_id: Some(
            header(APNS_CHANNEL_ID)
                .map(str::to_owned)
                .unwrap_or_default(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::AuthMode;
    use http::Request;

    const ID: &str = "AAECAwQFBgcICQoLDA0ODw==";

    fn head(method: &str, path: &str, changes: &[(&str, Option<&str>)]) -> Parts {
        let mut headers = vec![
            ("apns-channel-id", ID),
            ("apns-push-type", "liveactivity"),
            ("apns-priority", "10"),
            ("apns-expiration", "0"),
        ];
        for (name, value) in changes {
            headers.retain(|(n, _)| n != name);
            if let Some(v) = value {
                headers.push((name, v));
            }
        }
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn outcome(changes: &[(&str, Option<&str>)]) -> Result<Publish, (u16, &'static str)> {
        let policy = Policy {
            bundle: Some("com.x".into()),
            auth: AuthMode::None,
        };
        check_head(
            &head("POST", "/4/broadcasts/apps/com.x", changes),
            &policy,
            |_| Ok(()),
        )
        .map_err(|r| (r.status, r.reason))
    }

    #[test]
    fn heads() {
        assert_eq!(
            outcome(&[]),
            Ok(Publish {
                bundle: "com.x".into(),
                channel_id: ID.into(),
                priority: 10,
                expiration: 0
            })
        );
        for push_type in ["LiveActivity", "Liveactivity", "LIVEACTIVITY"] {
            assert!(outcome(&[("apns-push-type", Some(push_type))]).is_ok());
        }
        for p in ["5", "1"] {
            assert!(outcome(&[("apns-priority", Some(p))]).is_ok());
        }
        for (changes, expected) in [
            (vec![("apns-channel-id", None)], "MissingChannelId"),
            (vec![("apns-channel-id", Some("abc"))], "BadChannelId"),
            (vec![("apns-push-type", None)], "MissingPushType"),
            (vec![("apns-push-type", Some("alert"))], "InvalidPushType"),
            (vec![("apns-priority", None)], "BadPriority"),
            (vec![("apns-priority", Some("7"))], "BadPriority"),
            (vec![("apns-expiration", None)], "BadExpirationDate"),
            (vec![("apns-expiration", Some("soon"))], "BadExpirationDate"),
            (vec![("apns-request-id", Some("x"))], "BadMessageId"),
            (vec![("apns-id", Some("x"))], "BadMessageId"),
        ] {
            assert_eq!(outcome(&changes), Err((400, expected)), "{changes:?}");
        }
        let policy = Policy {
            bundle: None,
            auth: AuthMode::None,
        };
        let check = |method, path| {
            check_head(&head(method, path, &[]), &policy, |_| Ok(()))
                .map_err(|r| (r.status, r.reason))
        };
        assert_eq!(
            check("GET", "/4/broadcasts/apps/com.x"),
            Err((405, "MethodNotAllowed"))
        );
        assert_eq!(
            check("POST", "/4/broadcasts/apps/com.x/more"),
            Err((404, "BadPath"))
        );
        assert_eq!(
            check("POST", "/4/broadcasts/apps/com.x.push-type.liveactivity"),
            Err((400, "TopicDisallowed"))
        );
    }

    #[test]
    fn channels() {
        let publish = |expiration| Publish {
            bundle: "com.x".into(),
            channel_id: ID.into(),
            priority: 10,
            expiration,
        };
        let reason = |p: &Publish, l| check_channel(p, l).map_err(|r| r.reason);
        assert_eq!(reason(&publish(0), Lookup::Active(0)), Ok(()));
        assert_eq!(
            reason(&publish(1), Lookup::Active(0)),
            Err("BadExpirationDate")
        );
        assert_eq!(reason(&publish(1), Lookup::Active(1)), Ok(()));
        assert_eq!(
            reason(&publish(0), Lookup::Deleted),
            Err("ChannelNotRegistered")
        );
        assert_eq!(reason(&publish(0), Lookup::Unknown), Err("BadChannelId"));
    }

    #[test]
    fn payloads() {
        let reason = |p: &str| check_payload(p.as_bytes()).map_err(|r| (r.status, r.reason));
        assert_eq!(reason(r#"{"aps":{"event":"update"}}"#), Ok(()));
        assert_eq!(reason(r#"{"aps":{"event":"end"}}"#), Ok(()));
        let sized = |n: usize| {
            let head = r#"{"aps":{"event":"end"},"x":""#;
            format!("{head}{}\"}}", "x".repeat(n - head.len() - 2))
        };
        assert_eq!(sized(5120).len(), 5120);
        assert_eq!(reason(&sized(5120)), Ok(()));
        assert_eq!(reason(&sized(5121)), Err((413, "PayloadTooLarge")));
        assert_eq!(reason(""), Err((400, "PayloadEmpty")));
        for bad in ["{", "[1]", "nope"] {
            assert_eq!(reason(bad), Err((400, "BadRequestPayload")), "{bad}");
        }
        for bad in [
            r#"{"aps":{"event":"start"}}"#,
            r#"{"aps":{"event":"Update"}}"#,
            r#"{"aps":{}}"#,
            r#"{}"#,
            r#"{"aps":{"event":1}}"#,
        ] {
            assert_eq!(reason(bad), Err((400, "BadRequestParams")), "{bad}");
        }
    }
}
