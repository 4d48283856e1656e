//! The [`Validator`]: what every section's checks share (the file's path for errors,
//! range checks, relative paths).
//!
//! Each section adds its own `impl Validator` block in its file; this one holds only what
//! more than one section needs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;

pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);

/// Turns the `*File` structs serde read into the validated types. Holds the file's path
/// so every error can name it.
pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
}

impl Validator<'_> {
    pub(super) fn invalid(
        &self,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub(super) fn positive(&self, key: &str, value: i64, max: i64) -> Result<usize, ConfigError> {
        if value < 1 || value > max {
            return Err(self.invalid(key, format!("must be between 1 and {max}, not {value}")));
        }
        Ok(value as usize)
    }

    pub(super) fn nonzero(&self, key: &str, value: Duration) -> Result<Duration, ConfigError> {
        if value.is_zero() {
            return Err(self.invalid(key, "must be longer than zero"));
        }
        Ok(value)
    }

    /// A duration longer than zero and at most `max`. Every duration key has such a
    /// bound: past it a value is an operator's mistake, and far past it (years) the
    /// daemon's arithmetic (`Instant + d`, `sleep(d)`, `d * 2`) would overflow.
    pub(super) fn bounded(
        &self,
        key: &str,
        value: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let value = self.nonzero(key, value)?;
        self.at_most(key, value, max)
    }

    /// `value`, unless it is longer than `max`.
    pub(super) fn at_most(
        &self,
        key: &str,
        value: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        if value > max {
            return Err(self.invalid(
                key,
                format!(
                    "must be at most {}, not {}",
                    humantime::format_duration(max),
                    humantime::format_duration(value)
                ),
            ));
        }
        Ok(value)
    }

    /// Relative paths in the file are relative to the file, not to the working directory.
    pub(super) fn file_path(&self, p: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }
}
