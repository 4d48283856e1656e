//! One stream of the FCM emulator: route by path (`/token`, `messages:send`), read the
//! body, decide the answer, wait out the latency, answer, count and record. Runs inside
//! its connection's task.
//!
//! A send is checked in the order Google's front end does: the access token (401), the
//! project (403), the body (400), then what FCM knows of the target (scripted answers,
//! random errors, unregistered tokens). `validate_only` sends stop after the body.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::json;

use super::error::{CredentialProblem, ErrorCode, GoogleError, OauthError};
use super::message::{self, Target};
use super::oauth::{self, Refused};
use super::record::{FcmEndpoint, FcmRecord};
use super::{FcmScript, Shared};
use crate::stats::Counters;

/// Bodies larger than this are refused unread: no valid token request or message comes
/// near it.
const MAX_BODY: usize = 64 * 1024;
const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=UTF-8");

/// An answer and what the record says of it.
struct Reply {
    status: u16,
    body: Bytes,
    retry_after_secs: Option<u64>,
    www_authenticate: Option<&'static str>,
    /// Token responses must not be cached (RFC 6749 5.1).
    no_store: bool,
    error: Option<String>,
    fcm_error: Option<ErrorCode>,
    description: Option<String>,
    name: Option<String>,
}

impl Reply {
    fn ok(body: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            body: Bytes::from(body.to_string()),
            retry_after_secs: None,
            www_authenticate: None,
            no_store: false,
            error: None,
            fcm_error: None,
            description: None,
            name: None,
        }
    }

    fn google(error: GoogleError, retry_after_secs: u64) -> Reply {
        let www_authenticate = match error.credential {
            Some(CredentialProblem::Missing) => {
                Some(r#"Bearer realm="https://accounts.google.com/""#)
            }
            Some(CredentialProblem::Unknown | CredentialProblem::Expired) => {
                Some(r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#)
            }
            _ => None,
        };
        Reply {
            status: error.code,
            body: error.body(),
            retry_after_secs: (error.fcm_error == Some(ErrorCode::QuotaExceeded))
                .then_some(retry_after_secs),
            www_authenticate,
            no_store: false,
            error: Some(error.status.to_owned()),
            fcm_error: error.fcm_error,
            description: Some(error.message),
            name: None,
        }
    }

    fn oauth(error: OauthError) -> Reply {
        Reply {
            status: error.status,
            body: error.body(),
            retry_after_secs: None,
            www_authenticate: None,
            no_store: true,
            error: Some(error.error),
            fcm_error: None,
            description: Some(error.description),
            name: None,
        }
    }

    fn head(&self) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, JSON);
        if let Some(secs) = self.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.www_authenticate {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if self.no_store {
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        response
    }
}

/// Answers one request; `None` if the client went away first, else the status answered.
pub(crate) async fn handle(
    shared: &Shared,
    connection: u64,
    head: Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
) -> Option<u16> {
    // Read when the stream starts: a latency change applies to requests arriving later.
    let latency = shared.faults.latency();
    let _in_flight = shared.counters.request_started();
    let Ok(payload) = read_body(&mut body, MAX_BODY + 1).await else {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    };
    let path = head.uri.path().to_owned();
    let endpoint = if path == "/token" {
        FcmEndpoint::Token
    } else if send_project(&path).is_some() {
        FcmEndpoint::Send
    } else {
        FcmEndpoint::Other
    };
    let mut record = FcmRecord::new(connection, endpoint, &path);
    let reply = if head.method != Method::POST && endpoint != FcmEndpoint::Other {
        Reply::google(GoogleError::method_not_allowed(head.method.as_str()), 0)
    } else if payload.len() > MAX_BODY {
        Reply::google(
            GoogleError::invalid(
                format!("Request payload size exceeds the limit: {MAX_BODY} bytes."),
                None,
                false,
            ),
            0,
        )
    } else {
        match endpoint {
            FcmEndpoint::Token => token(shared, &payload, &mut record),
            FcmEndpoint::Send => send(shared, &head, &payload, &mut record),
            FcmEndpoint::Other => Reply::google(GoogleError::no_such_path(&path), 0),
        }
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let sent = respond
        .send_response(reply.head(), false)
        .and_then(|mut stream| stream.send_data(reply.body.clone(), true));
    if sent.is_err() {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    }
    shared.counters.answered(reply.status);
    if shared.recorder.wanted() {
        record.status = reply.status;
        record.error = reply.error;
        record.fcm_error = reply.fcm_error.map(|c| c.as_str().to_owned());
        record.description = reply.description;
        record.name = reply.name;
        shared.recorder.record(record);
    }
    Some(reply.status)
}

/// The project of `/v1/projects/{project}/messages:send`.
fn send_project(path: &str) -> Option<&str> {
    let project = path
        .strip_prefix("/v1/projects/")?
        .strip_suffix("/messages:send")?;
    (!project.is_empty() && !project.contains('/')).then_some(project)
}

fn token(shared: &Shared, form: &[u8], record: &mut FcmRecord) -> Reply {
    let forced = shared
        .grant_refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front();
    if let Some(refusal) = forced {
        return Reply::oauth(refusal);
    }
    match oauth::check_assertion(&shared.accounts, form, unix_now()) {
        Err(refusal) => Reply::oauth(refusal),
        Ok(account) => {
            let (access_token, expires_in) = shared.tokens.issue(account);
            record.client_email = Some(shared.accounts[account].client_email.clone());
            let mut reply = Reply::ok(json!({
                "access_token": access_token,
                "expires_in": expires_in,
                "token_type": "Bearer",
            }));
            reply.no_store = true;
            reply
        }
    }
}

fn send(shared: &Shared, head: &Parts, body: &[u8], record: &mut FcmRecord) -> Reply {
    let retry_after = shared.retry_after.as_secs();
    let project = send_project(head.uri.path()).unwrap_or_default();
    record.project = Some(project.to_owned());
    let authorization = head
        .headers
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default());
    let account = match authorization.map(|a| shared.tokens.check(a)) {
        None => Err(CredentialProblem::Missing),
        Some(Err(Refused::Unknown)) => Err(CredentialProblem::Unknown),
        Some(Err(Refused::Expired)) => Err(CredentialProblem::Expired),
        Some(Ok(account)) => Ok(&shared.accounts[account]),
    };
    let account = match account {
        Ok(account) => account,
        Err(problem) => return Reply::google(GoogleError::unauthenticated(problem), retry_after),
    };
    record.client_email = Some(account.client_email.clone());
    if account.project_id != project {
        return Reply::google(GoogleError::permission_denied(project), retry_after);
    }
    let request = match message::check_send(body) {
        Ok(request) => request,
        Err(invalid) => {
            return Reply::google(
                GoogleError::invalid(invalid.message, invalid.field, invalid.fcm),
                retry_after,
            )
        }
    };
    let target = request.target.as_str().to_owned();
    match &request.target {
        Target::Token(t) => record.token = Some(t.clone()),
        Target::Topic(t) => record.topic = Some(t.clone()),
        Target::Condition(c) => record.condition = Some(c.clone()),
    }
    record.message = Some(request.message);
    record.validate_only = request.validate_only;
    if request.validate_only {
        return named(format!("projects/{project}/messages/fake_message_id"));
    }
    match shared.faults.answer_for(&target) {
        None | Some(FcmScript::Success) => {
            named(format!("projects/{project}/messages/{}", new_message_id()))
        }
        Some(FcmScript::Error(code)) => Reply::google(GoogleError::fcm(code), retry_after),
        Some(FcmScript::AccessTokenRefused) => Reply::google(
            GoogleError::unauthenticated(CredentialProblem::Expired),
            retry_after,
        ),
    }
}

fn named(name: String) -> Reply {
    let mut reply = Reply::ok(json!({ "name": name }));
    reply.name = Some(name);
    reply
}

/// FCM's message ids look like `0:1700000000123456%31bd1c9631bd1c96`.
fn new_message_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("0:{micros}%{:016x}", rand::random::<u64>())
}

/// The request body, up to `limit` bytes (the rest is not needed to answer).
async fn read_body(body: &mut RecvStream, limit: usize) -> Result<Bytes, h2::Error> {
    let mut out = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out.freeze())
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
    fn send_paths() {
        assert_eq!(send_project("/v1/projects/p-1/messages:send"), Some("p-1"));
        assert_eq!(send_project("/v1/projects//messages:send"), None);
        assert_eq!(send_project("/v1/projects/a/b/messages:send"), None);
        assert_eq!(send_project("/v1/projects/p/messages:sendAll"), None);
        assert_eq!(send_project("/token"), None);
    }

    #[test]
    fn message_ids_look_like_fcms() {
        let id = new_message_id();
        let (time, tail) = id.strip_prefix("0:").unwrap().split_once('%').unwrap();
        assert!(time.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(tail.len(), 16);
        assert_ne!(id, new_message_id());
    }
}
