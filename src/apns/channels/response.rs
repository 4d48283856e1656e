//! An answer of APNs's channel management API -> what it means, as a pure function.
//!
//! What a channel's row becomes follows from it (`channels::outcome`): created, read,
//! deleted or listed; no such channel (for a delete: gone already, as the live service
//! answers a second delete with 404 `BadPath`); refused for good; retried (5xx, 429, the
//! channel limit, which frees as the app closes channels); or deferred without an attempt
//! when it is not the channel's fault (credentials refused, the app's broadcast
//! capability not enabled).

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::apns::http2::broadcast::{check_channel_id, APNS_CHANNEL_ID};
use crate::apns::reason::Reason;
use crate::channels::{ChannelAnswer, ChannelError, ChannelOp, ChannelReply, MessageStorage};
use crate::http2::{retry_after, Answer};

/// How long a channel waits while APNs refuses the app's credentials.
pub const CREDENTIALS_WAIT: Duration = Duration::from_secs(60);
/// How long a channel waits while the app's broadcast capability is off: it is switched
/// on in Apple's developer account, not here.
pub const FEATURE_WAIT: Duration = Duration::from_secs(5 * 60);

/// What one answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Done(ChannelAnswer),
    /// The provider token is stale: mint a new one and ask again.
    RefreshToken,
}

#[derive(Deserialize)]
struct ReasonBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ChannelBody {
    #[serde(rename = "message-storage-policy")]
    policy: u64,
}

#[derive(Deserialize)]
struct ListBody {
    channels: Vec<String>,
}

/// Maps APNs's answer to `op` onto a [`Step`]; `now` reads an HTTP-date `Retry-After`.
pub fn read(op: &ChannelOp, answer: &Answer, now: SystemTime) -> Step {
    let status = answer.status;
    if (200..300).contains(&status) {
        return Step::Done(success(op, answer));
    }
    let reason = serde_json::from_slice::<ReasonBody>(&answer.body)
        .ok()
        .and_then(|b| b.reason)
        .map_or_else(
            || Reason::Other("no reason given".into()),
            |r| Reason::parse(&r),
        );
    let explained = reason.explain(status);
    let after = answer
        .header("retry-after")
        .and_then(|v| retry_after(v, now));
    let error = match (status, &reason) {
        (403, Reason::ExpiredProviderToken) => return Step::RefreshToken,
        (403, _) | (429, Reason::TooManyProviderTokenUpdates) => ChannelError::Deferred {
            reason: explained,
            after: CREDENTIALS_WAIT,
        },
        (400, Reason::FeatureNotEnabled | Reason::BroadcastFeatureNotEnabled) => {
            ChannelError::Deferred {
                reason: explained,
                after: FEATURE_WAIT,
            }
        }
        (404, Reason::BadPath) | (400, Reason::ChannelNotRegistered | Reason::BadChannelId)
            if matches!(op, ChannelOp::Read(_) | ChannelOp::Delete(_)) =>
        {
            ChannelError::NoSuchChannel(explained)
        }
        (400, Reason::CannotCreateChannelConfig | Reason::IdleTimeout) | (429, _) => {
            ChannelError::Retry {
                reason: explained,
                after,
            }
        }
        (400..=499, _) => ChannelError::Rejected(explained),
        _ => ChannelError::Retry {
            reason: explained,
            after,
        },
    };
    Step::Done(Err(error))
}

/// A 2xx, read for what `op` asked.
fn success(op: &ChannelOp, answer: &Answer) -> ChannelAnswer {
    let unreadable = |what: &str| {
        Err(ChannelError::Retry {
            reason: format!(
                "APNs answered HTTP {} without {what}: {:?}",
                answer.status,
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
            ),
            after: None,
        })
    };
    match op {
        ChannelOp::Create(_) => match answer.header(APNS_CHANNEL_ID.as_str()) {
            Some(id) if check_channel_id(id).is_ok() => Ok(ChannelReply::Created {
                channel_id: id.to_owned(),
            }),
            // A channel may exist that nobody can name: not one to make again and again.
            _ => Err(ChannelError::Rejected(format!(
                "APNs answered HTTP {} to the create without a channel id (apns-channel-id)",
                answer.status
            ))),
        },
        ChannelOp::Read(_) => match serde_json::from_slice::<ChannelBody>(&answer.body)
            .ok()
            .and_then(|b| MessageStorage::from_policy(b.policy))
        {
            Some(storage) => Ok(ChannelReply::Read(storage)),
            None => unreadable("the channel's message-storage-policy"),
        },
        ChannelOp::Delete(_) => Ok(ChannelReply::Deleted),
        ChannelOp::List => match serde_json::from_slice::<ListBody>(&answer.body) {
            Ok(list) => Ok(ChannelReply::Listed(list.channels)),
            Err(_) => unreadable("the list of channels"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Answer {
            status,
            headers: map,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn done(op: &ChannelOp, a: &Answer) -> ChannelAnswer {
        match read(op, a, SystemTime::UNIX_EPOCH) {
            Step::Done(answer) => answer,
            other => panic!("{other:?}"),
        }
    }

    fn reason(status: u16, reason: &str) -> Answer {
        answer(status, &[], &format!(r#"{{"reason":"{reason}"}}"#))
    }

    const CREATE: ChannelOp = ChannelOp::Create(MessageStorage::None);

    #[test]
    fn successes_carry_what_was_asked() {
        let created = answer(201, &[("apns-channel-id", "dHN0LXNyY2gtY2hubA==")], "");
        assert_eq!(
            done(&CREATE, &created),
            Ok(ChannelReply::Created {
                channel_id: "dHN0LXNyY2gtY2hubA==".into()
            })
        );
        let read_op = ChannelOp::Read("x".into());
        let body = r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#;
        assert_eq!(
            done(&read_op, &answer(200, &[], body)),
            Ok(ChannelReply::Read(MessageStorage::MostRecent))
        );
        assert_eq!(
            done(&ChannelOp::Delete("x".into()), &answer(204, &[], "")),
            Ok(ChannelReply::Deleted)
        );
        assert_eq!(
            done(
                &ChannelOp::List,
                &answer(200, &[], r#"{"channels": ["a", "b"]}"#)
            ),
            Ok(ChannelReply::Listed(vec!["a".into(), "b".into()]))
        );
    }

    #[test]
    fn a_success_without_what_was_asked_is_not_taken_for_one() {
        assert!(matches!(
            done(&CREATE, &answer(201, &[], "")),
            Err(ChannelError::Rejected(r)) if r.contains("without a channel id")
        ));
        assert!(matches!(
            done(&ChannelOp::List, &answer(200, &[], "{}")),
            Err(ChannelError::Retry { .. })
        ));
        assert!(matches!(
            done(
                &ChannelOp::Read("x".into()),
                &answer(200, &[], r#"{"message-storage-policy": 7}"#)
            ),
            Err(ChannelError::Retry { .. })
        ));
    }

    #[test]
    fn every_refusal_means_what_apple_says() {
        let delete = ChannelOp::Delete("x".into());
        assert!(matches!(
            done(&delete, &reason(404, "BadPath")),
            Err(ChannelError::NoSuchChannel(_))
        ));
        assert!(matches!(
            done(&delete, &reason(400, "ChannelNotRegistered")),
            Err(ChannelError::NoSuchChannel(_))
        ));
        // Only a channel's call can miss its channel: a create's 404 is a wrong path.
        assert!(matches!(
            done(&CREATE, &reason(404, "BadPath")),
            Err(ChannelError::Rejected(_))
        ));
        assert!(matches!(
            done(&CREATE, &reason(400, "CannotCreateChannelConfig")),
            Err(ChannelError::Retry { reason, .. }) if reason.contains("10,000")
        ));
        for feature in ["FeatureNotEnabled", "BroadcastFeatureNotEnabled"] {
            assert!(matches!(
                done(&CREATE, &reason(400, feature)),
                Err(ChannelError::Deferred {
                    after: FEATURE_WAIT,
                    ..
                })
            ));
        }
        assert!(matches!(
            done(&CREATE, &reason(403, "InvalidProviderToken")),
            Err(ChannelError::Deferred {
                after: CREDENTIALS_WAIT,
                ..
            })
        ));
        assert_eq!(
            read(
                &CREATE,
                &reason(403, "ExpiredProviderToken"),
                SystemTime::UNIX_EPOCH
            ),
            Step::RefreshToken
        );
        let mut throttled = reason(429, "TooManyRequests");
        throttled
            .headers
            .insert("retry-after", "30".parse().unwrap());
        assert_eq!(
            done(&CREATE, &throttled),
            Err(ChannelError::Retry {
                reason: "TooManyRequests: too many requests to the same device token or channel (HTTP 429)"
                    .into(),
                after: Some(Duration::from_secs(30))
            })
        );
        assert!(matches!(
            done(&CREATE, &reason(503, "Service Unavailable")),
            Err(ChannelError::Retry { reason, .. }) if reason.starts_with("ServiceUnavailable")
        ));
        assert!(matches!(
            done(&CREATE, &reason(400, "BadRequestPayload")),
            Err(ChannelError::Rejected(_))
        ));
        assert!(matches!(
            done(&CREATE, &answer(500, &[], "")),
            Err(ChannelError::Retry { .. })
        ));
    }
}
