//! A [`ChannelOp`] -> a request to APNs's channel management API, as a pure function:
//! `POST`, `GET` and `DELETE /1/apps/{bundle id}/channels` (the channel in the
//! `apns-channel-id` header, never in the path) and `GET /1/apps/{bundle id}/all-channels`,
//! each with an `apns-request-id` for APNs's logs and ours.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::Method;
use uuid::Uuid;

use crate::apns::http2::broadcast::{check_channel_id, APNS_CHANNEL_ID, APNS_REQUEST_ID};
use crate::channels::ChannelOp;
use crate::config::{Endpoint, Environment};

/// The management API's host and port: Apple's own per environment (2195 for the
/// sandbox, 2196 for production), or the config's `channels_endpoint`.
pub fn host_port(endpoint: &Endpoint) -> (&str, u16) {
    match endpoint {
        Endpoint::Apple(Environment::Production) => ("api-manage-broadcast.push.apple.com", 2196),
        Endpoint::Apple(Environment::Sandbox) => {
            ("api-manage-broadcast.sandbox.push.apple.com", 2195)
        }
        Endpoint::Custom { host, port } => (host.as_str(), *port),
        Endpoint::PerRow => unreachable!("only a Web Push app has no endpoint (config::apps)"),
    }
}

/// One management request, ready to go out as many times as it takes.
#[derive(Debug, Clone)]
pub struct ChannelRequest {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: Uuid,
}

impl ChannelRequest {
    /// The `http::Request` for one attempt; `bearer` is the provider token under token auth.
    pub fn to_http(&self, bearer: Option<&str>) -> http::Request<()> {
        crate::apns::http2::request::to_http(self.method.clone(), &self.uri, &self.headers, bearer)
    }
}

/// The request for `op` on `bundle`'s channels at `endpoint`; `Err` for a channel id APNs
/// cannot have given.
pub fn build(
    op: &ChannelOp,
    bundle: &str,
    endpoint: &Endpoint,
    request_id: Uuid,
) -> Result<ChannelRequest, String> {
    let (host, port) = host_port(endpoint);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let (method, path, channel, body) = match op {
        ChannelOp::Create(storage) => (
            Method::POST,
            "channels",
            None,
            format!(
                r#"{{"message-storage-policy":{},"push-type":"LiveActivity"}}"#,
                storage.policy()
            ),
        ),
        ChannelOp::Read(id) => (Method::GET, "channels", Some(id), String::new()),
        ChannelOp::Delete(id) => (Method::DELETE, "channels", Some(id), String::new()),
        ChannelOp::List => (Method::GET, "all-channels", None, String::new()),
    };
    let uri = format!("https://{host}:{port}/1/apps/{bundle}/{path}")
        .parse::<http::Uri>()
        .map_err(|e| format!("BadTopic: bundle id {bundle:?} cannot be a path: {e}"))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        APNS_REQUEST_ID,
        HeaderValue::from_str(&request_id.hyphenated().to_string()).expect("a UUID is ASCII"),
    );
    if let Some(id) = channel {
        check_channel_id(id)?;
        headers.insert(
            APNS_CHANNEL_ID,
            HeaderValue::from_str(id).expect("checked: base64 is a header value"),
        );
    }
    if !body.is_empty() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Ok(ChannelRequest {
        method,
        uri,
        headers,
        body: Bytes::from(body),
        request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::MessageStorage;

    fn req(op: ChannelOp, endpoint: Endpoint) -> ChannelRequest {
        build(&op, "com.example.app", &endpoint, Uuid::nil()).unwrap()
    }

    #[test]
    fn each_call_as_apple_documents_it() {
        let prod = Endpoint::Apple(Environment::Production);
        let create = req(ChannelOp::Create(MessageStorage::MostRecent), prod.clone());
        assert_eq!(create.method, Method::POST);
        assert_eq!(
            create.uri.to_string(),
            "https://api-manage-broadcast.push.apple.com:2196/1/apps/com.example.app/channels"
        );
        assert_eq!(
            &create.body[..],
            br#"{"message-storage-policy":1,"push-type":"LiveActivity"}"#
        );
        assert_eq!(create.headers["content-type"], "application/json");
        assert_eq!(
            create.headers["apns-request-id"],
            "00000000-0000-0000-0000-000000000000"
        );
        assert!(create.headers.get("apns-channel-id").is_none());

        let sandbox = Endpoint::Apple(Environment::Sandbox);
        let read = req(ChannelOp::Read("abc=".into()), sandbox.clone());
        assert_eq!(read.method, Method::GET);
        assert_eq!(
            read.uri.to_string(),
            "https://api-manage-broadcast.sandbox.push.apple.com:2195/1/apps/com.example.app/channels"
        );
        assert_eq!(read.headers["apns-channel-id"], "abc=");
        assert!(read.body.is_empty());

        let delete = req(ChannelOp::Delete("abc=".into()), sandbox.clone());
        assert_eq!(delete.method, Method::DELETE);
        assert_eq!(delete.headers["apns-channel-id"], "abc=");

        let list = req(ChannelOp::List, sandbox);
        assert_eq!(list.method, Method::GET);
        assert!(list
            .uri
            .path()
            .ends_with("/1/apps/com.example.app/all-channels"));

        let none = req(
            ChannelOp::Create(MessageStorage::None),
            Endpoint::Custom {
                host: "127.0.0.1".into(),
                port: 8443,
            },
        );
        assert_eq!(none.uri.authority().unwrap().as_str(), "127.0.0.1:8443");
        assert!(std::str::from_utf8(&none.body)
            .unwrap()
            .contains(r#""message-storage-policy":0"#));
    }

    #[test]
    fn a_channel_id_apns_cannot_have_given_is_refused() {
        let e = build(
            &ChannelOp::Delete("a b".into()),
            "com.example.app",
            &Endpoint::Apple(Environment::Production),
            Uuid::nil(),
        )
        .unwrap_err();
        assert!(e.starts_with("BadChannelId"), "{e}");
    }
}
