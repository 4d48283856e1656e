//! What a push service's answer to a Web Push request means for the row, from its HTTP
//! status (RFC 8030, RFC 8292), the same for every push service:
//!
//! - 2xx (201 Created, as RFC 8030 says): sent; the `Location` (the push message's URL)
//!   is the message's id;
//! - 404, 410: the subscription is gone (expired, unsubscribed): the row fails, the
//!   token is recorded;
//! - 400 (malformed), 403 (the VAPID key is not the one the subscription was made
//!   with), 413 (payload too large): refused for good, with the service's words;
//! - 401: the VAPID authorization was refused: the app's credentials, not the row's;
//! - 429: throttled; 5xx and any other status: try again; both after `Retry-After`
//!   when the service gave one. As for FCM it is read unbounded here; `outcome` caps
//!   what a row waits.
//!
//! Push services' error bodies differ (Mozilla's JSON, Google's text, Apple's JSON
//! `reason`): the text is kept, on one line and at most [`MAX_DETAIL`] characters.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{LOCATION, RETRY_AFTER};
use http::HeaderMap;

/// The most characters of a service's body a reason keeps.
pub const MAX_DETAIL: usize = 200;

/// The push service's answer, as the connection read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// `Location`: the push message's URL, on success.
    pub location: Option<String>,
    /// `Retry-After`, in seconds or as an HTTP-date, read at the answer's time.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// What the answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Accepted; the push message's URL, the row's message id.
    Sent { location: Option<String> },
    /// The subscription is no longer valid: the row fails, the token is recorded.
    Unregistered(Gone),
    /// The message is refused for good: the row fails.
    Rejected(Refusal),
    /// The VAPID authorization is refused: the app's credentials (its key, its
    /// subject, or the clock), not this row's.
    Unauthorized { reason: String },
    /// The service throttles: try again later (at `after` when it said so).
    Throttled {
        reason: String,
        after: Option<Duration>,
    },
    /// Try again later (at `after` when the service said so).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

/// Why a subscription is gone. `Display` is the row's `last_error`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gone {
    /// 404 or 410.
    pub status: u16,
    /// The service's words, one line (empty when it gave none).
    pub detail: String,
}

impl fmt::Display for Gone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.status {
            410 => "the subscription is gone (the browser unsubscribed, or it expired)",
            _ => "the push service does not know the subscription (expired or removed)",
        };
        write!(f, "HTTP {}: {what}{}", self.status, suffix(&self.detail))
    }
}

/// Why a message is refused for good. `Display` is the row's `last_error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// 400: the request is malformed.
    BadRequest { detail: String },
    /// 403: the VAPID key is not the one the subscription was made with.
    KeyMismatch { detail: String },
    /// 413: the payload is too large.
    TooLarge { detail: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (status, what, detail) = match self {
            Refusal::BadRequest { detail } => (400, "the push service refused the request", detail),
            Refusal::KeyMismatch { detail } => (
                403,
                "the VAPID key does not match the one the subscription was made with",
                detail,
            ),
            Refusal::TooLarge { detail } => (
                413,
                "the push service refused the payload as too large",
                detail,
            ),
        };
        write!(f, "HTTP {status}: {what}{}", suffix(detail))
    }
}

impl Verdict {
    /// The row's `last_error`, for every verdict but `Sent`.
    pub fn reason(&self) -> Option<String> {
        match self {
            Verdict::Sent { .. } => None,
            Verdict::Unregistered(gone) => Some(gone.to_string()),
            Verdict::Rejected(refusal) => Some(refusal.to_string()),
            Verdict::Unauthorized { reason }
            | Verdict::Throttled { reason, .. }
            | Verdict::Retry { reason, .. } => Some(reason.clone()),
        }
    }
}

impl Answer {
    /// The answer from a response's status, headers and body, read at `now` (for a
    /// `Retry-After` date).
    pub fn from_http(status: u16, headers: &HeaderMap, body: Bytes, now: SystemTime) -> Answer {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        Answer {
            status,
            location: text(LOCATION).map(str::to_owned),
            retry_after: text(RETRY_AFTER).and_then(|v| crate::http2::retry_after(v, now)),
            body,
        }
    }

    pub fn verdict(&self) -> Verdict {
        let detail = detail(&self.body);
        let status = self.status;
        let after = self.retry_after;
        match status {
            200..=299 => Verdict::Sent {
                location: self.location.clone(),
            },
            404 | 410 => Verdict::Unregistered(Gone { status, detail }),
            400 => Verdict::Rejected(Refusal::BadRequest { detail }),
            403 => Verdict::Rejected(Refusal::KeyMismatch { detail }),
            413 => Verdict::Rejected(Refusal::TooLarge { detail }),
            401 => Verdict::Unauthorized {
                reason: format!(
                    "HTTP 401: the push service refused the VAPID authorization{}",
                    suffix(&detail)
                ),
            },
            429 => Verdict::Throttled {
                reason: format!("HTTP 429: the push service throttles{}", suffix(&detail)),
                after,
            },
            500..=599 => Verdict::Retry {
                reason: format!("HTTP {status}: the push service failed{}", suffix(&detail)),
                after,
            },
            _ => Verdict::Retry {
                reason: format!(
                    "HTTP {status}, unexpected from a push service{}",
                    suffix(&detail)
                ),
                after,
            },
        }
    }
}

/// `": detail"`, or nothing without one.
fn suffix(detail: &str) -> String {
    match detail {
        "" => String::new(),
        detail => format!(": {detail}"),
    }
}

/// A body as one line of at most [`MAX_DETAIL`] characters: whitespace and control
/// characters become single spaces, a longer text ends in `…`.
fn detail(body: &[u8]) -> String {
    // Four bytes a character at most: enough to fill MAX_DETAIL.
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * MAX_DETAIL + 4)]);
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let line = words.join(" ");
    match line.char_indices().nth(MAX_DETAIL) {
        Some((cut, _)) => format!("{}…", line[..cut].trim_end()),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            location: None,
            retry_after: None,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn every_status_has_its_verdict() {
        let mozilla = r#"{"code": 410, "errno": 106, "error": "Gone",
            "message": "Request did not validate Subscription is no longer valid"}"#;
        let one_line = r#"{"code": 410, "errno": 106, "error": "Gone", "message": "Request did not validate Subscription is no longer valid"}"#;
        let retry = |reason: &str| Verdict::Retry {
            reason: reason.into(),
            after: None,
        };
        for (status, body, expected, last_error) in [
            (
                201,
                "",
                Verdict::Sent { location: None },
                None,
            ),
            (
                404,
                "",
                Verdict::Unregistered(Gone { status: 404, detail: String::new() }),
                Some("HTTP 404: the push service does not know the subscription (expired or removed)".to_owned()),
            ),
            (
                410,
                mozilla,
                Verdict::Unregistered(Gone { status: 410, detail: one_line.into() }),
                Some(format!("HTTP 410: the subscription is gone (the browser unsubscribed, or it expired): {one_line}")),
            ),
            (
                400,
                "UnauthorizedRegistration\n",
                Verdict::Rejected(Refusal::BadRequest { detail: "UnauthorizedRegistration".into() }),
                Some("HTTP 400: the push service refused the request: UnauthorizedRegistration".to_owned()),
            ),
            (
                403,
                "the key in the authorization header does not correspond to the sender",
                Verdict::Rejected(Refusal::KeyMismatch {
                    detail: "the key in the authorization header does not correspond to the sender".into(),
                }),
                Some("HTTP 403: the VAPID key does not match the one the subscription was made with: the key in the authorization header does not correspond to the sender".to_owned()),
            ),
            (
                413,
                "",
                Verdict::Rejected(Refusal::TooLarge { detail: String::new() }),
                Some("HTTP 413: the push service refused the payload as too large".to_owned()),
            ),
            (
                401,
                r#"{"reason":"ExpiredJwtToken"}"#,
                Verdict::Unauthorized {
                    reason: r#"HTTP 401: the push service refused the VAPID authorization: {"reason":"ExpiredJwtToken"}"#.into(),
                },
                Some(r#"HTTP 401: the push service refused the VAPID authorization: {"reason":"ExpiredJwtToken"}"#.to_owned()),
            ),
            (
                429,
                "",
                Verdict::Throttled { reason: "HTTP 429: the push service throttles".into(), after: None },
                Some("HTTP 429: the push service throttles".to_owned()),
            ),
            (
                503,
                "<html>\r\n<b>Service Unavailable</b>\r\n</html>",
                retry("HTTP 503: the push service failed: <html> <b>Service Unavailable</b> </html>"),
                Some("HTTP 503: the push service failed: <html> <b>Service Unavailable</b> </html>".to_owned()),
            ),
            (
                500,
                "",
                retry("HTTP 500: the push service failed"),
                Some("HTTP 500: the push service failed".to_owned()),
            ),
            (
                408,
                "",
                retry("HTTP 408, unexpected from a push service"),
                Some("HTTP 408, unexpected from a push service".to_owned()),
            ),
            (
                301,
                "moved",
                retry("HTTP 301, unexpected from a push service: moved"),
                Some("HTTP 301, unexpected from a push service: moved".to_owned()),
            ),
        ] {
            let verdict = answer(status, body).verdict();
            assert_eq!(verdict, expected, "{status}");
            assert_eq!(verdict.reason(), last_error, "{status}");
        }
    }

    #[test]
    fn success_keeps_the_location_and_retry_after_is_honoured() {
        let now = httpdate::parse_http_date("Sun, 06 Dec 2026 01:00:00 GMT").unwrap();
        let mut headers = HeaderMap::new();
        let location = "https://push.example.net/message/qDIYHNcfAIPP_5tlJHYyi8";
        headers.insert(LOCATION, location.parse().unwrap());
        let sent = Answer::from_http(201, &headers, Bytes::new(), now);
        assert_eq!(
            sent.verdict(),
            Verdict::Sent {
                location: Some(location.into())
            }
        );
        assert_eq!(
            Answer::from_http(202, &HeaderMap::new(), Bytes::new(), now).verdict(),
            Verdict::Sent { location: None }
        );

        for (value, after) in [
            ("120", Some(Duration::from_secs(120))),
            (
                "Sun, 06 Dec 2026 01:02:30 GMT",
                Some(Duration::from_secs(150)),
            ),
            ("Sat, 05 Dec 2026 23:00:00 GMT", Some(Duration::ZERO)),
            ("soon", None),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            let throttled = Answer::from_http(429, &headers, Bytes::new(), now);
            assert_eq!(
                throttled.verdict(),
                Verdict::Throttled {
                    reason: "HTTP 429: the push service throttles".into(),
                    after
                },
                "{value}"
            );
            let failed = Answer::from_http(502, &headers, Bytes::new(), now);
            assert_eq!(
                failed.verdict(),
                Verdict::Retry {
                    reason: "HTTP 502: the push service failed".into(),
                    after
                },
                "{value}"
            );
        }
    }

    #[test]
    fn a_long_body_is_cut_to_one_line_of_200_characters() {
        let long = format!("{}\n{}", "é".repeat(150), "x".repeat(5000));
        let Verdict::Rejected(Refusal::BadRequest { detail }) = answer(400, &long).verdict() else {
            panic!("not a bad request");
        };
        assert_eq!(detail, format!("{} {}…", "é".repeat(150), "x".repeat(49)));
        assert_eq!(detail.chars().count(), MAX_DETAIL + 1);
        let binary = answer(400, "\u{0}\u{1}ok\u{7f}").verdict();
        assert_eq!(
            binary.reason().unwrap(),
            "HTTP 400: the push service refused the request: ok"
        );
    }
}
