//! What the channel management API and the broadcast endpoint answer: `:status`,
//! `apns-request-id` (the request's, else a new UUID) on every answer, the call's own
//! headers (`apns-channel-id`, `apns-unique-id`), and a JSON body with
//! `content-type: application/json` for errors (`{"reason": ...}`) and reads.

use bytes::Bytes;
use h2::server::SendResponse;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::answer::Answer;
use crate::validate::{self, Rejection};

pub(crate) const APNS_REQUEST_ID: HeaderName = HeaderName::from_static("apns-request-id");
pub(crate) const APNS_CHANNEL_ID: HeaderName = HeaderName::from_static("apns-channel-id");
pub(crate) const APNS_UNIQUE_ID: HeaderName = HeaderName::from_static("apns-unique-id");

/// One answer, before `apns-request-id` is added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub status: u16,
    /// For records and logs; `None` on success.
    pub reason: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// JSON, sent with `content-type: application/json`.
    pub body: Option<Bytes>,
}

impl Reply {
    /// A success without a body.
    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            reason: None,
            headers: Vec::new(),
            body: None,
        }
    }

    /// A success with a JSON body.
    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply {
            body: Some(Bytes::from(body.to_string())),
            ..Reply::empty(status)
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// An error, or a scripted answer (a scripted 410 keeps its timestamp).
    pub fn answer(answer: &Answer) -> Reply {
        Reply {
            status: answer.status,
            reason: answer.reason.as_deref().map(str::to_owned),
            headers: Vec::new(),
            body: answer.body(),
        }
    }

    pub fn rejection(rejection: Rejection) -> Reply {
        Reply::answer(&Answer::error(rejection.status, rejection.reason))
    }

    /// Sends it with `request_id` as `apns-request-id`.
    pub fn send(
        &self,
        respond: &mut SendResponse<Bytes>,
        request_id: HeaderValue,
    ) -> Result<(), h2::Error> {
        let mut head = Response::new(());
        *head.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = head.headers_mut();
        headers.insert(APNS_REQUEST_ID, request_id);
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        match &self.body {
            None => {
                respond.send_response(head, true)?;
            }
            Some(body) => {
                head.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                respond
                    .send_response(head, false)?
                    .send_data(body.clone(), true)?;
            }
        }
        Ok(())
    }
}

/// The request's `apns-request-id` if it is a UUID (answers echo it), else a new one.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(APNS_REQUEST_ID)
        .filter(|v| validate::is_canonical_uuid(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_uuid)
}

/// A random (v4) UUID, lower case.
pub(crate) fn new_uuid() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// `apns-request-id`, when present, must be a UUID (A1, A2: "must be encoded as a UUID
/// string"). Apple names no reason for one that is not; the emulator answers 400
/// `BadMessageId`, the reason of the other request id, `apns-id`.
pub(crate) fn check_request_id(headers: &HeaderMap) -> Result<(), Rejection> {
    match headers.get(APNS_REQUEST_ID) {
        Some(v) if !validate::is_canonical_uuid(v.as_bytes()) => Err(Rejection {
            status: 400,
            reason: crate::reason::BAD_MESSAGE_ID,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut headers = HeaderMap::new();
        let made = request_id(&headers);
        assert!(validate::is_canonical_uuid(made.as_bytes()));
        assert!(check_request_id(&headers).is_ok());
        let id = "123e4567-e89b-12d3-a456-4266554400a0";
        headers.insert(APNS_REQUEST_ID, HeaderValue::from_static(id));
        assert_eq!(request_id(&headers), id);
        headers.insert(APNS_REQUEST_ID, HeaderValue::from_static("nope"));
        assert_ne!(request_id(&headers), "nope");
        assert_eq!(
            check_request_id(&headers).unwrap_err().reason,
            "BadMessageId"
        );
    }

    #[test]
    fn errors_carry_a_reason() {
        let reply = Reply::rejection(Rejection {
            status: 400,
            reason: "BadChannelId",
        });
        assert_eq!(reply.body.unwrap(), r#"{"reason":"BadChannelId"}"#);
        let gone = Reply::answer(&Answer::custom(410, "Unregistered", 7));
        assert_eq!(gone.reason.as_deref(), Some("Unregistered"));
        assert!(Reply::empty(204).body.is_none());
    }
}
