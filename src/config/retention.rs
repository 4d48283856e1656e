//! `[retention]`: how long settled rows stay in the outbox before they are deleted, and
//! ended broadcast channels in `pgpushd.channels`.

use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::validate::{Validator, DAY};
use super::ConfigError;

/// `[retention]`: how long settled rows stay in the outbox. Each age is optional and
/// absent means "kept forever", the default: deleting is opt-in. Ages count from
/// `settled_at`, when the row became sent, failed or expired. Pending rows are never
/// deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionConfig {
    pub sent: Option<Duration>,
    pub failed: Option<Duration>,
    pub expired: Option<Duration>,
    /// How long a broadcast channel stays in `pgpushd.channels` once it has ended: closed
    /// (deleted at APNs) since, or failed without ever being created (from its creation).
    pub channels: Option<Duration>,
    /// How often a pass runs; each pass deletes everything due, batch by batch.
    pub interval: Duration,
    /// Rows per DELETE: each batch is its own short transaction.
    pub batch_size: usize,
}

impl RetentionConfig {
    /// Whether any age is set, i.e. whether there is anything to delete.
    pub fn is_enabled(&self) -> bool {
        self.sent.is_some()
            || self.failed.is_some()
            || self.expired.is_some()
            || self.channels.is_some()
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            sent: None,
            failed: None,
            expired: None,
            channels: None,
            interval: Duration::from_secs(60),
            batch_size: 1000,
        }
    }
}

/// Beyond this an age cannot be turned into a PostgreSQL interval safely.
const MAX_RETENTION_AGE: Duration = Duration::from_secs(100 * 365 * 86_400);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RetentionFile {
    #[serde(default, with = "duration::optional")]
    sent: Option<Duration>,
    #[serde(default, with = "duration::optional")]
    failed: Option<Duration>,
    #[serde(default, with = "duration::optional")]
    expired: Option<Duration>,
    #[serde(default, with = "duration::optional")]
    channels: Option<Duration>,
    #[serde(default, with = "duration::optional")]
    interval: Option<Duration>,
    batch_size: Option<i64>,
}

impl Validator<'_> {
    pub(super) fn retention(&self, r: RetentionFile) -> Result<RetentionConfig, ConfigError> {
        let default = RetentionConfig::default();
        let age = |key: &str, value: Option<Duration>| {
            let key = format!("retention.{key}");
            value
                .map(|v| match self.nonzero(&key, v)? {
                    v if v > MAX_RETENTION_AGE => Err(self.invalid(
                        &key,
                        "must be at most 100 years (to keep rows forever, leave it out)",
                    )),
                    v => Ok(v),
                })
                .transpose()
        };
        Ok(RetentionConfig {
            sent: age("sent", r.sent)?,
            failed: age("failed", r.failed)?,
            expired: age("expired", r.expired)?,
            channels: age("channels", r.channels)?,
            interval: match r.interval {
                Some(i) => self.bounded("retention.interval", i, DAY)?,
                None => default.interval,
            },
            batch_size: match r.batch_size {
                Some(n) => self.positive("retention.batch_size", n, 100_000)?,
                None => default.batch_size,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parse, MINIMAL};
    use super::*;

    #[test]
    fn retention_is_off_unless_an_age_is_set() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.retention, RetentionConfig::default());
        assert!(!c.retention.is_enabled());
        assert_eq!(c.retention.interval, Duration::from_secs(60));
        assert_eq!(c.retention.batch_size, 1000);
        let c = parse(&format!("{MINIMAL}[retention]\ninterval = \"5m\"\n")).unwrap();
        assert!(!c.retention.is_enabled());
        // Ended channels alone are something to delete.
        let c = parse(&format!("{MINIMAL}[retention]\nchannels = \"90d\"\n")).unwrap();
        assert!(c.retention.is_enabled());
        assert_eq!(c.retention.channels, Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn retention_ages_are_each_optional() {
        let c = parse(&format!(
            "{MINIMAL}[retention]\nsent = \"7d\"\nexpired = \"1h 30m\"\n\
             interval = \"30s\"\nbatch_size = 250\n"
        ))
        .unwrap();
        let r = &c.retention;
        assert!(r.is_enabled());
        assert_eq!(r.channels, None);
        assert_eq!(r.sent, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(r.failed, None);
        assert_eq!(r.expired, Some(Duration::from_secs(5400)));
        assert_eq!(r.interval, Duration::from_secs(30));
        assert_eq!(r.batch_size, 250);
    }

    #[test]
    fn bad_retention_keys_name_file_and_key() {
        let err = |body: &str| {
            parse(&format!("{MINIMAL}[retention]\n{body}\n"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("failed = \"0s\""),
            "/etc/pgpushd/pgpushd.toml: retention.failed: must be longer than zero"
        );
        assert_eq!(
            err("interval = \"0s\""),
            "/etc/pgpushd/pgpushd.toml: retention.interval: must be longer than zero"
        );
        assert_eq!(
            err("batch_size = 0"),
            "/etc/pgpushd/pgpushd.toml: retention.batch_size: must be between 1 and 100000, not 0"
        );
        assert!(err("sent = \"200y\"").contains("retention.sent: must be at most 100 years"));
        let e = err("sent = \"a week\"");
        assert!(e.starts_with("/etc/pgpushd/pgpushd.toml: line 5"), "{e}");
        assert!(e.contains("invalid duration \"a week\""), "{e}");
        let e = err("pending = \"1d\"");
        assert!(e.contains("line 5") && e.contains("pending"), "{e}");
    }
}
