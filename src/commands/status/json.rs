//! `pgpushd status --json`: the report as one JSON object, for scripts and monitoring.
//!
//! Durations are seconds (numbers, fractional); one that no number can hold (the age of
//! a legacy `'-infinity'` timestamp) is `null`, as is an absent one. Device tokens are
//! shortened as in the text unless asked for whole. The field names are a stable
//! interface: add fields, never rename them (docs/operations.md lists them).

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::outbox::status::{AppCounts, StatusReport, ERROR_WINDOW};
use crate::transport::short_token;

impl StatusReport {
    /// The report as a JSON value, read at `read_at`.
    pub fn to_json(&self, full_tokens: bool, read_at: SystemTime) -> Value {
        let total = self.apps.iter().fold(
            AppCounts {
                app: "(all)".into(),
                ..AppCounts::default()
            },
            |mut t, a| {
                t.pending += a.pending;
                t.due += a.due;
                t.retrying += a.retrying;
                t.sent += a.sent;
                t.failed += a.failed;
                t.expired += a.expired;
                t
            },
        );
        json!({
            "read_at": humantime::format_rfc3339_millis(read_at).to_string(),
            "apps": self.apps.iter().map(|a| {
                let mut counts = counts(a);
                counts["app"] = json!(a.app);
                counts
            }).collect::<Vec<_>>(),
            "totals": counts(&total),
            "oldest_due": self.oldest_due.as_ref().map(|o| json!({
                "id": o.id,
                "app": o.app,
                "attempts": o.attempts,
                "overdue_seconds": seconds(o.overdue),
            })),
            "next_scheduled_in_seconds": self.next_scheduled.map(seconds),
            "never_due": self.never_due,
            "awake": self.awake_for.is_some(),
            "awake_for_seconds": self.awake_for.map(seconds),
            "long_batches": {
                "count": self.long_batches,
                "longest_seconds": self.longest_batch.map(seconds),
                "open_longer_than_seconds": self.long_batch_after.as_secs_f64(),
            },
            "errors_window_seconds": ERROR_WINDOW.as_secs(),
            "errors": self.errors.iter().map(|e| json!({
                "count": e.count,
                "status": e.status,
                "app": e.app,
                "error": e.error,
            })).collect::<Vec<_>>(),
            "unregistered": self.unregistered.iter().map(|u| json!({
                "app": u.app,
                "tokens": u.tokens,
                "newest_ago_seconds": seconds(u.newest),
            })).collect::<Vec<_>>(),
            "newest_unregistered": self.newest_unregistered.iter().map(|t| json!({
                "app": t.app,
                "device_token": if full_tokens { &t.device_token } else { short_token(&t.device_token) },
                "ago_seconds": seconds(t.ago),
            })).collect::<Vec<_>>(),
        })
    }
}

fn counts(a: &AppCounts) -> Value {
    json!({
        "pending": a.pending,
        "due": a.due,
        "retrying": a.retrying,
        "sent": a.sent,
        "failed": a.failed,
        "expired": a.expired,
    })
}

/// Seconds, or `null` for what no number can hold.
fn seconds(d: Duration) -> Value {
    match d {
        Duration::MAX => Value::Null,
        d => json!(d.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::status::{OldestDue, UnregisteredToken, LONG_BATCH};

    #[test]
    fn the_json_has_every_figure_with_seconds_and_nulls() {
        let report = StatusReport {
            apps: vec![
                AppCounts {
                    app: "a".into(),
                    pending: 2,
                    due: 1,
                    retrying: 1,
                    sent: 5,
                    failed: 1,
                    expired: 0,
                },
                AppCounts {
                    app: "b".into(),
                    pending: 1,
                    due: 1,
                    sent: 2,
                    ..AppCounts::default()
                },
            ],
            oldest_due: Some(OldestDue {
                id: 7,
                app: "a".into(),
                attempts: 2,
                overdue: Duration::MAX,
            }),
            next_scheduled: Some(Duration::from_millis(1500)),
            never_due: 0,
            awake_for: None,
            errors: vec![],
            unregistered: vec![],
            newest_unregistered: vec![UnregisteredToken {
                app: "a".into(),
                device_token: "feedface".repeat(8),
                ago: Duration::from_secs(60),
            }],
            long_batches: 0,
            longest_batch: None,
            long_batch_after: LONG_BATCH,
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let v = report.to_json(false, at);
        assert_eq!(v["read_at"], "2027-01-15T08:00:00.000Z");
        assert_eq!(
            v["apps"][1],
            json!({"app": "b", "pending": 1, "due": 1, "retrying": 0, "sent": 2, "failed": 0, "expired": 0})
        );
        assert_eq!(
            v["totals"],
            json!({"pending": 3, "due": 2, "retrying": 1, "sent": 7, "failed": 1, "expired": 0})
        );
        assert_eq!(
            v["oldest_due"],
            json!({"id": 7, "app": "a", "attempts": 2, "overdue_seconds": null})
        );
        assert_eq!(v["next_scheduled_in_seconds"], json!(1.5));
        assert_eq!(v["awake"], json!(false));
        assert_eq!(v["awake_for_seconds"], Value::Null);
        assert_eq!(v["long_batches"]["open_longer_than_seconds"], json!(60.0));
        assert_eq!(v["newest_unregistered"][0]["device_token"], "feedface");
        let whole = report.to_json(true, at);
        assert_eq!(
            whole["newest_unregistered"][0]["device_token"],
            json!("feedface".repeat(8))
        );
    }
}
