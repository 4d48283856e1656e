//! What the Web Push emulator was asked and answered: one [`WebPushRecord`] per request
//! (a push, or a subscription made over HTTP), handed out by the crate's recorder
//! (subscribers, history, the `--record` file) like the other modes' records.

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Serialize, Serializer};

/// One request and its answer; one JSON line in the record file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebPushRecord {
    #[serde(serialize_with = "crate::record::rfc3339")]
    pub at: SystemTime,
    /// The connection it came on (numbered from 1 in accept order).
    pub connection: u64,
    /// `"1.1"` or `"2"`.
    pub http_version: &'static str,
    pub method: String,
    pub path: String,
    /// The id in `/push/<id>`, or of the subscription `POST /subscribe` made.
    pub subscription: Option<String>,
    pub status: u16,
    /// Why it was refused, as the answer says.
    pub problem: Option<String>,
    pub ttl: Option<u64>,
    pub urgency: Option<String>,
    pub topic: Option<String>,
    /// The VAPID JWT's `sub`, once the credential verified.
    pub vapid_subject: Option<String>,
    /// The VAPID `k`, base64url, once the credential verified.
    pub vapid_key: Option<String>,
    /// The body's length as received (bodies over the limit are not read to the end:
    /// then the limit plus one).
    pub body_len: usize,
    /// The decrypted message; serialized base64url.
    #[serde(serialize_with = "base64url")]
    pub plaintext: Option<Vec<u8>>,
    /// The decrypted message, when it is UTF-8.
    pub text: Option<String>,
    /// Accepted pushes: the `Location` answered (`https://.../message/<uuid>`).
    pub location: Option<String>,
    /// The `Retry-After` answered, in seconds.
    pub retry_after: Option<u64>,
}

impl WebPushRecord {
    pub(crate) fn new(
        connection: u64,
        http_version: &'static str,
        method: &str,
        path: &str,
    ) -> Self {
        WebPushRecord {
            at: SystemTime::now(),
            connection,
            http_version,
            method: method.to_owned(),
            path: path.to_owned(),
            subscription: None,
            status: 0,
            problem: None,
            ttl: None,
            urgency: None,
            topic: None,
            vapid_subject: None,
            vapid_key: None,
            body_len: 0,
            plaintext: None,
            text: None,
            location: None,
            retry_after: None,
        }
    }

    /// The decrypted message as JSON, if it is JSON.
    pub fn plaintext_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(self.plaintext.as_deref()?).ok()
    }
}

fn base64url<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => s.serialize_str(&URL_SAFE_NO_PAD.encode(bytes)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_the_plaintext_both_ways() {
        let mut record = WebPushRecord::new(1, "2", "POST", "/push/ab");
        record.plaintext = Some(b"{\"a\":1}".to_vec());
        record.text = Some("{\"a\":1}".into());
        let line = serde_json::to_value(&record).unwrap();
        assert_eq!(line["plaintext"], "eyJhIjoxfQ");
        assert_eq!(line["text"], "{\"a\":1}");
        assert_eq!(line["http_version"], "2");
        assert_eq!(record.plaintext_json().unwrap()["a"], 1);
        let empty = serde_json::to_value(WebPushRecord::new(1, "1.1", "POST", "/")).unwrap();
        assert!(empty["plaintext"].is_null());
    }
}
