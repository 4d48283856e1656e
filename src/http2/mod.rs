//! A client of HTTP/2 push services, shared by APNs's provider API (`apns::http2`) and
//! FCM (`fcm`): what neither service's rules decide.
//!
//! - [`connection`]: one long-lived connection (through `crate::proxy`, TLS with ALPN
//!   `h2`), PING liveness, the server's stream limit, GOAWAY, and which requests the
//!   server never processed; `frame_watch` reads GOAWAY and SETTINGS off the wire for it;
//! - [`pool`]: an app's connections, requests spread over them, what the server never
//!   processed sent again elsewhere;
//! - [`Answer`]: a whole answer, status, headers and body, for the service's own rules to
//!   read (`apns-id`, `retry-after`, ...), and [`retry_after`], HTTP's `Retry-After` read.

use std::time::Duration;

pub mod connection;
mod frame_watch;
pub mod pool;
#[cfg(test)]
pub(crate) mod raw_peer;

/// A server's whole answer to one request, as the connection read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    /// Cut at [`connection::MAX_RESPONSE_BODY`]: answers are small JSON objects.
    pub body: bytes::Bytes,
}

impl Answer {
    /// A response header's value, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `Retry-After` in either of HTTP's forms (RFC 9110, 10.2.3): delta-seconds (what FCM
/// sends) or an HTTP-date, read against `now` (a date already past: no wait). Unbounded
/// here; `outcome` caps what a row waits.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Client settings that trust a test's APNs emulator (any h2 server will do):
/// host `localhost`, its CA, short timeouts.
#[cfg(test)]
pub(crate) trait TrustingEmulator {
    fn connect_options(&self) -> connection::ConnectOptions;
}

#[cfg(test)]
impl TrustingEmulator for crate::testutil::TestEmulator {
    fn connect_options(&self) -> connection::ConnectOptions {
        connection::ConnectOptions {
            service: "test",
            host: "localhost".into(),
            proxy: None,
            port: self.port(),
            tls: crate::tls::connector(Some(&self.ca_file), None, &["h2"]).unwrap(),
            connect_timeout: std::time::Duration::from_secs(5),
            request_timeout: std::time::Duration::from_secs(10),
            ping_interval: std::time::Duration::from_secs(30),
            ping_timeout: std::time::Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Dec 2026 01:00:00 GMT").unwrap();
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Dec 2026 01:02:30 GMT", now),
            Some(Duration::from_secs(150))
        );
        assert_eq!(
            retry_after("Sat, 05 Dec 2026 23:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past"
        );
        // Read as-is; the row's wait is capped by `outcome::MAX_RETRY_AFTER`.
        assert_eq!(
            retry_after("99999999999", now),
            Some(Duration::from_secs(99_999_999_999))
        );
        for bad in ["", "soon", "-5", "1.5", "Sun, 06 Dec 2026"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
    }
}
