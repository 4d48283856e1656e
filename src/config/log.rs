//! `[log]`: the log filter.

use serde::Deserialize;

use super::validate::Validator;
use super::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `pgpushd=debug,info`, ...); `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogFile {
    #[serde(default = "default_level")]
    level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

impl Validator<'_> {
    /// Checked here so a typo fails at start-up (and `check-config`), not silently at
    /// logging set-up.
    pub(super) fn log(&self, l: LogFile) -> Result<LogConfig, ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&l.level).map_err(|e| {
            self.invalid(
                "log.level",
                format!(
                    "{:?} is not a log filter (like \"info\" or \"pgpushd=debug,warn\"): {e}",
                    l.level
                ),
            )
        })?;
        Ok(LogConfig { level: l.level })
    }
}
