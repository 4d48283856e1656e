//! One stream: read the payload, decide the answer, wait out the latency, answer, count
//! and record. Runs inside its connection's task; nothing here blocks or takes a lock
//! across an await.

use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::request::Parts;
use http::HeaderValue;

use super::answer::Answer;
use super::record::Record;
use super::stats::Counters;
use super::validate::{self, Checked, Rejection};
use super::Shared;
use crate::push_type::MAX_PAYLOAD_VOIP;

/// Answers one request whose head was checked already; `None` if the client went away
/// first, else the status answered.
pub(crate) async fn handle(
    shared: &Shared,
    connection: u64,
    head: Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
    checked: Result<Checked, Rejection>,
) -> Option<u16> {
    // Read when the stream starts: a latency change applies to requests arriving later.
    let latency = shared.faults.latency();
    let _in_flight = shared.counters.request_started();
    // Enough to tell a payload too large for any push type.
    let limit = match &checked {
        Ok(c) => c.push_type.max_payload(),
        Err(_) => MAX_PAYLOAD_VOIP,
    } + 1;
    let Ok(payload) = read_payload(&mut body, limit).await else {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    };
    let answer = match checked {
        Err(rejection) => Answer::error(rejection.status, rejection.reason),
        Ok(checked) => match validate::check_payload(&checked, &payload) {
            Err(rejection) => Answer::error(rejection.status, rejection.reason),
            Ok(()) => {
                let token = validate::device_token(head.uri.path()).unwrap_or_default();
                shared.faults.answer_for(token).unwrap_or(Answer::OK)
            }
        },
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let apns_id = validate::request_apns_id(&head.headers)
        .cloned()
        .unwrap_or_else(new_apns_id);
    if send(&mut respond, &answer, apns_id.clone()).is_err() {
        Counters::bump(&shared.counters.streams_abandoned);
        return None;
    }
    shared.counters.answered(answer.status);
    if shared.recorder.wanted() {
        shared
            .recorder
            .record(record(connection, &head, &payload, &answer, &apns_id));
    }
    Some(answer.status)
}

/// The request body, up to `limit` bytes (the rest is not needed to answer). Usually a
/// single DATA frame, kept without copying.
pub(crate) async fn read_payload(body: &mut RecvStream, limit: usize) -> Result<Bytes, h2::Error> {
    let mut first = Bytes::new();
    let mut more: Option<BytesMut> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        match &mut more {
            None if first.is_empty() => first = chunk,
            None => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&chunk);
                more = Some(joined);
            }
            Some(joined) => joined.extend_from_slice(&chunk),
        }
        let len = more.as_ref().map_or(first.len(), BytesMut::len);
        if len >= limit {
            break;
        }
    }
    Ok(more.map_or(first, BytesMut::freeze))
}

fn send(
    respond: &mut SendResponse<Bytes>,
    answer: &Answer,
    apns_id: HeaderValue,
) -> Result<(), h2::Error> {
    let head = answer.head(apns_id);
    match answer.body() {
        None => {
            respond.send_response(head, true)?;
        }
        Some(body) => {
            respond.send_response(head, false)?.send_data(body, true)?;
        }
    }
    Ok(())
}

/// A random (v4) UUID, lower case, as APNs makes up when the request has no `apns-id`.
fn new_apns_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

fn record(
    connection: u64,
    head: &Parts,
    payload: &[u8],
    answer: &Answer,
    apns_id: &HeaderValue,
) -> Record {
    let header = |name| {
        head.headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    Record {
        at: SystemTime::now(),
        connection,
        apns_id: apns_id.to_str().unwrap_or_default().to_owned(),
        device_token: validate::device_token(head.uri.path())
            .unwrap_or_default()
            .to_owned(),
        topic: header(validate::APNS_TOPIC).map(str::to_owned),
        push_type: header(validate::APNS_PUSH_TYPE).map(str::to_owned),
        priority: header(validate::APNS_PRIORITY).and_then(|p| p.parse().ok()),
        expiration: header(validate::APNS_EXPIRATION).and_then(|e| e.parse().ok()),
        collapse_id: header(validate::APNS_COLLAPSE_ID).map(str::to_owned),
        // A copy: the received bytes may share a larger buffer.
        payload: Bytes::copy_from_slice(payload),
        status: answer.status,
        reason: answer.reason.as_deref().map(str::to_owned),
        channel_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_ids_are_canonical_and_distinct() {
        let a = new_apns_id();
        let b = new_apns_id();
        assert!(validate::is_canonical_uuid(a.as_bytes()));
        assert_ne!(a, b);
        assert_eq!(a.to_str().unwrap(), a.to_str().unwrap().to_lowercase());
    }
}
