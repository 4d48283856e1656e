//! An APNs answer -> what to do: a [`Delivery`] for the row, or something the *app* must
//! deal with first (credentials refused, provider token expired).
//!
//! The mapping is the README's "What becomes of a row" table; Apple's reasons are
//! [`Reason`]s.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::service::Scope;
use uuid::Uuid;

use crate::apns::reason::Reason;
use crate::transport::{Delivery, MessageId};

/// APNs's id for a broadcast it accepted.
const APNS_UNIQUE_ID: &str = "apns-unique-id";

/// What one answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Settled for this attempt: what the row becomes.
    Row(Delivery),
    /// APNs refuses the app's credentials: the app backs off, its rows wait.
    Credentials(Reason),
    /// APNs throttles: one device token (`TooManyRequests`: the row retries, unless
    /// device after device is), or the app itself (`TooManyProviderTokenUpdates`).
    Throttled { reason: String, scope: Scope },
    /// The provider token is stale: mint a new one and send the request again.
    RefreshToken,
}

/// An APNs answer, as the connection read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// The `apns-id` response header; for a broadcast, `apns-unique-id` (APNs's id for
    /// it, which Apple asks for in a support request).
    pub apns_id: Option<String>,
    pub body: bytes::Bytes,
}

impl From<crate::http2::Answer> for Answer {
    fn from(a: crate::http2::Answer) -> Answer {
        Answer {
            status: a.status,
            apns_id: a
                .header(super::request::APNS_ID.as_str())
                .or_else(|| a.header(APNS_UNIQUE_ID))
                .map(str::to_owned),
            body: a.body,
        }
    }
}

impl Answer {
    /// The `reason` from the body, if any.
    pub fn reason(&self) -> Option<Reason> {
        ErrorBody::parse(&self.body)
            .reason
            .map(|r| Reason::parse(&r))
    }
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    reason: Option<String>,
    /// Milliseconds since the epoch (410 only): when the token became invalid.
    timestamp: Option<u64>,
}

impl ErrorBody {
    fn parse(body: &[u8]) -> ErrorBody {
        if body.is_empty() {
            return ErrorBody::default();
        }
        serde_json::from_slice(body).unwrap_or_default()
    }
}

/// Maps an answer onto a [`Verdict`]; `now` stands in for a 410 without a timestamp.
pub fn verdict(answer: &Answer, now: SystemTime) -> Verdict {
    let status = answer.status;
    if status == 200 {
        return Verdict::Row(Delivery::Sent {
            id: answer
                .apns_id
                .as_deref()
                .and_then(|id| Uuid::parse_str(id).ok())
                .map(MessageId::Apns),
        });
    }
    let body = ErrorBody::parse(&answer.body);
    let reason = match body.reason.as_deref() {
        Some(r) => Reason::parse(r),
        None => Reason::Other("no reason given".to_owned()),
    };
    let explained = reason.explain(status);
    match (status, &reason) {
        (410, _) => Verdict::Row(Delivery::Unregistered {
            reason: explained,
            // A timestamp PostgreSQL could not store (or from the future) is not
            // Apple's: take ours rather than fail the whole batch's commit.
            at: body
                .timestamp
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                .filter(|at| *at <= now + Duration::from_secs(86_400))
                .unwrap_or(now),
        }),
        (403, Reason::ExpiredProviderToken) => Verdict::RefreshToken,
        // Every 403 is about credentials; an unknown one must not burn rows either.
        (403, _) => Verdict::Credentials(reason),
        (429, Reason::TooManyProviderTokenUpdates) => Verdict::Throttled {
            reason: explained,
            scope: Scope::App,
        },
        (429, _) => Verdict::Throttled {
            reason: explained,
            scope: Scope::Target,
        },
        // The connection idled out under the request: nothing is wrong with the row.
        (400, Reason::IdleTimeout) => Verdict::Row(Delivery::retry(explained)),
        (400..=499, _) => Verdict::Row(Delivery::rejected(explained)),
        (500..=599, _) => Verdict::Row(Delivery::retry(explained)),
        _ => Verdict::Row(Delivery::retry(format!(
            "unexpected HTTP status {status} ({reason})"
        ))),
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(r) = self.reason() {
            write!(f, " {r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7C3E0E21-0C32-4E5C-8D63-5C4E2B9E1B11";

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            apns_id: Some(ID.into()),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn with_reason(status: u16, reason: &Reason) -> Verdict {
        verdict(
            &answer(status, &format!(r#"{{"reason":"{reason}"}}"#)),
            UNIX_EPOCH,
        )
    }

    #[test]
    fn names_round_trip() {
        for r in Reason::KNOWN {
            assert_eq!(Reason::parse(&r.to_string()), r);
            assert!(!r.description().is_empty(), "{r}");
        }
        assert_eq!(
            Reason::parse("SomethingNew"),
            Reason::Other("SomethingNew".into())
        );
    }

    #[test]
    fn success_carries_the_apns_id() {
        let v = verdict(&answer(200, ""), UNIX_EPOCH);
        assert_eq!(
            v,
            Verdict::Row(Delivery::Sent {
                id: Some(MessageId::Apns(Uuid::parse_str(ID).unwrap()))
            })
        );
        let mut a = answer(200, "");
        a.apns_id = None;
        assert_eq!(
            verdict(&a, UNIX_EPOCH),
            Verdict::Row(Delivery::Sent { id: None })
        );
    }

    #[test]
    fn gone_tokens_are_unregistered_with_apples_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let v = verdict(
            &answer(
                410,
                r#"{"reason":"Unregistered","timestamp":1700000000123}"#,
            ),
            now,
        );
        assert_eq!(
            v,
            Verdict::Row(Delivery::Unregistered {
                reason: "Unregistered: the device token is inactive for the topic (HTTP 410)"
                    .into(),
                at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            })
        );
        // A time PostgreSQL could not store is not Apple's: ours instead.
        match verdict(
            &answer(
                410,
                r#"{"reason":"Unregistered","timestamp":18446744073709551615}"#,
            ),
            now,
        ) {
            Verdict::Row(Delivery::Unregistered { at, .. }) => assert_eq!(at, now),
            other => panic!("{other:?}"),
        }
        let now = UNIX_EPOCH + Duration::from_secs(42);
        match verdict(&answer(410, r#"{"reason":"ExpiredToken"}"#), now) {
            Verdict::Row(Delivery::Unregistered { reason, at }) => {
                assert!(reason.starts_with("ExpiredToken: "), "{reason}");
                assert_eq!(at, now);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_reject_the_row() {
        let rejected = [
            (400, Reason::BadCollapseId),
            (400, Reason::BadDeviceToken),
            (400, Reason::BadExpirationDate),
            (400, Reason::BadMessageId),
            (400, Reason::BadPriority),
            (400, Reason::BadTopic),
            (400, Reason::DeviceTokenNotForTopic),
            (400, Reason::DuplicateHeaders),
            (400, Reason::InvalidPushType),
            (400, Reason::MissingDeviceToken),
            (400, Reason::MissingTopic),
            (400, Reason::PayloadEmpty),
            (400, Reason::TopicDisallowed),
            (404, Reason::BadPath),
            (405, Reason::MethodNotAllowed),
            (413, Reason::PayloadTooLarge),
            (400, Reason::Other("BrandNew".into())),
        ];
        for (status, reason) in rejected {
            match with_reason(status, &reason) {
                Verdict::Row(Delivery::Rejected { reason: text }) => {
                    assert!(text.starts_with(&format!("{reason}")), "{text}");
                    assert!(text.ends_with(&format!("(HTTP {status})")), "{text}");
                }
                other => panic!("{reason}: {other:?}"),
            }
        }
        assert_eq!(
            with_reason(400, &Reason::BadDeviceToken),
            Verdict::Row(Delivery::rejected(
                "BadDeviceToken: the device token is invalid (or for the other environment) (HTTP 400)"
            ))
        );
        assert_eq!(
            with_reason(400, &Reason::Other("BrandNew".into())),
            Verdict::Row(Delivery::rejected("BrandNew (HTTP 400)"))
        );
    }

    #[test]
    fn transient_answers_retry() {
        for (status, reason) in [
            (500, Reason::InternalServerError),
            (503, Reason::ServiceUnavailable),
            (503, Reason::Shutdown),
            (400, Reason::IdleTimeout),
            (502, Reason::Other("BadGateway".into())),
        ] {
            match with_reason(status, &reason) {
                Verdict::Row(Delivery::Retry { reason: text, .. }) => {
                    assert!(text.starts_with(&reason.to_string()), "{text}")
                }
                other => panic!("{reason}: {other:?}"),
            }
        }
        assert_eq!(
            verdict(&answer(503, ""), UNIX_EPOCH),
            Verdict::Row(Delivery::retry("no reason given (HTTP 503)"))
        );
        assert_eq!(
            verdict(&answer(302, ""), UNIX_EPOCH),
            Verdict::Row(Delivery::retry(
                "unexpected HTTP status 302 (no reason given)"
            ))
        );
    }

    #[test]
    fn too_many_requests_is_the_devices_too_many_token_updates_the_apps() {
        match with_reason(429, &Reason::TooManyRequests) {
            Verdict::Throttled {
                reason,
                scope: Scope::Target,
            } => {
                assert!(reason.starts_with("TooManyRequests"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match with_reason(429, &Reason::TooManyProviderTokenUpdates) {
            Verdict::Throttled {
                reason,
                scope: Scope::App,
            } => {
                assert!(
                    reason.starts_with("TooManyProviderTokenUpdates"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_credentials_are_the_apps_problem() {
        for reason in [
            Reason::InvalidProviderToken,
            Reason::MissingProviderToken,
            Reason::BadCertificate,
            Reason::BadCertificateEnvironment,
            Reason::Forbidden,
            Reason::UnrelatedKeyIdInToken,
            Reason::BadEnvironmentKeyInToken,
        ] {
            assert!(reason.is_credential_problem(), "{reason}");
            assert_eq!(
                with_reason(403, &reason),
                Verdict::Credentials(reason.clone())
            );
        }
        assert_eq!(
            with_reason(403, &Reason::Other("NewAuthThing".into())),
            Verdict::Credentials(Reason::Other("NewAuthThing".into()))
        );
        assert_eq!(
            verdict(&answer(403, "not json"), UNIX_EPOCH),
            Verdict::Credentials(Reason::Other("no reason given".into()))
        );
        assert!(!Reason::ExpiredProviderToken.is_credential_problem());
    }

    #[test]
    fn a_stale_provider_token_is_refreshed() {
        assert_eq!(
            with_reason(403, &Reason::ExpiredProviderToken),
            Verdict::RefreshToken
        );
    }

    #[test]
    fn answers_display_their_reason() {
        assert_eq!(
            answer(400, r#"{"reason":"BadTopic"}"#).to_string(),
            "HTTP 400 BadTopic"
        );
        assert_eq!(answer(200, "").to_string(), "HTTP 200");
    }
}
