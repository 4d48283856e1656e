//! A client of HTTP/2 push services, shared by APNs's provider API (`apns::http2`) and
//! FCM (`fcm`): what neither service's rules decide.
//!
//! - [`connection`]: one long-lived connection (through `crate::proxy`, TLS with ALPN
//!   `h2`), PING liveness, the server's stream limit, GOAWAY, and which requests the
//!   server never processed; `frame_watch` reads GOAWAY and SETTINGS off the wire for it;
//! - [`pool`]: an app's connections, requests spread over them, what the server never
//!   processed sent again elsewhere;
//! - [`Answer`]: a whole answer, status, headers and body, for the service's own rules to
//!   read (`apns-id`, `retry-after`, ...).

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
