//! A row as FCM's `messages:send` request, as a pure function: the row's APNs-only
//! columns refused with what to use instead, the body built by [`message::body`] (which
//! refuses what FCM would), the path naming the project.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri, Version};

use std::time::SystemTime;

use super::expiry::Expiry;
use super::message;
use crate::transport::Notification;

/// A request ready to go, but for its bearer token.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    pub uri: Uri,
    pub body: Bytes,
}

impl FcmRequest {
    pub fn to_http(&self, bearer: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_2;
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // An access token is URL-safe text: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&format!("Bearer {bearer}")) {
            headers.insert(AUTHORIZATION, value);
        }
        request
    }
}

/// The request for row `n` of an app sending as `project` to `authority` (`host[:port]`),
/// or why the row cannot be sent.
/// `now` is when it is sent: the row's `expires_at` becomes the time left then.
pub fn build(
    n: &Notification,
    project: &str,
    authority: &str,
    now: SystemTime,
) -> Result<FcmRequest, String> {
    check_apns_columns(n)?;
    let expiry = n.expires_at.map(|at| Expiry::of(at, now));
    let body = message::body(&n.device_token, &n.payload, expiry)?;
    let uri = format!("https://{authority}/v1/projects/{project}/messages:send")
        .parse::<Uri>()
        .map_err(|e| format!("cannot form the request's URL: {e}"))?;
    Ok(FcmRequest {
        uri,
        body: Bytes::from(body),
    })
}

/// The outbox's APNs columns mean nothing to FCM: a row that sets one would not be sent
/// as its writer meant, so it fails, saying what FCM has instead.
fn check_apns_columns(n: &Notification) -> Result<(), String> {
    if n.priority.is_some() {
        return Err("priority is an APNs column; for FCM, set android.priority \
                    (\"HIGH\" or \"NORMAL\") in the payload and leave priority NULL"
            .to_owned());
    }
    if n.collapse_id.is_some() {
        return Err(
            "collapse_id is an APNs column; for FCM, set android.collapse_key \
                    in the payload and leave collapse_id NULL"
                .to_owned(),
        );
    }
    if n.topic.is_some() {
        return Err(
            "topic is an APNs column (a bundle id); an FCM row goes to its \
                    device_token: leave topic NULL"
                .to_owned(),
        );
    }
    if n.push_type != "alert" {
        return Err(format!(
            "push_type {:?} is an APNs column; for FCM, leave it 'alert' and shape the \
             message in the payload (notification, data, android)",
            n.push_type
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "bk3RNwTe3H0:CI2k_HHwgIpoDKCIZvvDMExUdFQ3P1";

    fn row() -> Notification {
        Notification {
            id: 1,
            app: "android".into(),
            device_token: TOKEN.into(),
            payload: r#"{"data": {"n": "1"}}"#.into(),
            push_type: "alert".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts: 0,
            broadcast: None,
        }
    }

    #[test]
    fn a_row_becomes_a_send_to_its_project() {
        let r = build(&row(), "p-1", "127.0.0.1:8443", SystemTime::now()).unwrap();
        assert_eq!(
            r.uri.to_string(),
            "https://127.0.0.1:8443/v1/projects/p-1/messages:send"
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"message": {"token": TOKEN, "data": {"n": "1"}}})
        );
        let http = r.to_http("ya29.abc");
        assert_eq!(http.method(), Method::POST);
        assert_eq!(http.headers()[AUTHORIZATION], "Bearer ya29.abc");
        assert_eq!(http.headers()[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn apns_columns_fail_the_row_saying_what_to_use() {
        type Set = fn(&mut Notification);
        let cases: [(Set, &str); 4] = [
            (|n| n.priority = Some(10), "android.priority"),
            (|n| n.collapse_id = Some("c".into()), "android.collapse_key"),
            (|n| n.topic = Some("com.example".into()), "leave topic NULL"),
            (|n| n.push_type = "voip".into(), "leave it 'alert'"),
        ];
        for (set, hint) in cases {
            let mut n = row();
            set(&mut n);
            let e = build(&n, "p", "h", SystemTime::now()).unwrap_err();
            assert!(e.contains(hint), "{e}");
        }
    }

    #[test]
    fn what_fcm_would_refuse_fails_first() {
        let mut n = row();
        n.payload = r#"{"data": {"n": 1}}"#.into();
        assert!(build(&n, "p", "h", SystemTime::now()).is_err());
        n = row();
        n.device_token = "ab cd".into();
        assert!(build(&n, "p", "h", SystemTime::now()).is_err());
    }
}
