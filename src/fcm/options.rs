//! The FCM client's timings that are not in the config file: sensible for Google,
//! shortened by tests.

use std::time::Duration;

/// Timings of an FCM app's client.
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
    /// How long a request waits for a connection and a stream before it gives up without
    /// having left (the row is deferred, no attempt counted).
    pub stream_wait: Duration,
    /// Backoff of an app whose credentials Google refuses.
    pub credentials_backoff_base: Duration,
    pub credentials_backoff_max: Duration,
    /// Backoff between failed token requests (an endpoint that errs, not one that refuses
    /// the account).
    pub token_retry_base: Duration,
    pub token_retry_max: Duration,
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
            token_retry_base: Duration::from_secs(1),
            token_retry_max: Duration::from_secs(60),
        }
    }
}
