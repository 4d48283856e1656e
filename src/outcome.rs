//! What becomes of a row: from a [`Delivery`] (or a reason not to send at all) to the
//! [`RowUpdate`] the outbox writes. Pure, so every rule of the README's "What becomes of a row" table is
//! unit-tested here without a database or a network.

use std::fmt;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::backoff::backoff;
use crate::config::RetryConfig;
use crate::transport::{Delivery, MessageId, Notification};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    Pending,
    Sent,
    Failed,
    Expired,
}

impl RowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Pending => "pending",
            RowStatus::Sent => "sent",
            RowStatus::Failed => "failed",
            RowStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for RowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest a service's `Retry-After` (or a deferral) may put a row off: a larger
/// value would park the row for years, and past PostgreSQL's intervals its UPDATE fails
/// and the row is resent for ever. A row put off this long is looked at again then.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The write-back for one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowUpdate {
    pub id: i64,
    pub status: RowStatus,
    pub last_error: Option<String>,
    pub apns_id: Option<Uuid>,
    /// FCM's name for a sent message.
    pub fcm_name: Option<String>,
    /// The push message's URL a Web Push service gave a sent message (`Location`).
    pub webpush_location: Option<String>,
    /// For rows going back to `pending`: when to try again, from now.
    pub retry_in: Option<Duration>,
    /// Whether a request was made; it counts against `max_attempts`.
    pub attempted: bool,
    /// Set when the service reported the token unregistered: record it, with this time.
    pub unregistered_at: Option<SystemTime>,
}

impl RowUpdate {
    fn new(id: i64, status: RowStatus) -> RowUpdate {
        RowUpdate {
            id,
            status,
            last_error: None,
            apns_id: None,
            fcm_name: None,
            webpush_location: None,
            retry_in: None,
            attempted: false,
            unregistered_at: None,
        }
    }

    /// A row not sent because it expired while waiting.
    pub fn expired(n: &Notification) -> RowUpdate {
        RowUpdate {
            last_error: Some("expired before it could be sent (expires_at has passed)".into()),
            ..RowUpdate::new(n.id, RowStatus::Expired)
        }
    }

    /// A row not sent because its token was reported unregistered earlier.
    pub fn previously_unregistered(n: &Notification) -> RowUpdate {
        RowUpdate {
            last_error: Some(
                "Unregistered: the push service reported this device token unregistered earlier \
                 (delete it from pgpushd.unregistered_tokens to send to it again)"
                    .into(),
            ),
            ..RowUpdate::new(n.id, RowStatus::Failed)
        }
    }

    /// What one attempt's answer means for the row.
    pub fn after(n: &Notification, delivery: Delivery, retry: &RetryConfig) -> RowUpdate {
        let attempted = |status| RowUpdate {
            attempted: true,
            ..RowUpdate::new(n.id, status)
        };
        match delivery {
            Delivery::Sent { id } => RowUpdate {
                apns_id: match &id {
                    Some(MessageId::Apns(id)) => Some(*id),
                    _ => None,
                },
                fcm_name: match &id {
                    Some(MessageId::Fcm(name)) => Some(name.clone()),
                    _ => None,
                },
                webpush_location: match id {
                    Some(MessageId::Webpush(location)) => Some(location),
                    _ => None,
                },
                ..attempted(RowStatus::Sent)
            },
            Delivery::Rejected { reason } => RowUpdate {
                last_error: Some(reason),
                ..attempted(RowStatus::Failed)
            },
            Delivery::Unregistered { reason, at } => RowUpdate {
                last_error: Some(reason),
                unregistered_at: Some(at),
                ..attempted(RowStatus::Failed)
            },
            Delivery::Retry { reason, after } => {
                let attempts = u32::try_from(n.attempts).unwrap_or(0).saturating_add(1);
                if attempts >= retry.max_attempts {
                    RowUpdate {
                        last_error: Some(format!("gave up after {attempts} attempts: {reason}")),
                        ..attempted(RowStatus::Failed)
                    }
                } else {
                    // The service's Retry-After is the least wait, even past backoff_max
                    // (up to MAX_RETRY_AFTER).
                    let wait = backoff(attempts - 1, retry.backoff_base, retry.backoff_max)
                        .max(after.unwrap_or_default().min(MAX_RETRY_AFTER));
                    RowUpdate {
                        last_error: Some(reason),
                        retry_in: Some(wait),
                        ..attempted(RowStatus::Pending)
                    }
                }
            }
            // No request reached Apple as a real attempt: the row keeps its attempts.
            Delivery::Deferred { reason, after } => RowUpdate {
                last_error: Some(reason),
                retry_in: Some(after.min(MAX_RETRY_AFTER)),
                ..RowUpdate::new(n.id, RowStatus::Pending)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attempts: i32) -> Notification {
        Notification {
            id: 7,
            app: "default".into(),
            device_token: "ab".repeat(32),
            payload: serde_json::json!({"aps": {"alert": "hi"}}).to_string(),
            push_type: "alert".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts,
            broadcast: None,
        }
    }

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn sent_keeps_the_apns_id() {
        let id = Uuid::new_v4();
        let sent = |id| RowUpdate::after(&row(0), Delivery::Sent { id: Some(id) }, &policy());
        let u = sent(MessageId::Apns(id));
        assert_eq!(u.status, RowStatus::Sent);
        assert_eq!((u.apns_id, u.fcm_name.as_deref()), (Some(id), None));
        assert!(u.attempted);
        let u = sent(MessageId::Fcm("projects/p/messages/1".into()));
        assert_eq!(
            (u.apns_id, u.fcm_name.as_deref()),
            (None, Some("projects/p/messages/1"))
        );
    }

    #[test]
    fn retry_after_is_the_least_wait() {
        let quota = |after| Delivery::Retry {
            reason: "QUOTA_EXCEEDED".into(),
            after,
        };
        // Longer than backoff_max (60 s): honoured all the same.
        let u = RowUpdate::after(&row(1), quota(Some(Duration::from_secs(120))), &policy());
        assert_eq!(u.status, RowStatus::Pending);
        assert_eq!(u.retry_in, Some(Duration::from_secs(120)));
        assert!(u.attempted);
        // Shorter than the backoff: the backoff stands.
        let u = RowUpdate::after(&row(1), quota(Some(Duration::from_millis(1))), &policy());
        assert!(u.retry_in.unwrap() >= Duration::from_secs(2));
        // Years away (or past what PostgreSQL's intervals hold): capped, still an attempt.
        let u = RowUpdate::after(&row(1), quota(Some(Duration::MAX)), &policy());
        assert_eq!(u.retry_in, Some(MAX_RETRY_AFTER));
        assert!(u.attempted);
        let deferred = Delivery::Deferred {
            reason: "credentials".into(),
            after: Duration::from_secs(10_000_000_000),
        };
        let u = RowUpdate::after(&row(1), deferred, &policy());
        assert_eq!(u.retry_in, Some(MAX_RETRY_AFTER));
        assert!(!u.attempted);
    }

    #[test]
    fn transient_failures_back_off_until_max_attempts() {
        let u = RowUpdate::after(
            &row(0),
            Delivery::retry("503 ServiceUnavailable"),
            &policy(),
        );
        assert_eq!(u.status, RowStatus::Pending);
        let wait = u.retry_in.unwrap();
        assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_secs(2));
        let u = RowUpdate::after(&row(1), Delivery::retry("x"), &policy());
        assert!(u.retry_in.unwrap() >= Duration::from_secs(2));
        let u = RowUpdate::after(&row(2), Delivery::retry("429 TooManyRequests"), &policy());
        assert_eq!(u.status, RowStatus::Failed);
        assert_eq!(
            u.last_error.as_deref(),
            Some("gave up after 3 attempts: 429 TooManyRequests")
        );
    }

    #[test]
    fn deferred_rows_do_not_count_an_attempt() {
        let d = Delivery::Deferred {
            reason: "InvalidProviderToken".into(),
            after: Duration::from_secs(30),
        };
        let u = RowUpdate::after(&row(2), d, &policy());
        assert_eq!(u.status, RowStatus::Pending);
        assert!(!u.attempted);
        assert_eq!(u.retry_in, Some(Duration::from_secs(30)));
    }

    #[test]
    fn unregistered_and_rejected_fail() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let u = RowUpdate::after(
            &row(0),
            Delivery::Unregistered {
                reason: "Unregistered".into(),
                at,
            },
            &policy(),
        );
        assert_eq!((u.status, u.unregistered_at), (RowStatus::Failed, Some(at)));
        let u = RowUpdate::after(&row(0), Delivery::rejected("BadDeviceToken"), &policy());
        assert_eq!(u.status, RowStatus::Failed);
        assert_eq!(u.last_error.as_deref(), Some("BadDeviceToken"));
    }
}
