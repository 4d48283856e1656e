//! FCM's errors as the HTTP v1 API sends them: a `google.rpc.Status` in JSON,
//!
//! ```json
//! {"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
//!            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
//!                         "errorCode": "UNREGISTERED"}]}}
//! ```
//!
//! `code` is the HTTP status, `status` the canonical code's name (`google.rpc.Code`), and
//! `details` says more: an `FcmError` with one of FCM's [`ErrorCode`]s, a
//! `google.rpc.BadRequest` naming the invalid field, a `google.rpc.ErrorInfo` (why a
//! credential was refused) or a `google.rpc.QuotaFailure`. Written from Google's "FCM
//! error codes" and `ErrorCode` reference pages.

use std::fmt;

use bytes::Bytes;
use serde_json::{json, Value};

const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";
const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const QUOTA_FAILURE_TYPE: &str = "type.googleapis.com/google.rpc.QuotaFailure";

/// FCM's error codes (`google.firebase.fcm.v1.FcmError.errorCode`), each with the HTTP
/// status Google documents for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No more information is available. Google names no status; the emulator answers
    /// 500 `UNKNOWN`, the canonical code for an error without one.
    UnspecifiedError,
    /// 400: the request's parameters were invalid (token format, message too big,
    /// reserved data key, bad TTL, ...).
    InvalidArgument,
    /// 404: the app instance was unregistered; the token will never work again.
    Unregistered,
    /// 403: the token belongs to another sender (project).
    SenderIdMismatch,
    /// 429: a sending limit was exceeded; comes with `Retry-After`.
    QuotaExceeded,
    /// 503: the server is overloaded; retry with backoff.
    Unavailable,
    /// 500: an unknown internal error; retry with backoff.
    Internal,
    /// 401: the APNs certificate or web push key of the project was refused.
    ThirdPartyAuthError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::UnspecifiedError,
        ErrorCode::InvalidArgument,
        ErrorCode::Unregistered,
        ErrorCode::SenderIdMismatch,
        ErrorCode::QuotaExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::ThirdPartyAuthError,
    ];

    /// As in JSON: `UNREGISTERED`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnspecifiedError => "UNSPECIFIED_ERROR",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unregistered => "UNREGISTERED",
            ErrorCode::SenderIdMismatch => "SENDER_ID_MISMATCH",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::ThirdPartyAuthError => "THIRD_PARTY_AUTH_ERROR",
        }
    }

    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == text)
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::ThirdPartyAuthError => 401,
            ErrorCode::SenderIdMismatch => 403,
            ErrorCode::Unregistered => 404,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::UnspecifiedError | ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }

    /// The canonical code (`google.rpc.Code`) that comes with it, as `error.status`.
    pub fn canonical_status(self) -> &'static str {
        match self {
            ErrorCode::UnspecifiedError => "UNKNOWN",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unregistered => "NOT_FOUND",
            ErrorCode::SenderIdMismatch => "PERMISSION_DENIED",
            ErrorCode::QuotaExceeded => "RESOURCE_EXHAUSTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::ThirdPartyAuthError => "UNAUTHENTICATED",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            ErrorCode::UnspecifiedError => "Unknown error.",
            ErrorCode::InvalidArgument => "Request contains an invalid argument.",
            ErrorCode::Unregistered => "Requested entity was not found.",
            ErrorCode::SenderIdMismatch => "SenderId mismatch",
            ErrorCode::QuotaExceeded => "Quota exceeded for sending messages.",
            ErrorCode::Unavailable => "The service is currently unavailable.",
            ErrorCode::Internal => "Internal error encountered.",
            ErrorCode::ThirdPartyAuthError => "Auth error from APNS or Web Push Service",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a credential was refused (`google.rpc.ErrorInfo.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CredentialProblem {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token the emulator never issued (or revoked).
    Unknown,
    /// A token past its `expires_in`.
    Expired,
    /// The token's account has no permission on the project in the path.
    PermissionDenied,
}

impl CredentialProblem {
    fn reason(self) -> &'static str {
        match self {
            CredentialProblem::Missing => "CREDENTIALS_MISSING",
            CredentialProblem::Unknown => "ACCESS_TOKEN_TYPE_UNSUPPORTED",
            CredentialProblem::Expired => "ACCESS_TOKEN_EXPIRED",
            CredentialProblem::PermissionDenied => "IAM_PERMISSION_DENIED",
        }
    }
}

/// One field's problem (`google.rpc.BadRequest.FieldViolation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldViolation {
    /// `message.data[0].value`, ...; `None` when Google names no field.
    pub field: Option<String>,
    pub description: String,
}

/// An error answer of the HTTP v1 API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoogleError {
    pub code: u16,
    pub status: &'static str,
    pub message: String,
    pub fcm_error: Option<ErrorCode>,
    pub violation: Option<FieldViolation>,
    pub credential: Option<CredentialProblem>,
}

impl GoogleError {
    /// One of FCM's errors with its status and Google's message for it.
    pub fn fcm(code: ErrorCode) -> GoogleError {
        GoogleError {
            code: code.http_status(),
            status: code.canonical_status(),
            message: code.default_message().to_owned(),
            fcm_error: Some(code),
            violation: None,
            credential: None,
        }
    }

    /// 400 `INVALID_ARGUMENT`: `message` at the top, and as the field violation's
    /// description. `fcm`: with an `FcmError` `INVALID_ARGUMENT` too (Google adds one to
    /// FCM's own checks, not to the JSON parser's).
    pub fn invalid(message: String, field: Option<String>, fcm: bool) -> GoogleError {
        GoogleError {
            code: 400,
            status: "INVALID_ARGUMENT",
            violation: Some(FieldViolation {
                field,
                description: message.clone(),
            }),
            message,
            fcm_error: fcm.then_some(ErrorCode::InvalidArgument),
            credential: None,
        }
    }

    /// 401 `UNAUTHENTICATED`: the access token is missing, unknown or expired.
    pub fn unauthenticated(problem: CredentialProblem) -> GoogleError {
        let message = match problem {
            CredentialProblem::Missing => {
                "Request is missing required authentication credential. Expected OAuth 2 access \
                 token, login cookie or other valid authentication credential. See \
                 https://developers.google.com/identity/sign-in/web/devconsole-project."
            }
            _ => {
                "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                 login cookie or other valid authentication credential. See \
                 https://developers.google.com/identity/sign-in/web/devconsole-project."
            }
        };
        GoogleError {
            code: 401,
            status: "UNAUTHENTICATED",
            message: message.to_owned(),
            fcm_error: None,
            violation: None,
            credential: Some(problem),
        }
    }

    /// 403 `PERMISSION_DENIED`: the token's service account belongs to another project
    /// than the one in the path.
    pub fn permission_denied(project: &str) -> GoogleError {
        GoogleError {
            code: 403,
            status: "PERMISSION_DENIED",
            message: format!(
                "Permission 'cloudmessaging.messages.create' denied on resource \
                 '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            ),
            fcm_error: None,
            violation: None,
            credential: Some(CredentialProblem::PermissionDenied),
        }
    }

    /// 404 `NOT_FOUND` for a path the API does not have.
    pub fn no_such_path(path: &str) -> GoogleError {
        GoogleError {
            code: 404,
            status: "NOT_FOUND",
            message: format!("The requested URL {path} was not found on this server."),
            fcm_error: None,
            violation: None,
            credential: None,
        }
    }

    /// 405 for a method other than POST.
    pub fn method_not_allowed(method: &str) -> GoogleError {
        GoogleError {
            code: 405,
            status: "UNIMPLEMENTED",
            message: format!("Method {method} is not allowed here; use POST."),
            fcm_error: None,
            violation: None,
            credential: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let mut details = Vec::new();
        if let Some(code) = self.fcm_error {
            details.push(json!({"@type": FCM_ERROR_TYPE, "errorCode": code.as_str()}));
        }
        if let Some(violation) = &self.violation {
            let mut v = json!({"description": violation.description});
            if let Some(field) = &violation.field {
                v["field"] = Value::from(field.as_str());
            }
            details.push(json!({"@type": BAD_REQUEST_TYPE, "fieldViolations": [v]}));
        }
        if let Some(problem) = self.credential {
            details.push(json!({
                "@type": ERROR_INFO_TYPE,
                "reason": problem.reason(),
                "domain": "googleapis.com",
                "metadata": {
                    "service": "fcm.googleapis.com",
                    "method": "google.firebase.fcm.v1.FcmService.SendMessage",
                },
            }));
        }
        if self.fcm_error == Some(ErrorCode::QuotaExceeded) {
            details.push(json!({
                "@type": QUOTA_FAILURE_TYPE,
                "violations": [{"subject": "messages", "description": "message rate exceeded"}],
            }));
        }
        let mut error = json!({"code": self.code, "message": self.message, "status": self.status});
        if !details.is_empty() {
            error["details"] = Value::Array(details);
        }
        Bytes::from(json!({ "error": error }).to_string())
    }
}

/// The token endpoint's refusals, as Google's OAuth 2.0 server words them:
/// `{"error": "invalid_grant", "error_description": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OauthError {
    /// 400, or 401 for an unknown client.
    pub status: u16,
    /// `invalid_grant`, `invalid_scope`, `invalid_request`, `invalid_client`,
    /// `unsupported_grant_type`, ...
    pub error: String,
    pub description: String,
}

impl OauthError {
    pub fn new(status: u16, error: &str, description: impl Into<String>) -> OauthError {
        OauthError {
            status,
            error: error.to_owned(),
            description: description.into(),
        }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(json!({"error": self.error, "error_description": self.description}).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Bytes) -> Value {
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn every_code_has_googles_status_and_round_trips() {
        let expected = [
            (ErrorCode::UnspecifiedError, 500, "UNKNOWN"),
            (ErrorCode::InvalidArgument, 400, "INVALID_ARGUMENT"),
            (ErrorCode::Unregistered, 404, "NOT_FOUND"),
            (ErrorCode::SenderIdMismatch, 403, "PERMISSION_DENIED"),
            (ErrorCode::QuotaExceeded, 429, "RESOURCE_EXHAUSTED"),
            (ErrorCode::Unavailable, 503, "UNAVAILABLE"),
            (ErrorCode::Internal, 500, "INTERNAL"),
            (ErrorCode::ThirdPartyAuthError, 401, "UNAUTHENTICATED"),
        ];
        for (code, status, canonical) in expected {
            assert_eq!(
                (code.http_status(), code.canonical_status()),
                (status, canonical)
            );
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("unregistered"), None);
    }

    #[test]
    fn an_fcm_error_body_is_a_google_rpc_status() {
        let body = parse(GoogleError::fcm(ErrorCode::Unregistered).body());
        assert_eq!(
            body,
            json!({"error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                             "errorCode": "UNREGISTERED"}],
            }})
        );
        let quota = parse(GoogleError::fcm(ErrorCode::QuotaExceeded).body());
        assert_eq!(quota["error"]["details"][1]["@type"], QUOTA_FAILURE_TYPE);
    }

    #[test]
    fn invalid_arguments_name_their_field() {
        let parser =
            GoogleError::invalid("bad".into(), Some("message.data[0].value".into()), false);
        let body = parse(parser.body());
        assert_eq!(body["error"]["details"].as_array().unwrap().len(), 1);
        assert_eq!(
            body["error"]["details"][0]["fieldViolations"][0]["field"],
            "message.data[0].value"
        );
        let fcm = parse(GoogleError::invalid("no".into(), None, true).body());
        assert_eq!(fcm["error"]["details"][0]["errorCode"], "INVALID_ARGUMENT");
        assert!(fcm["error"]["details"][1]["fieldViolations"][0]
            .get("field")
            .is_none());
    }

    #[test]
    fn refused_credentials_say_why() {
        let expired = parse(GoogleError::unauthenticated(CredentialProblem::Expired).body());
        assert_eq!(expired["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(
            expired["error"]["details"][0]["reason"],
            "ACCESS_TOKEN_EXPIRED"
        );
        assert!(expired["error"]["details"][0].get("errorCode").is_none());
        let denied = parse(GoogleError::permission_denied("other").body());
        assert_eq!(denied["error"]["code"], 403);
        assert!(denied["error"]["message"]
            .as_str()
            .unwrap()
            .contains("projects/other"));
        let oauth = OauthError::new(400, "invalid_grant", "Invalid JWT Signature.");
        assert_eq!(
            parse(oauth.body()),
            json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        );
    }
}
