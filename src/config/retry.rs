//! `[retry]`: how often, and how patiently, a transiently failing row is tried again.

use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::validate::{Validator, DAY};
use super::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts (requests made) after which a transiently failing row becomes `failed`.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// The longest wait between two attempts of a row.
const MAX_BACKOFF: Duration = Duration::from_secs(30 * DAY.as_secs());

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryFile {
    #[serde(default = "defaults::max_attempts")]
    max_attempts: i64,
    #[serde(default = "defaults::backoff_base", with = "duration")]
    backoff_base: Duration,
    #[serde(default = "defaults::backoff_max", with = "duration")]
    backoff_max: Duration,
}

impl Default for RetryFile {
    fn default() -> Self {
        RetryFile {
            max_attempts: defaults::max_attempts(),
            backoff_base: defaults::backoff_base(),
            backoff_max: defaults::backoff_max(),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn max_attempts() -> i64 {
        8
    }
    pub fn backoff_base() -> Duration {
        Duration::from_secs(2)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30 * 60)
    }
}

impl Validator<'_> {
    pub(super) fn retry(&self, r: RetryFile) -> Result<RetryConfig, ConfigError> {
        let max_attempts = self.positive("retry.max_attempts", r.max_attempts, 1_000)? as u32;
        let backoff_base = self.bounded("retry.backoff_base", r.backoff_base, MAX_BACKOFF)?;
        self.at_most("retry.backoff_max", r.backoff_max, MAX_BACKOFF)?;
        if r.backoff_max < backoff_base {
            return Err(self.invalid(
                "retry.backoff_max",
                "must not be shorter than retry.backoff_base",
            ));
        }
        Ok(RetryConfig {
            max_attempts,
            backoff_base,
            backoff_max: r.backoff_max,
        })
    }
}
