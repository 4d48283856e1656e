//! `[daemon]`: the process itself (how it stops).

use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::validate::{Validator, HOUR};
use super::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// How long a stop waits for the batches in flight; keep it below systemd's
    /// `TimeoutStopSec`. Rows still unanswered then are released untouched.
    pub shutdown_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DaemonFile {
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    shutdown_timeout: Duration,
}

impl Default for DaemonFile {
    fn default() -> Self {
        DaemonFile {
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(20)
}

impl Validator<'_> {
    pub(super) fn daemon(&self, d: DaemonFile) -> Result<DaemonConfig, ConfigError> {
        Ok(DaemonConfig {
            shutdown_timeout: self.bounded("daemon.shutdown_timeout", d.shutdown_timeout, HOUR)?,
        })
    }
}
