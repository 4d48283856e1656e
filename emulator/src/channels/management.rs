//! The channel management API (Apple's "Sending channel management requests to APNs"),
//! served on the emulator's channels listener:
//!
//! | call | request | success |
//! |------|---------|---------|
//! | create | `POST /1/apps/<bundle>/channels`, body `{"message-storage-policy": 0\|1, "push-type": "LiveActivity"}` | 201, empty, `apns-channel-id` |
//! | read | `GET /1/apps/<bundle>/channels`, `apns-channel-id` | 200 `{"message-storage-policy": N, "push-type": "LiveActivity"}` |
//! | delete | `DELETE /1/apps/<bundle>/channels`, `apns-channel-id` | 204, empty |
//! | read all | `GET /1/apps/<bundle>/all-channels` | 200 `{"channels": [ids...]}` |
//!
//! Every answer carries `apns-request-id`. Order of checks (Apple documents none): the
//! path (404 `BadPath`), the method (405 `MethodNotAllowed`), the provider token (403),
//! the bundle id (400 `TopicDisallowed`, 403 `TopicMismatch`), `apns-request-id`, the
//! `apns-channel-id` header, then the body and the channel itself; faults (scripted
//! answers, the error rate) apply to requests that pass all of these, before anything
//! changes.
//!
//! Choices where Apple's pages leave room, or where the live service differs:
//! - A create's body is checked strictly, as documented: a number for the policy (0 or
//!   1), `"LiveActivity"` exactly. Not JSON, or not an object: `BadRequestPayload` ("The
//!   JSON Request payload is unparseable"); a key other than the two: `BadRequestParams`
//!   ("an unrecognizable attribute"); no `push-type`: `MissingPushType`; another value:
//!   `InvalidPushType`; a missing or invalid policy: `BadRequestParams` (one third party
//!   reports an undocumented `MissingChannelQueueSize` for it; unverified, not emulated).
//! - Reading a deleted or never-made channel: `ChannelNotRegistered` (400), as Apple's
//!   table says.
//! - Deleting a channel that does not exist (never made, or deleted already): 404
//!   `BadPath`. Apple documents nothing for it; that is what the live service answers.
//! - The limit counts the channels that exist: a delete frees a slot at once.
//! - The live service answers `BroadcastFeatureNotEnabled` (Apple's table:
//!   `FeatureNotEnabled`) for an app without the capability; the emulator has every app
//!   enabled, and answers either only when scripted.

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::request::Parts;
use http::{HeaderValue, Method};

use super::reply::{self, Reply, APNS_CHANNEL_ID};
use super::{channel_id_header, check_caller, is_bundle_segment, reject, Lookup};
use crate::answer::Answer;
use crate::reason;
use crate::request::read_payload;
use crate::stats::Counters;
use crate::validate::{Policy, Rejection};
use crate::Shared;

/// Enough for any valid create body; a longer one is cut and then unparseable.
pub const MAX_CREATE_BODY: usize = 4096;

/// The only `push-type` a channel may have.
pub const LIVE_ACTIVITY: &str = "LiveActivity";

const PREFIX: &str = "/1/apps/";

/// A management call whose head passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Create { bundle: String },
    Read { bundle: String, channel_id: String },
    Delete { bundle: String, channel_id: String },
    ReadAll { bundle: String },
}

impl Call {
    pub fn bundle(&self) -> &str {
        match self {
            Call::Create { bundle }
            | Call::Read { bundle, .. }
            | Call::Delete { bundle, .. }
            | Call::ReadAll { bundle } => bundle,
        }
    }

    fn channel_id(&self) -> Option<&str> {
        match self {
            Call::Read { channel_id, .. } | Call::Delete { channel_id, .. } => Some(channel_id),
            Call::Create { .. } | Call::ReadAll { .. } => None,
        }
    }
}

/// Checks everything the head says. `provider_token` is called with the `authorization`
/// header under token auth only.
pub fn check_head(
    head: &Parts,
    policy: &Policy,
    provider_token: impl FnOnce(&HeaderValue) -> Result<(), Rejection>,
) -> Result<Call, Rejection> {
    enum Resource {
        Channels,
        AllChannels,
    }
    let (bundle, resource) = head
        .uri
        .path()
        .strip_prefix(PREFIX)
        .and_then(|rest| {
            if let Some(bundle) = rest.strip_suffix("/channels") {
                Some((bundle, Resource::Channels))
            } else {
                rest.strip_suffix("/all-channels")
                    .map(|bundle| (bundle, Resource::AllChannels))
            }
        })
        .filter(|(bundle, _)| is_bundle_segment(bundle))
        .ok_or(reject(404, reason::BAD_PATH))?;
    let method = &head.method;
    let allowed = match resource {
        Resource::Channels => {
            *method == Method::POST || *method == Method::GET || *method == Method::DELETE
        }
        Resource::AllChannels => *method == Method::GET,
    };
    if !allowed {
        return Err(reject(405, reason::METHOD_NOT_ALLOWED));
    }
    let headers = &head.headers;
    check_caller(headers, bundle, policy, provider_token)?;
    let bundle = bundle.to_owned();
    let channel_id = || channel_id_header(headers);
    Ok(match resource {
        Resource::AllChannels => Call::ReadAll { bundle },
        Resource::Channels if *method == Method::POST => Call::Create { bundle },
        Resource::Channels if *method == Method::GET => Call::Read {
            bundle,
            channel_id: channel_id()?,
        },
        Resource::Channels => Call::Delete {
            bundle,
            channel_id: channel_id()?,
        },
    })
}

/// The storage policy a create's body asks for, or why it is refused.
pub fn parse_create(body: &[u8]) -> Result<u8, Rejection> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| reject(400, reason::BAD_REQUEST_PAYLOAD))?;
    let fields = value
        .as_object()
        .ok_or(reject(400, reason::BAD_REQUEST_PAYLOAD))?;
    if fields
        .keys()
        .any(|k| k != "message-storage-policy" && k != "push-type")
    {
        return Err(reject(400, reason::BAD_REQUEST_PARAMS));
    }
    match fields.get("push-type") {
        None => return Err(reject(400, reason::MISSING_PUSH_TYPE)),
        Some(t) if t.as_str() == Some(LIVE_ACTIVITY) => {}
        Some(_) => return Err(reject(400, reason::INVALID_PUSH_TYPE)),
    }
    fields
        .get("message-storage-policy")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| *p <= super::POLICY_MOST_RECENT_MESSAGE_STORED)
        .ok_or(reject(400, reason::BAD_REQUEST_PARAMS))
}

/// Answers one management call whose head was checked already; `None` if the client
/// went away first, else the status answered.
pub(crate) async fn handle(
    shared: &Shared,
    head: Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
    checked: Result<Call, Rejection>,
) -> Option<u16> {
    let latency = shared.faults.latency();
    let _in_flight = shared.counters.request_started();
    let Ok(payload) = read_payload(&mut body, MAX_CREATE_BODY + 1).await else {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    };
    let reply = match checked {
        Err(rejection) => Reply::rejection(rejection),
        Ok(call) => decide(shared, &call, &payload),
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if reply
        .send(&mut respond, reply::request_id(&head.headers))
        .is_err()
    {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    }
    shared.counters.channel_call(reply.status);
    Some(reply.status)
}

/// The answer to a call, applied to the store.
fn decide(shared: &Shared, call: &Call, payload: &[u8]) -> Reply {
    let store = &shared.channels;
    let bundle = call.bundle();
    match call {
        Call::Create { .. } => {
            let policy = match parse_create(payload) {
                Ok(policy) => policy,
                Err(rejection) => return Reply::rejection(rejection),
            };
            if store.count(bundle) >= shared.channel_limit {
                return cannot_create();
            }
            if let Some(fault) = fault(shared, call) {
                return fault;
            }
            match store.create(bundle, policy, Some(shared.channel_limit)) {
                Ok(id) => {
                    Counters::bump(&shared.counters.channels_created);
                    Reply::empty(201).with_header(
                        APNS_CHANNEL_ID,
                        HeaderValue::from_str(&id).expect("base64 is a valid header value"),
                    )
                }
                // Another create took the last slot meanwhile.
                Err(_) => cannot_create(),
            }
        }
        Call::Read { channel_id, .. } => match store.lookup(bundle, channel_id) {
            Lookup::Active(policy) => fault(shared, call).unwrap_or_else(|| {
                Reply::json(
                    200,
                    &serde_json::json!({
                        "message-storage-policy": policy,
                        "push-type": LIVE_ACTIVITY,
                    }),
                )
            }),
            Lookup::Deleted | Lookup::Unknown => {
                Reply::rejection(reject(400, reason::CHANNEL_NOT_REGISTERED))
            }
        },
        Call::Delete { channel_id, .. } => match store.lookup(bundle, channel_id) {
            Lookup::Active(_) => {
                if let Some(fault) = fault(shared, call) {
                    return fault;
                }
                if store.delete(bundle, channel_id) {
                    Counters::bump(&shared.counters.channels_deleted);
                    Reply::empty(204)
                } else {
                    not_found()
                }
            }
            // As seen live: an unknown or already-deleted channel is 404 BadPath.
            Lookup::Deleted | Lookup::Unknown => not_found(),
        },
        Call::ReadAll { .. } => fault(shared, call).unwrap_or_else(|| {
            let ids: Vec<String> = store.list(bundle).into_iter().map(|(id, _)| id).collect();
            Reply::json(200, &serde_json::json!({ "channels": ids }))
        }),
    }
}

fn cannot_create() -> Reply {
    Reply::rejection(reject(400, reason::CANNOT_CREATE_CHANNEL_CONFIG))
}

fn not_found() -> Reply {
    Reply::rejection(reject(404, reason::BAD_PATH))
}

/// A fault for a valid call: what is scripted for its channel id, else for its bundle
/// id, else a random server error at the error rate. A scripted success is no fault.
fn fault(shared: &Shared, call: &Call) -> Option<Reply> {
    let faults = &shared.faults;
    let answer = call
        .channel_id()
        .and_then(|id| faults.scripted_for(id))
        .or_else(|| faults.scripted_for(call.bundle()))
        .or_else(|| faults.random_error())?;
    (answer != Answer::OK).then(|| Reply::answer(&answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::AuthMode;
    use http::Request;

    const ID: &str = "AAECAwQFBgcICQoLDA0ODw==";

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn policy(auth: AuthMode) -> Policy {
        Policy {
            bundle: Some("com.x".into()),
            auth,
        }
    }

    fn good(v: &HeaderValue) -> Result<(), Rejection> {
        match v.as_bytes() {
            b"bearer good" => Ok(()),
            _ => Err(reject(403, reason::INVALID_PROVIDER_TOKEN)),
        }
    }

    fn outcome(parts: &Parts, auth: AuthMode) -> Result<Call, (u16, &'static str)> {
        check_head(parts, &policy(auth), good).map_err(|r| (r.status, r.reason))
    }

    #[test]
    fn routes() {
        let open = AuthMode::None;
        let c = "/1/apps/com.x/channels";
        let with_id = [("apns-channel-id", ID)];
        assert_eq!(
            outcome(&head("POST", c, &[]), open),
            Ok(Call::Create {
                bundle: "com.x".into()
            })
        );
        assert_eq!(
            outcome(&head("GET", c, &with_id), open),
            Ok(Call::Read {
                bundle: "com.x".into(),
                channel_id: ID.into()
            })
        );
        assert_eq!(
            outcome(&head("DELETE", c, &with_id), open),
            Ok(Call::Delete {
                bundle: "com.x".into(),
                channel_id: ID.into()
            })
        );
        assert_eq!(
            outcome(&head("GET", "/1/apps/com.x/all-channels", &[]), open),
            Ok(Call::ReadAll {
                bundle: "com.x".into()
            })
        );
        for path in [
            "/1/apps/com.x/channel",
            "/1/apps//channels",
            "/2/apps/com.x/channels",
            "/1/apps/com.x/channels/abc",
            "/1/apps/a/b/channels",
            "/",
        ] {
            assert_eq!(
                outcome(&head("POST", path, &[]), open),
                Err((404, "BadPath")),
                "{path}"
            );
        }
        assert_eq!(
            outcome(&head("PUT", c, &[]), open),
            Err((405, "MethodNotAllowed"))
        );
        assert_eq!(
            outcome(&head("POST", "/1/apps/com.x/all-channels", &[]), open),
            Err((405, "MethodNotAllowed"))
        );
    }

    #[test]
    fn auth_topic_and_ids() {
        let c = "/1/apps/com.x/channels";
        assert_eq!(
            outcome(&head("POST", c, &[]), AuthMode::Token),
            Err((403, "MissingProviderToken"))
        );
        assert_eq!(
            outcome(
                &head("POST", c, &[("authorization", "bearer bad")]),
                AuthMode::Token
            ),
            Err((403, "InvalidProviderToken"))
        );
        assert!(outcome(
            &head("POST", c, &[("authorization", "bearer good")]),
            AuthMode::Token
        )
        .is_ok());
        assert_eq!(
            outcome(
                &head("POST", "/1/apps/com.y/channels", &[]),
                AuthMode::Certificate
            ),
            Err((403, "TopicMismatch"))
        );
        assert_eq!(
            outcome(
                &head("POST", "/1/apps/com.x.push-type.liveactivity/channels", &[]),
                AuthMode::None
            ),
            Err((400, "TopicDisallowed"))
        );
        assert_eq!(
            outcome(&head("GET", c, &[]), AuthMode::None),
            Err((400, "MissingChannelId"))
        );
        assert_eq!(
            outcome(
                &head("DELETE", c, &[("apns-channel-id", "***")]),
                AuthMode::None
            ),
            Err((400, "BadChannelId"))
        );
        assert_eq!(
            outcome(
                &head("POST", c, &[("apns-request-id", "x")]),
                AuthMode::None
            ),
            Err((400, "BadMessageId"))
        );
    }

    #[test]
    fn create_bodies() {
        let ok = |b: &str| parse_create(b.as_bytes());
        assert_eq!(
            ok(r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#),
            Ok(1)
        );
        assert_eq!(
            ok(r#"{"push-type": "LiveActivity", "message-storage-policy": 0}"#),
            Ok(0)
        );
        let err = |b: &str| parse_create(b.as_bytes()).unwrap_err().reason;
        for (body, reason) in [
            ("", "BadRequestPayload"),
            ("{", "BadRequestPayload"),
            ("[1]", "BadRequestPayload"),
            (
                r#"{"message-storage-policy": 1, "push-type": "LiveActivity", "x": 1}"#,
                "BadRequestParams",
            ),
            (r#"{"message-storage-policy": 1}"#, "MissingPushType"),
            (
                r#"{"message-storage-policy": 1, "push-type": "liveactivity"}"#,
                "InvalidPushType",
            ),
            (
                r#"{"message-storage-policy": 1, "push-type": 1}"#,
                "InvalidPushType",
            ),
            (r#"{"push-type": "LiveActivity"}"#, "BadRequestParams"),
            (
                r#"{"message-storage-policy": 2, "push-type": "LiveActivity"}"#,
                "BadRequestParams",
            ),
            (
                r#"{"message-storage-policy": "1", "push-type": "LiveActivity"}"#,
                "BadRequestParams",
            ),
            (
                r#"{"message-storage-policy": -1, "push-type": "LiveActivity"}"#,
                "BadRequestParams",
            ),
        ] {
            assert_eq!(err(body), reason, "{body}");
        }
    }
}
