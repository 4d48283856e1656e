//! One request to the Web Push emulator, over HTTP/1.1 or HTTP/2 alike: route by path
//! (`POST /push/<id>`, `POST /subscribe`), read the body, decide the answer, wait out the
//! latency, answer, count and record.
//!
//! A push is checked in this order, the first problem answered: the subscription (404
//! unknown, 410 gone), the VAPID credential (401; 403 for a key other than the one the
//! subscription is bound to), `TTL`, `Urgency` and `Topic` (400), `Content-Encoding`
//! (415), the body's size (413 over 4096 bytes), its decryption (400), then what the
//! faults say (scripted answers, random errors). Success is 201 Created with the message's
//! `Location`.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;

use super::headers::{self, MAX_TTL_SECS};
use super::record::WebPushRecord;
use super::subscription::{Lookup, Subscription};
use super::{vapid, Shared, WebPushScript, ALL};
use crate::stats::Counters;

/// RFC 8030 §7.2: a push service must accept payloads of at least 4096 bytes (RFC 8291
/// §4 sizes the encrypted body to it); larger ones are refused 413, as the browsers'
/// services do.
pub const MAX_BODY: usize = 4096;
/// Bodies of `POST /subscribe` are tiny.
const MAX_SUBSCRIBE_BODY: usize = 4096;

/// What the emulator answers, and what the record says of it.
struct Reply {
    status: u16,
    body: Bytes,
    problem: Option<String>,
    location: Option<String>,
    ttl: Option<u64>,
    retry_after: Option<u64>,
    www_authenticate: bool,
    allow: bool,
}

impl Reply {
    fn created(location: String, ttl: u64) -> Reply {
        Reply {
            status: 201,
            body: Bytes::new(),
            problem: None,
            location: Some(location),
            ttl: Some(ttl.min(MAX_TTL_SECS)),
            retry_after: None,
            www_authenticate: false,
            allow: false,
        }
    }

    /// An error: `{"code": 404, "error": "Not Found", "message": "..."}`.
    fn error(status: u16, problem: impl Into<String>) -> Reply {
        let problem = problem.into();
        let reason = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let body = json!({"code": status, "error": reason, "message": problem});
        Reply {
            status,
            body: Bytes::from(body.to_string()),
            problem: Some(problem),
            location: None,
            ttl: None,
            retry_after: None,
            www_authenticate: false,
            allow: false,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body.clone()));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        if !self.body.is_empty() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(location) = self.location.as_deref().and_then(|l| l.parse().ok()) {
            headers.insert(LOCATION, location);
        }
        if let Some(ttl) = self.ttl {
            headers.insert("ttl", HeaderValue::from(ttl));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.www_authenticate {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("vapid"));
        }
        if self.allow {
            headers.insert(ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// The body as read: whole, or more than the limit (not read further).
enum Body {
    Whole(Bytes),
    TooLarge,
}

/// Counts the request as abandoned if its future is dropped before it answers (the
/// client reset the stream, or the connection died).
struct Abandoned<'a> {
    counters: &'a Counters,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            Counters::bump(&self.counters.streams_abandoned);
        }
    }
}

/// Answers one request (hyper's service; never fails).
pub(crate) async fn handle(
    shared: std::sync::Arc<Shared>,
    connection: u64,
    request: http::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read when the request starts: a latency change applies to requests arriving later.
    let latency = shared.faults.latency();
    let _in_flight = shared.counters.request_started();
    let mut abandoned = Abandoned {
        counters: &shared.counters,
        armed: true,
    };
    let http_version = match request.version() {
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    let (head, body) = request.into_parts();
    let limit = if head.uri.path() == "/subscribe" {
        MAX_SUBSCRIBE_BODY
    } else {
        MAX_BODY
    };
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => Body::Whole(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Body::TooLarge,
        // The client went away mid-body; the guard counts it.
        Err(_) => return Ok(Reply::error(400, "the request body was cut off").into_response()),
    };
    let mut record = WebPushRecord::new(
        connection,
        http_version,
        head.method.as_str(),
        head.uri.path(),
    );
    record.body_len = match &body {
        Body::Whole(bytes) => bytes.len(),
        Body::TooLarge => limit + 1,
    };
    let reply = route(&shared, &head, &body, &mut record);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    abandoned.armed = false;
    shared.counters.answered(reply.status);
    if shared.recorder.wanted() {
        record.status = reply.status;
        record.problem = reply.problem.clone();
        record.location = reply.location.clone();
        record.retry_after = reply.retry_after;
        shared.recorder.record(record);
    }
    Ok(reply.into_response())
}

fn route(shared: &Shared, head: &Parts, body: &Body, record: &mut WebPushRecord) -> Reply {
    let path = head.uri.path();
    if path == "/subscribe" {
        if head.method != Method::POST {
            return not_allowed(&head.method);
        }
        return subscribe(shared, body, record);
    }
    match push_id(path) {
        Some(id) if head.method == Method::POST => {
            record.subscription = Some(id.to_owned());
            push(shared, &head.headers, body, id, record)
        }
        Some(_) => not_allowed(&head.method),
        None => Reply::error(404, format!("no such resource: {path}")),
    }
}

fn not_allowed(method: &Method) -> Reply {
    let mut reply = Reply::error(
        405,
        format!("{method} is not allowed here; push resources take POST"),
    );
    reply.allow = true;
    reply
}

/// The id of `/push/<id>`.
pub(crate) fn push_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/push/")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// `POST /subscribe`: an empty body, or `{"applicationServerKey": "<base64url>"}`.
fn subscribe(shared: &Shared, body: &Body, record: &mut WebPushRecord) -> Reply {
    let Body::Whole(bytes) = body else {
        return Reply::error(413, "the subscribe request's body is too large");
    };
    let key = match application_server_key(bytes) {
        Ok(key) => key,
        Err(problem) => return Reply::error(400, problem),
    };
    match shared.subscribe(key.as_deref()) {
        Ok(subscription) => {
            record.subscription = Some(subscription.id.clone());
            Reply {
                status: 201,
                body: Bytes::from(subscription.to_json()),
                problem: None,
                location: Some(subscription.endpoint.clone()),
                ttl: None,
                retry_after: None,
                www_authenticate: false,
                allow: false,
            }
        }
        Err(error) => Reply::error(400, format!("{error:#}")),
    }
}

/// The `applicationServerKey` of a subscribe request's body, if any.
pub(crate) fn application_server_key(body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not JSON ({e}); send {{\"applicationServerKey\": \"<base64url>\"}} or nothing"))?;
    let Some(object) = json.as_object() else {
        return Err("the body is not a JSON object".to_owned());
    };
    match object.get("applicationServerKey") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(key)) => vapid::b64(key)
            .map(Some)
            .ok_or_else(|| "applicationServerKey is not base64url".to_owned()),
        Some(_) => Err("applicationServerKey is not a string".to_owned()),
    }
}

fn header(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

fn push(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Body,
    id: &str,
    record: &mut WebPushRecord,
) -> Reply {
    let subscription = match shared.subscriptions.lookup(id) {
        Lookup::Active(s) => s,
        Lookup::Gone => {
            return Reply::error(
                410,
                format!("the subscription {id} has expired or was unsubscribed"),
            )
        }
        Lookup::Unknown => return Reply::error(404, format!("no subscription {id}")),
    };
    let verified = match vapid::check(header(headers, AUTHORIZATION), &shared.origin, unix_now()) {
        Ok(verified) => verified,
        Err(error) => {
            let mut reply = Reply::error(401, error.to_string());
            reply.www_authenticate = true;
            return reply;
        }
    };
    record.vapid_subject = Some(verified.sub.clone());
    record.vapid_key = Some(URL_SAFE_NO_PAD.encode(&verified.key));
    if let Some(bound) = &subscription.application_server_key {
        if *bound != verified.key {
            return Reply::error(
                403,
                "the VAPID key (k) is not the application server key this subscription was made with",
            );
        }
    }
    let checked = (|| {
        let ttl = headers::ttl(header(headers, "ttl"))?;
        record.ttl = Some(ttl);
        record.urgency =
            headers::urgency(header(headers, "urgency"))?.map(|u| u.as_str().to_owned());
        record.topic = headers::topic(header(headers, "topic"))?;
        Ok::<_, headers::HeaderError>(ttl)
    })();
    let ttl = match checked {
        Ok(ttl) => ttl,
        Err(error) => return Reply::error(400, error.to_string()),
    };
    let has_body = !matches!(body, Body::Whole(b) if b.is_empty());
    if let Err(error) = headers::content_encoding(header(headers, CONTENT_ENCODING), has_body) {
        let status = match error {
            headers::HeaderError::NoContentEncoding => 400,
            _ => 415,
        };
        return Reply::error(status, error.to_string());
    }
    let Body::Whole(bytes) = body else {
        return Reply::error(
            413,
            format!("the body is larger than {MAX_BODY} bytes, the most this service takes"),
        );
    };
    if !bytes.is_empty() {
        match open(&subscription, bytes) {
            Ok(plaintext) => {
                record.text = String::from_utf8(plaintext.clone()).ok();
                record.plaintext = Some(plaintext);
            }
            Err(problem) => return Reply::error(400, problem),
        }
    }
    let scripted = shared
        .faults
        .scripted_for(id)
        .or_else(|| shared.faults.scripted_for(ALL))
        .or_else(|| shared.faults.random_error());
    match scripted {
        Some(WebPushScript {
            status,
            retry_after,
        }) if status != 201 => {
            let mut reply = Reply::error(status, format!("scripted answer {status}"));
            reply.retry_after = retry_after.as_ref().map(Duration::as_secs);
            reply
        }
        _ => Reply::created(
            format!("{}/message/{}", shared.origin, new_message_id()),
            ttl,
        ),
    }
}

fn open(subscription: &Subscription, body: &[u8]) -> Result<Vec<u8>, String> {
    subscription
        .decrypt(body)
        .map(|opened| opened.plaintext)
        .map_err(|e| format!("cannot decrypt the message (RFC 8291, aes128gcm): {e}"))
}

fn new_message_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .hyphenated()
        .to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_paths() {
        assert_eq!(push_id("/push/abc"), Some("abc"));
        assert_eq!(push_id("/push/"), None);
        assert_eq!(push_id("/push/a/b"), None);
        assert_eq!(push_id("/message/abc"), None);
    }

    #[test]
    fn subscribe_bodies() {
        assert_eq!(application_server_key(b""), Ok(None));
        assert_eq!(application_server_key(b" \n"), Ok(None));
        assert_eq!(application_server_key(b"{}"), Ok(None));
        assert_eq!(
            application_server_key(br#"{"applicationServerKey":null}"#),
            Ok(None)
        );
        assert_eq!(
            application_server_key(br#"{"applicationServerKey":"AQID"}"#),
            Ok(Some(vec![1, 2, 3]))
        );
        assert!(application_server_key(br#"{"applicationServerKey":"!"}"#).is_err());
        assert!(application_server_key(br#"{"applicationServerKey":1}"#).is_err());
        assert!(application_server_key(b"[]").is_err());
        assert!(application_server_key(b"key").is_err());
    }

    #[test]
    fn errors_say_their_status_and_problem() {
        let reply = Reply::error(413, "too big");
        let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            json,
            json!({"code": 413, "error": "Payload Too Large", "message": "too big"})
        );
        let created = Reply::created("https://x/message/1".into(), u64::MAX).into_response();
        assert_eq!(created.status(), 201);
        assert_eq!(created.headers()["ttl"], MAX_TTL_SECS.to_string().as_str());
        assert_eq!(created.headers()[LOCATION], "https://x/message/1");
    }

    #[test]
    fn message_ids_are_uuids() {
        let id = new_message_id();
        assert_eq!(id.len(), 36);
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_ne!(id, new_message_id());
    }
}
