//! What the FCM emulator was asked and answered: one [`FcmRecord`] per request, to the
//! token endpoint or to `messages:send`, handed out by the crate's recorder (subscribers,
//! history, the `--record` file) like the APNs mode's records.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

/// Which endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FcmEndpoint {
    /// `POST /token`, the OAuth 2.0 token endpoint.
    Token,
    /// `POST /v1/projects/{project}/messages:send`.
    Send,
    /// Any other path (answered 404).
    Other,
}

/// One request and its answer; one JSON line in the record file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FcmRecord {
    #[serde(serialize_with = "crate::record::rfc3339")]
    pub at: SystemTime,
    /// The connection it came on (numbered from 1 in accept order).
    pub connection: u64,
    pub endpoint: FcmEndpoint,
    pub path: String,
    /// The service account: granted a token (token endpoint), or whose access token the
    /// send carried.
    pub client_email: Option<String>,
    /// Sends: the project in the path.
    pub project: Option<String>,
    /// Sends with a valid body: exactly one of these is set.
    pub token: Option<String>,
    pub topic: Option<String>,
    pub condition: Option<String>,
    /// Sends with a valid body: `message`, as sent.
    pub message: Option<Value>,
    pub validate_only: bool,
    pub status: u16,
    /// The error's `status` (`NOT_FOUND`, ...) or the OAuth error (`invalid_grant`, ...).
    pub error: Option<String>,
    /// The `FcmError` `errorCode` answered (`UNREGISTERED`, ...).
    pub fcm_error: Option<String>,
    /// The error's message or `error_description`.
    pub description: Option<String>,
    /// Successful sends: the message's `name` answered.
    pub name: Option<String>,
}

impl FcmRecord {
    pub(crate) fn new(connection: u64, endpoint: FcmEndpoint, path: &str) -> FcmRecord {
        FcmRecord {
            at: SystemTime::now(),
            connection,
            endpoint,
            path: path.to_owned(),
            client_email: None,
            project: None,
            token: None,
            topic: None,
            condition: None,
            message: None,
            validate_only: false,
            status: 0,
            error: None,
            fcm_error: None,
            description: None,
            name: None,
        }
    }
}
