//! An answer to one request, and its encoding as APNs sends it: `:status`, `apns-id`, and
//! for errors a JSON body `{"reason": ...}` (410 adds `"timestamp"`, ms since the epoch).

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// What the emulator answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: u16,
    /// `None` only for 200.
    pub reason: Option<Cow<'static, str>>,
    /// When the token stopped being valid: sent with 410 only.
    pub timestamp_ms: Option<u64>,
}

impl Answer {
    pub const OK: Answer = Answer {
        status: 200,
        reason: None,
        timestamp_ms: None,
    };

    pub fn error(status: u16, reason: &'static str) -> Answer {
        Answer {
            status,
            reason: Some(Cow::Borrowed(reason)),
            timestamp_ms: None,
        }
    }

    /// Any status and reason (scripted answers, reasons Apple may add later).
    pub fn custom(status: u16, reason: &str, timestamp_ms: u64) -> Answer {
        if status == 200 {
            return Answer::OK;
        }
        Answer {
            status,
            reason: Some(Cow::Owned(reason.to_owned())),
            timestamp_ms: (status == 410).then_some(timestamp_ms),
        }
    }

    /// The head of the response; `apns_id` is the request's, or a new one.
    pub fn head(&self, apns_id: HeaderValue) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(APNS_ID, apns_id);
        response
    }

    /// The JSON body of an error; `None` for a success (its body is empty).
    pub fn body(&self) -> Option<Bytes> {
        let reason = self.reason.as_deref()?;
        let body = match self.timestamp_ms {
            Some(ts) => serde_json::json!({ "reason": reason, "timestamp": ts }),
            None => serde_json::json!({ "reason": reason }),
        };
        Some(Bytes::from(body.to_string()))
    }
}

pub(crate) const APNS_ID: http::HeaderName = http::HeaderName::from_static("apns-id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(Answer::OK.body(), None);
        assert_eq!(
            Answer::error(400, "BadTopic").body().unwrap(),
            r#"{"reason":"BadTopic"}"#
        );
        let gone = Answer::custom(410, "Unregistered", 1_700_000_000_123);
        let body: serde_json::Value = serde_json::from_slice(&gone.body().unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"reason": "Unregistered", "timestamp": 1_700_000_000_123u64})
        );
        assert_eq!(
            Answer::custom(400, "A \"quoted\" one", 0).timestamp_ms,
            None
        );
        assert_eq!(Answer::custom(200, "ignored", 0), Answer::OK);
    }

    #[test]
    fn head_carries_status_and_id() {
        let head = Answer::error(413, "PayloadTooLarge").head(HeaderValue::from_static("x"));
        assert_eq!(head.status(), 413);
        assert_eq!(head.headers()["apns-id"], "x");
    }
}
