//! FCM's own timings that are not in the config file (those every service shares are
//! `service::Timings`): the token endpoint's retries. Shortened by tests.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Options {
    /// Backoff between failed token requests (an endpoint that errs, not one that refuses
    /// the account).
    pub token_retry_base: Duration,
    pub token_retry_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token_retry_base: Duration::from_secs(1),
            token_retry_max: Duration::from_secs(60),
        }
    }
}
