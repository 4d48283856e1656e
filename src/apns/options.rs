//! APNs's own timings that are not in the config file (those every service shares are
//! `service::Timings`): when the provider token is renewed. Shortened by tests.

use std::time::Duration;

use super::provider_token;

#[derive(Debug, Clone)]
pub struct Options {
    /// A provider token is renewed once this old (Apple: at most once every 20 minutes,
    /// no token older than an hour).
    pub token_refresh_after: Duration,
    /// Never sign a new token sooner than this after the last.
    pub token_min_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token_refresh_after: provider_token::REFRESH_AFTER,
            token_min_interval: provider_token::MIN_INTERVAL,
        }
    }
}
