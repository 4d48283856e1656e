//! A browser's push subscription, as a Web Push row's `device_token` holds it: the text
//! of `JSON.stringify(subscription)` (`PushSubscription.toJSON()`):
//!
//! ```json
//! {"endpoint": "https://push.example/...", "expirationTime": null,
//!  "keys": {"p256dh": "<base64url>", "auth": "<base64url>"}}
//! ```
//!
//! The endpoint is where the message is posted (RFC 8030, section 5); its origin is the
//! audience of the VAPID token (RFC 8292, section 2). `p256dh` is the browser's P-256
//! public key, an uncompressed point (65 bytes), and `auth` its 16-byte authentication
//! secret, both for the payload's encryption (RFC 8291, section 2). Both keys are read in
//! base64url with or without padding. `expirationTime` and any other member are ignored:
//! a subscription that has expired is reported gone by its push service (404, 410).
//!
//! The endpoint and the keys together let anyone push to the browser, so an error never
//! shows them: it names the endpoint's origin at most, and `Debug` shows only that.

use std::fmt;

use http::Uri;
use openssl::bn::BigNumContext;
use openssl::ec::EcPoint;
use serde_json::Value;

use super::base64url;

/// The length of an uncompressed P-256 point: `0x04 || x || y`.
pub const P256DH_LEN: usize = 65;
/// The length of the authentication secret.
pub const AUTH_LEN: usize = 16;

/// A subscription, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Subscription {
    endpoint: String,
    uri: Uri,
    origin: String,
    host: String,
    port: u16,
    p256dh: [u8; P256DH_LEN],
    auth: [u8; AUTH_LEN],
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Reads a `device_token`, or says in one line what is wrong with it.
    pub fn parse(token: &str) -> Result<Subscription, String> {
        // Into a `Value` first: serde's own type errors would quote the token's text.
        let json: Value = serde_json::from_str(token).map_err(|e| {
            format!(
                "the device_token is not JSON (line {}, column {}): a Web Push row's \
                 device_token is the browser's subscription, JSON.stringify(subscription)",
                e.line(),
                e.column()
            )
        })?;
        let Value::Object(json) = json else {
            return Err("the device_token is not a JSON object: a Web Push row's \
                        device_token is the browser's subscription, \
                        JSON.stringify(subscription)"
                .to_owned());
        };
        let endpoint = match json.get("endpoint") {
            Some(Value::String(e)) => e.clone(),
            Some(_) => return Err("the subscription's endpoint is not a string".to_owned()),
            None => return Err("the subscription has no endpoint".to_owned()),
        };
        let Endpoint {
            uri,
            origin,
            host,
            port,
        } = Endpoint::parse(&endpoint)?;
        let keys = match json.get("keys") {
            Some(Value::Object(keys)) => keys,
            Some(_) => {
                return Err(format!(
                    "the subscription to {origin} has keys that are not an object"
                ))
            }
            None => {
                return Err(format!(
                    "the subscription to {origin} has no keys (p256dh, auth): store the \
                     whole PushSubscription.toJSON(), the payload is encrypted with them"
                ))
            }
        };
        let key = |name: &str| match keys.get(name) {
            Some(Value::String(text)) => base64url::decode(text).ok_or_else(|| {
                format!("the subscription to {origin} has a keys.{name} that is not base64url")
            }),
            Some(_) => Err(format!(
                "the subscription to {origin} has a keys.{name} that is not a string"
            )),
            None => Err(format!("the subscription to {origin} has no keys.{name}")),
        };
        let p256dh = key("p256dh")?;
        let p256dh: [u8; P256DH_LEN] = p256dh.as_slice().try_into().map_err(|_| {
            format!(
                "the subscription to {origin} has a keys.p256dh of {} bytes; it is an \
                 uncompressed P-256 point, {P256DH_LEN} bytes",
                p256dh.len()
            )
        })?;
        if !on_p256(&p256dh) {
            return Err(format!(
                "the subscription to {origin} has a keys.p256dh that is not a point on \
                 P-256"
            ));
        }
        let auth = key("auth")?;
        let auth: [u8; AUTH_LEN] = auth.as_slice().try_into().map_err(|_| {
            format!(
                "the subscription to {origin} has a keys.auth of {} bytes; it is \
                 {AUTH_LEN} bytes",
                auth.len()
            )
        })?;
        Ok(Subscription {
            endpoint,
            uri,
            origin,
            host,
            port,
            p256dh,
            auth,
        })
    }

    /// The endpoint URL, as the subscription gives it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint as a URI: what the request is posted to (`:authority`, `:path`).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The endpoint's origin as RFC 6454 serializes it: `https://host`, with `:port`
    /// unless 443 (IPv6 addresses in brackets). The VAPID token's audience.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The host to connect to: a name in lower case, or an IP address (IPv6 without
    /// brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port to connect to (443 unless the endpoint says otherwise).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint's path and query: the request's `:path`.
    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    /// The browser's public key (`keys.p256dh`): an uncompressed P-256 point.
    pub fn p256dh(&self) -> &[u8; P256DH_LEN] {
        &self.p256dh
    }

    /// The browser's authentication secret (`keys.auth`).
    pub fn auth(&self) -> &[u8; AUTH_LEN] {
        &self.auth
    }
}

/// An endpoint URL, checked.
struct Endpoint {
    uri: Uri,
    origin: String,
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(endpoint: &str) -> Result<Endpoint, String> {
        const NOT_HTTPS: &str = "the subscription's endpoint is not an https:// URL";
        let uri: Uri = endpoint.parse().map_err(|_| NOT_HTTPS.to_owned())?;
        if uri.scheme_str() != Some("https") {
            return Err(NOT_HTTPS.to_owned());
        }
        let authority = uri.authority().ok_or_else(|| NOT_HTTPS.to_owned())?;
        // `host()` keeps an IPv6 address's brackets, as the origin writes it.
        let bracketed = authority.host().to_ascii_lowercase();
        if bracketed.is_empty() {
            return Err("the subscription's endpoint has no host".to_owned());
        }
        let origin_host = format!("https://{bracketed}");
        if authority.as_str().contains('@') {
            return Err(format!(
                "the subscription's endpoint to {origin_host} carries credentials \
                 (user@host), which no push service gives"
            ));
        }
        let port = match authority.port() {
            None => 443,
            Some(port) => match port.as_u16() {
                0 => return Err(format!("the endpoint to {origin_host} has port 0")),
                port => port,
            },
        };
        // A port that does not fit 16 bits leaves no `port()` but stays in the authority.
        if authority.port().is_none() && authority.as_str() != authority.host() {
            return Err(format!(
                "the subscription's endpoint to {origin_host} has an invalid port"
            ));
        }
        let origin = match port {
            443 => origin_host,
            port => format!("{origin_host}:{port}"),
        };
        let host = bracketed
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&bracketed)
            .to_owned();
        Ok(Endpoint {
            uri,
            origin,
            host,
            port,
        })
    }
}

/// Whether `point` is an uncompressed point on P-256 (not the point at infinity).
fn on_p256(point: &[u8]) -> bool {
    if point.first() != Some(&0x04) {
        return false;
    }
    // Decoding checks that the point is on the curve; P-256's cofactor is 1, so every
    // point on it but infinity (which has no uncompressed form) is in the group: a full
    // key check would add a scalar multiplication and find nothing more.
    let check = || -> Result<(), openssl::error::ErrorStack> {
        let mut ctx = BigNumContext::new()?;
        EcPoint::from_bytes(super::p256::group()?, point, &mut ctx)?;
        Ok(())
    };
    check().is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 8291, Appendix A: the user agent's public key and authentication secret.
    pub(crate) const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    pub(crate) const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    pub(crate) fn token(endpoint: &str, p256dh: &str, auth: &str) -> String {
        serde_json::json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": {"p256dh": p256dh, "auth": auth},
        })
        .to_string()
    }

    pub(crate) fn subscription(endpoint: &str) -> Subscription {
        Subscription::parse(&token(endpoint, P256DH, AUTH)).unwrap()
    }

    #[test]
    fn a_browsers_subscription_is_read() {
        let s = subscription("https://fcm.googleapis.com/fcm/send/dZ3x:APA91b?x=1");
        assert_eq!(s.origin(), "https://fcm.googleapis.com");
        assert_eq!(s.host(), "fcm.googleapis.com");
        assert_eq!(s.port(), 443);
        assert_eq!(s.path_and_query(), "/fcm/send/dZ3x:APA91b?x=1");
        assert_eq!(
            s.endpoint(),
            "https://fcm.googleapis.com/fcm/send/dZ3x:APA91b?x=1"
        );
        assert_eq!(s.p256dh()[0], 0x04);
        assert_eq!(base64url::encode(s.auth()), AUTH);
        assert_eq!(
            format!("{s:?}"),
            "Subscription { origin: \"https://fcm.googleapis.com\", .. }"
        );
    }

    #[test]
    fn padded_keys_are_read_too() {
        let padded = Subscription::parse(&token(
            "https://push.example/x",
            &format!("{P256DH}="),
            &format!("{AUTH}=="),
        ))
        .unwrap();
        assert_eq!(padded, subscription("https://push.example/x"));
    }

    #[test]
    fn the_origin_is_serialized_as_rfc_6454_says() {
        for (endpoint, origin, host, port) in [
            (
                "https://Push.Example.COM/a",
                "https://push.example.com",
                "push.example.com",
                443,
            ),
            (
                "https://push.example:443/a",
                "https://push.example",
                "push.example",
                443,
            ),
            (
                "https://push.example:8443/a",
                "https://push.example:8443",
                "push.example",
                8443,
            ),
            ("https://[::1]:8443/a", "https://[::1]:8443", "::1", 8443),
            (
                "https://[2001:DB8::1]/a",
                "https://[2001:db8::1]",
                "2001:db8::1",
                443,
            ),
            (
                "https://127.0.0.1:9/a",
                "https://127.0.0.1:9",
                "127.0.0.1",
                9,
            ),
        ] {
            let s = subscription(endpoint);
            assert_eq!(
                (s.origin(), s.host(), s.port()),
                (origin, host, port),
                "{endpoint}"
            );
        }
    }

    #[test]
    fn each_fault_has_its_line_and_no_key_material() {
        let e = "https://push.example/secret-path";
        let bad_point = {
            let mut p = base64url::decode(P256DH).unwrap();
            p[64] ^= 1;
            base64url::encode(&p)
        };
        let compressed = {
            let mut p = base64url::decode(P256DH).unwrap();
            p.truncate(33);
            p[0] = 0x02;
            base64url::encode(&p)
        };
        let cases = [
            ("not json".to_owned(), "is not JSON (line 1, column 2)"),
            ("[1]".to_owned(), "not a JSON object"),
            (r#"{"keys": {}}"#.to_owned(), "has no endpoint"),
            (r#"{"endpoint": 5}"#.to_owned(), "endpoint is not a string"),
            (
                token("http://push.example/x", P256DH, AUTH),
                "not an https:// URL",
            ),
            (token("push.example/x", P256DH, AUTH), "not an https:// URL"),
            (token("https:///x", P256DH, AUTH), "not an https:// URL"),
            (
                token("https://u:p@push.example/x", P256DH, AUTH),
                "carries credentials",
            ),
            (
                token("https://push.example:99999/x", P256DH, AUTH),
                "invalid port",
            ),
            (token("https://push.example:0/x", P256DH, AUTH), "port 0"),
            (
                format!(r#"{{"endpoint": "{e}"}}"#),
                "to https://push.example has no keys (p256dh, auth)",
            ),
            (
                format!(r#"{{"endpoint": "{e}", "keys": {{"auth": "{AUTH}"}}}}"#),
                "no keys.p256dh",
            ),
            (token(e, "B+/=", AUTH), "keys.p256dh that is not base64url"),
            (token(e, AUTH, AUTH), "keys.p256dh of 16 bytes"),
            (token(e, &compressed, AUTH), "keys.p256dh of 33 bytes"),
            (token(e, &bad_point, AUTH), "not a point on P-256"),
            (token(e, P256DH, "AAAA"), "keys.auth of 3 bytes"),
            (
                format!(r#"{{"endpoint": "{e}", "keys": {{"p256dh": "{P256DH}", "auth": 1}}}}"#),
                "keys.auth that is not a string",
            ),
        ];
        for (token, expected) in cases {
            let err = Subscription::parse(&token).unwrap_err();
            assert!(err.contains(expected), "{token}: {err}");
            assert!(!err.contains('\n'), "{err}");
            for secret in ["secret-path", P256DH, AUTH, &bad_point] {
                assert!(!err.contains(secret), "{err}");
            }
        }
    }
}
