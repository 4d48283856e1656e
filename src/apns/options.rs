//! The client's timings that are not in the config file: sensible for Apple, shortened
//! by tests.

use std::time::Duration;

use super::provider_token;

/// Timings of both protocols' clients.
#[derive(Debug, Clone)]
pub struct Options {
    /// PING a connection that has had no answer for this long.
    pub ping_interval: Duration,
    /// A PING unanswered this long means the connection is dead.
    pub ping_timeout: Duration,
    pub connect_timeout: Duration,
    /// Backoff between failed connection attempts.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Sends of a request the server never processed, beyond the first.
    pub max_resends: u32,
    /// How long an HTTP/2 request waits for a connection and a stream before it gives up
    /// without having left (the row is deferred, no attempt counted). `request_timeout`
    /// runs from when it has its stream.
    pub stream_wait: Duration,
    /// Backoff of an app whose credentials APNs refuses.
    pub credentials_backoff_base: Duration,
    pub credentials_backoff_max: Duration,
    pub token_refresh_after: Duration,
    pub token_min_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            max_resends: 3,
            stream_wait: Duration::from_secs(10),
            credentials_backoff_base: Duration::from_secs(10),
            credentials_backoff_max: Duration::from_secs(5 * 60),
            token_refresh_after: provider_token::REFRESH_AFTER,
            token_min_interval: provider_token::MIN_INTERVAL,
        }
    }
}
