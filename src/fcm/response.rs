//! What an answer of FCM's `messages:send` means for the row, from the HTTP status,
//! Google's error body (`google.rpc.Status`) and its `FcmError` detail, as Google
//! documents them. Pure: the transport reads the answer, this decides.

use std::time::Duration;

use serde::Deserialize;

use crate::service::Scope;

/// FCM's answer, as the connection read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After`, in seconds or as an HTTP-date (see [`crate::http2::retry_after`]).
    pub retry_after: Option<Duration>,
    pub body: bytes::Bytes,
}

/// What the answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Accepted; FCM's name for the message (`projects/P/messages/ID`).
    Sent { name: Option<String> },
    /// The token is no longer valid: the row fails, the token is recorded.
    Unregistered { reason: String },
    /// The message is refused for good.
    Rejected { reason: String },
    /// FCM throttles: the message's target (`QUOTA_EXCEEDED`, `RESOURCE_EXHAUSTED`, 429,
    /// or a 503 without `Retry-After`: the row retries, unless target after target is
    /// throttled), or the app (`Scope::App`): FCM overloaded (`UNAVAILABLE`, 503) and saying for
    /// how long (`after`, its `Retry-After`).
    Throttled {
        reason: String,
        after: Option<Duration>,
        scope: Scope,
    },
    /// Try again later (at `after` when FCM said so).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The access token is not accepted (any more): renew it and send again.
    RenewToken { reason: String },
    /// The app cannot send at all (permission, project, third-party credentials): it
    /// backs off and probes, its rows wait.
    Credentials { reason: String },
}

#[derive(Deserialize)]
struct Success {
    name: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Status,
}

/// `google.rpc.Status`.
#[derive(Deserialize)]
struct Status {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    details: Vec<Detail>,
}

#[derive(Deserialize)]
struct Detail {
    #[serde(rename = "@type")]
    kind: Option<String>,
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
}

/// FCM's error codes (`FcmError.errorCode`) and the `google.rpc` statuses its answers
/// carry: the words a row's `last_error` may start with, and the only FCM words that
/// become metrics labels.
pub const KNOWN_CODES: [&str; 12] = [
    "UNREGISTERED",
    "INVALID_ARGUMENT",
    "SENDER_ID_MISMATCH",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
    "UNSPECIFIED_ERROR",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
];

const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

impl Answer {
    pub fn verdict(&self) -> Verdict {
        if self.status == 200 {
            let name = serde_json::from_slice::<Success>(&self.body)
                .ok()
                .and_then(|s| s.name);
            return Verdict::Sent { name };
        }
        let parsed: Option<Status> = serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error);
        let Some(status) = parsed else {
            // Not Google's error format (a proxy, a load balancer): kept verbatim.
            let text = String::from_utf8_lossy(&self.body[..self.body.len().min(500)]);
            let reason = match text.trim() {
                "" => format!("HTTP {}", self.status),
                text => format!("HTTP {}: {text}", self.status),
            };
            return self.by_http_status(reason);
        };
        let fcm_code = status
            .details
            .iter()
            .find(|d| d.kind.as_deref() == Some(FCM_ERROR))
            .and_then(|d| d.error_code.clone());
        let code = fcm_code
            .clone()
            .or(status.status.clone())
            .unwrap_or_else(|| format!("HTTP {}", self.status));
        let reason = match &status.message {
            Some(m) if !m.is_empty() => format!("{code}: {m}"),
            _ => code.clone(),
        };
        let after = self.retry_after;
        // A quota is the target's (the row retries, unless target after target meets it);
        // FCM overloaded is the app's when it says for how long.
        let quota = |reason| Verdict::Throttled {
            reason,
            after,
            scope: Scope::Target,
        };
        let overloaded = |reason| Verdict::Throttled {
            reason,
            after,
            scope: match after {
                Some(_) => Scope::App,
                None => Scope::Target,
            },
        };
        match (fcm_code.as_deref(), status.status.as_deref()) {
            (Some("UNREGISTERED"), _) => Verdict::Unregistered { reason },
            (Some("INVALID_ARGUMENT" | "SENDER_ID_MISMATCH"), _) => Verdict::Rejected { reason },
            (Some("QUOTA_EXCEEDED"), _) => quota(reason),
            (Some("UNAVAILABLE"), _) => overloaded(reason),
            (Some("INTERNAL"), _) => Verdict::Retry { reason, after },
            // About the row's target, not the app: the project's APNs key (an iOS target) or
            // web push credentials (a browser) are missing or invalid at Firebase. Its
            // Android rows go on; every such row would get the same answer until someone
            // uploads them, so it fails now, saying where.
            (Some("THIRD_PARTY_AUTH_ERROR"), _) => Verdict::Rejected {
                reason: format!("{reason} ({THIRD_PARTY_AUTH_HINT})"),
            },
            (_, Some("UNAUTHENTICATED")) => Verdict::RenewToken { reason },
            (_, Some("PERMISSION_DENIED")) => Verdict::Credentials { reason },
            // Without an FcmError a 404 is the project or the URL, not the token.
            (None, Some("NOT_FOUND")) => Verdict::Credentials { reason },
            (_, Some("RESOURCE_EXHAUSTED")) => quota(reason),
            (_, Some("UNAVAILABLE")) => overloaded(reason),
            (_, Some("INTERNAL")) => Verdict::Retry { reason, after },
            (_, Some("INVALID_ARGUMENT")) => Verdict::Rejected { reason },
            // UNSPECIFIED_ERROR and anything new: the HTTP status decides.
            _ => self.by_http_status(reason),
        }
    }

    fn by_http_status(&self, reason: String) -> Verdict {
        match self.status {
            401 => Verdict::RenewToken { reason },
            403 => Verdict::Credentials { reason },
            429 | 503 => Verdict::Throttled {
                reason,
                after: self.retry_after,
                scope: match self.status == 503 && self.retry_after.is_some() {
                    true => Scope::App,
                    false => Scope::Target,
                },
            },
            408 | 500.. => Verdict::Retry {
                reason,
                after: self.retry_after,
            },
            _ => Verdict::Rejected { reason },
        }
    }
}

/// What a `THIRD_PARTY_AUTH_ERROR` row's `last_error` adds: where the fix is.
pub const THIRD_PARTY_AUTH_HINT: &str = "FCM could not use this project's credentials for \
    the device's own push service: upload the APNs authentication key (iOS and macOS \
    targets) or check the web push certificates in the Firebase console, Project \
    settings > Cloud Messaging";

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn google(code: u16, status: &str, fcm: Option<&str>, message: &str) -> String {
        let details = match fcm {
            Some(e) => format!(r#"[{{"@type": "{FCM_ERROR}", "errorCode": "{e}"}}]"#),
            None => "[]".into(),
        };
        format!(
            r#"{{"error": {{"code": {code}, "message": "{message}", "status": "{status}", "details": {details}}}}}"#
        )
    }

    #[test]
    fn success_keeps_the_message_name() {
        assert_eq!(
            answer(
                200,
                r#"{"name": "projects/p/messages/0:1500415314455276%31bd1c96"}"#
            )
            .verdict(),
            Verdict::Sent {
                name: Some("projects/p/messages/0:1500415314455276%31bd1c96".into())
            }
        );
        assert_eq!(answer(200, "").verdict(), Verdict::Sent { name: None });
    }

    #[test]
    fn every_fcm_error_code_has_its_verdict() {
        let rejected = |r: &str| Verdict::Rejected { reason: r.into() };
        let retry = |r: &str| Verdict::Retry {
            reason: r.into(),
            after: None,
        };
        let throttled = |r: &str, scope| Verdict::Throttled {
            reason: r.into(),
            after: None,
            scope,
        };
        for (status, google_status, fcm, expected) in [
            (
                404,
                "NOT_FOUND",
                Some("UNREGISTERED"),
                Verdict::Unregistered {
                    reason: "UNREGISTERED: gone".into(),
                },
            ),
            (
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                rejected("INVALID_ARGUMENT: gone"),
            ),
            (
                403,
                "PERMISSION_DENIED",
                Some("SENDER_ID_MISMATCH"),
                rejected("SENDER_ID_MISMATCH: gone"),
            ),
            (
                429,
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
                throttled("QUOTA_EXCEEDED: gone", Scope::Target),
            ),
            (
                503,
                "UNAVAILABLE",
                Some("UNAVAILABLE"),
                throttled("UNAVAILABLE: gone", Scope::Target),
            ),
            (
                503,
                "UNAVAILABLE",
                None,
                throttled("UNAVAILABLE: gone", Scope::Target),
            ),
            (
                429,
                "RESOURCE_EXHAUSTED",
                None,
                throttled("RESOURCE_EXHAUSTED: gone", Scope::Target),
            ),
            (500, "INTERNAL", Some("INTERNAL"), retry("INTERNAL: gone")),
            (
                401,
                "UNAUTHENTICATED",
                Some("THIRD_PARTY_AUTH_ERROR"),
                Verdict::Rejected {
                    reason: format!("THIRD_PARTY_AUTH_ERROR: gone ({THIRD_PARTY_AUTH_HINT})"),
                },
            ),
            (
                401,
                "UNAUTHENTICATED",
                None,
                Verdict::RenewToken {
                    reason: "UNAUTHENTICATED: gone".into(),
                },
            ),
            (
                403,
                "PERMISSION_DENIED",
                None,
                Verdict::Credentials {
                    reason: "PERMISSION_DENIED: gone".into(),
                },
            ),
            (
                404,
                "NOT_FOUND",
                None,
                Verdict::Credentials {
                    reason: "NOT_FOUND: gone".into(),
                },
            ),
            (
                400,
                "INVALID_ARGUMENT",
                Some("UNSPECIFIED_ERROR"),
                rejected("UNSPECIFIED_ERROR: gone"),
            ),
            (
                500,
                "INTERNAL",
                Some("UNSPECIFIED_ERROR"),
                retry("UNSPECIFIED_ERROR: gone"),
            ),
            (
                409,
                "ABORTED",
                Some("SOMETHING_NEW"),
                rejected("SOMETHING_NEW: gone"),
            ),
            (502, "BAD_GATEWAY_ISH", None, retry("BAD_GATEWAY_ISH: gone")),
        ] {
            let a = answer(status, &google(status, google_status, fcm, "gone"));
            assert_eq!(a.verdict(), expected, "{status} {google_status} {fcm:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_and_foreign_bodies_kept_verbatim() {
        let mut a = answer(
            429,
            &google(
                429,
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
                "slow down",
            ),
        );
        a.retry_after = crate::http2::retry_after(" 30 ", std::time::SystemTime::now());
        assert_eq!(
            a.verdict(),
            Verdict::Throttled {
                reason: "QUOTA_EXCEEDED: slow down".into(),
                after: Some(Duration::from_secs(30)),
                scope: Scope::Target,
            }
        );
        let mut overloaded = answer(503, "");
        assert_eq!(
            overloaded.verdict(),
            Verdict::Throttled {
                reason: "HTTP 503".into(),
                after: None,
                scope: Scope::Target,
            },
            "without Retry-After: one row's, unless row after row"
        );
        overloaded.retry_after = Some(Duration::from_secs(20));
        assert_eq!(
            overloaded.verdict(),
            Verdict::Throttled {
                reason: "HTTP 503".into(),
                after: Some(Duration::from_secs(20)),
                scope: Scope::App,
            }
        );
        assert_eq!(
            answer(502, "<html>Bad Gateway</html>").verdict(),
            Verdict::Retry {
                reason: "HTTP 502: <html>Bad Gateway</html>".into(),
                after: None
            }
        );
        assert_eq!(
            answer(418, "I'm a teapot").verdict(),
            Verdict::Rejected {
                reason: "HTTP 418: I'm a teapot".into()
            }
        );
        assert_eq!(
            answer(401, "").verdict(),
            Verdict::RenewToken {
                reason: "HTTP 401".into()
            }
        );
    }
}
