//! What every push service over HTTP/2 (APNs, FCM) shares once a request is built: what
//! an exchange with the service came to ([`Exchanged`]), which the app's gate turns into the
//! row's [`Delivery`] (`AppGate::attempt`), and what a request that got no answer means
//! for its row ([`unanswered`]). The services' own rules (building a request, reading an
//! answer) stay in their folders.

use std::time::Duration;

use crate::http2::pool::PoolError;
use crate::service::app_gate::MIN_DEFER;
use crate::transport::Delivery;

/// What one exchange with the service came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Exchanged {
    /// An answer about the row: what it becomes.
    Row(Delivery),
    /// The service refused the app's credentials (or this side could not make them).
    /// `row_reason` is set when the refusal may be about the row instead (APNs's 403
    /// for a row naming its own topic): the row's `last_error` then.
    Refused {
        reason: String,
        row_reason: Option<String>,
    },
    /// The service throttles the row's target, or the app; `after` is its `Retry-After`.
    Throttled {
        reason: String,
        after: Option<Duration>,
        scope: Scope,
    },
    /// No connection to the service could be had: the app's, never the row's trouble.
    /// `after`: when its pool tries to connect again.
    Unreachable { reason: String, after: Duration },
}

/// Whom a throttling answer is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The device token (or registration token) the row is for: the row retries, unless
    /// target after target is throttled.
    Target,
    /// The app as a whole.
    App,
}

impl Exchanged {
    /// Credentials refused, never about the row.
    pub fn refused(reason: impl Into<String>) -> Exchanged {
        Exchanged::Refused {
            reason: reason.into(),
            row_reason: None,
        }
    }

    /// What a request to the app's one `service` ("APNs", "FCM") that got no answer
    /// from its pool comes to: the service unreachable when no connection could be had
    /// (the app pauses), else [`unanswered`]'s delivery for the row.
    pub fn unanswered(service: &str, error: PoolError) -> Exchanged {
        match error {
            PoolError::Unavailable {
                reason,
                retry_after,
            } => Exchanged::Unreachable {
                reason: format!("{service} is unreachable: {reason}"),
                after: retry_after,
            },
            e => Exchanged::Row(unanswered(service, e)),
        }
    }
}

/// What a request to `service` ("APNs", "FCM") that got no answer from its pool means
/// for the row: deferred without an attempt when it never left (the service unreachable,
/// no stream free), retried counting the attempt otherwise.
pub fn unanswered(service: &str, error: PoolError) -> Delivery {
    match error {
        PoolError::Unavailable {
            reason,
            retry_after,
        } => Delivery::Deferred {
            reason: format!("{service} is unreachable: {reason}"),
            after: retry_after.max(MIN_DEFER),
        },
        // It never left: no attempt, and the row comes back soon.
        PoolError::Busy(wait) => Delivery::Deferred {
            reason: format!(
                "{service} connections are busy: none free (no HTTP/2 stream, no HTTP/1.1 \
                 connection) within {wait:?}"
            ),
            after: MIN_DEFER,
        },
        e => Delivery::retry(e.to_string()),
    }
}
