//! `[database]`: where the outbox is, and how hard the daemon works it.

use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::validate::{Validator, HOUR, MINUTE};
use super::{ConfigError, DATABASE_URL_ENV};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Holds a password more often than not, hence the mask.
    pub url: Secret<String>,
    /// A direct connection for LISTEN, for when `url` goes through a transaction pooler
    /// (PgBouncer drops LISTEN registrations between transactions).
    pub listen_url: Option<Secret<String>>,
    /// How often to look for due rows when no notification arrives: the safety net.
    pub poll_interval: Duration,
    pub batch_size: usize,
    /// Each batch in flight holds its own database connection and transaction.
    pub max_batches_in_flight: usize,
    /// How often the listener proves its connection alive; a half-open TCP connection
    /// would otherwise swallow notifications silently.
    pub keepalive_interval: Duration,
    /// Upper bound on connecting and on every maintenance query.
    pub connect_timeout: Duration,
    /// While awake, how often the daemon looks for new rows itself (writers skip NOTIFY
    /// then): the latency an awake daemon adds, at most.
    pub awake_poll_interval: Duration,
    /// The time over which the rate of rows found is averaged (see `awake_min_rate`); zero:
    /// never awake, writers always notify.
    pub awake_linger: Duration,
    /// Rows per second at which the daemon wakes (it sleeps again below half of it):
    /// below it, looking costs the database more per row than NOTIFY costs the writers.
    /// Zero: any row wakes it, and it sleeps after `awake_linger` without one.
    pub awake_min_rate: u32,
    /// The longest a batch may hold its transaction (claim to commit); past it the batch
    /// is abandoned: rolled back, its rows released untouched.
    pub max_batch_duration: Duration,
    /// PostgreSQL's `synchronous_commit` for the batches' transactions (one of
    /// [`SYNCHRONOUS_COMMIT`]): `off` lets an outcome's commit return before its WAL is
    /// flushed, so a database crash can forget the last fraction of a second's outcomes
    /// (their rows are sent again, as after a daemon crash) and the database flushes
    /// once for many outcomes instead of once per batch.
    pub synchronous_commit: &'static str,
    /// How long a batch whose rows are answered keeps its outcomes for the next claim,
    /// so that their UPDATE and COMMIT ride in the next claim's round trip (one round
    /// trip per batch instead of two). Zero: each batch commits at once. A row's `sent`
    /// is written up to this much later, and a daemon killed meanwhile sends those rows
    /// again (as any crash between an answer and the commit does).
    pub outcome_hold: Duration,
}

/// The values `synchronous_commit` takes, as PostgreSQL names them.
pub const SYNCHRONOUS_COMMIT: [&str; 5] = ["off", "local", "remote_write", "on", "remote_apply"];

impl DatabaseConfig {
    /// The URL the listener connects to.
    pub fn listen_url(&self) -> &Secret<String> {
        self.listen_url.as_ref().unwrap_or(&self.url)
    }

    /// What connecting will read from disk, checked now: each URL's root certificate
    /// file (`sslrootcert`, `PGSSLROOTCERT` or `~/.postgresql/root.crt`, as its `sslmode`
    /// needs). Loading the config reads no file, so `check-config` and `run` call this;
    /// each problem is `key: message`, the message naming the file.
    pub fn check_tls_files(&self) -> Vec<String> {
        [
            ("database.url", Some(&self.url)),
            ("database.listen_url", self.listen_url.as_ref()),
        ]
        .into_iter()
        .filter_map(|(key, url)| {
            let e = crate::db::check_tls_files(url?.expose()).err()?;
            Some(format!("{key}: {e:#}"))
        })
        .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DatabaseFile {
    url: Option<String>,
    listen_url: Option<String>,
    #[serde(default = "defaults::poll_interval", with = "duration")]
    poll_interval: Duration,
    #[serde(default = "defaults::batch_size")]
    batch_size: i64,
    #[serde(default = "defaults::max_batches_in_flight")]
    max_batches_in_flight: i64,
    #[serde(default = "defaults::keepalive_interval", with = "duration")]
    keepalive_interval: Duration,
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    connect_timeout: Duration,
    #[serde(default = "defaults::awake_poll_interval", with = "duration")]
    awake_poll_interval: Duration,
    #[serde(default = "defaults::awake_linger", with = "duration")]
    awake_linger: Duration,
    #[serde(default = "defaults::awake_min_rate")]
    awake_min_rate: i64,
    #[serde(default = "defaults::max_batch_duration", with = "duration")]
    max_batch_duration: Duration,
    #[serde(default = "defaults::synchronous_commit")]
    synchronous_commit: String,
    #[serde(default = "defaults::outcome_hold", with = "duration")]
    outcome_hold: Duration,
}

mod defaults {
    use std::time::Duration;

    pub fn poll_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn batch_size() -> i64 {
        500
    }
    pub fn max_batches_in_flight() -> i64 {
        4
    }
    pub fn keepalive_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn awake_poll_interval() -> Duration {
        Duration::from_millis(2)
    }
    pub fn awake_linger() -> Duration {
        Duration::from_secs(1)
    }
    pub fn awake_min_rate() -> i64 {
        200
    }
    pub fn max_batch_duration() -> Duration {
        Duration::from_secs(300)
    }
    pub fn synchronous_commit() -> String {
        "off".into()
    }
    pub fn outcome_hold() -> Duration {
        Duration::from_millis(250)
    }
}

/// The longest `outcome_hold`: the outcomes' rows stay locked and unwritten meanwhile.
const MAX_OUTCOME_HOLD: Duration = Duration::from_secs(1);

/// Looking more often than this costs the database more than any NOTIFY saves.
const MIN_AWAKE_POLL: Duration = Duration::from_millis(1);
/// Looking less often than this is sleeping: leave it to NOTIFY.
const MAX_AWAKE_POLL: Duration = Duration::from_secs(1);
/// Past what any one PostgreSQL commits in rows per second: a daemon that never wakes.
const MAX_AWAKE_MIN_RATE: u32 = 1_000_000;

impl Validator<'_> {
    /// `url_override` (from [`DATABASE_URL_ENV`]) wins over the file's `url`.
    pub(super) fn database(
        &self,
        d: DatabaseFile,
        url_override: Option<String>,
    ) -> Result<DatabaseConfig, ConfigError> {
        let url = url_override.or(d.url).ok_or_else(|| {
            self.invalid(
                "database.url",
                format!("missing (set it in the file or in {DATABASE_URL_ENV})"),
            )
        })?;
        for (key, u) in [
            ("database.url", Some(&url)),
            ("database.listen_url", d.listen_url.as_ref()),
        ] {
            if let Some(u) = u {
                // Parse now so a typo is a config error, not a reconnect loop. The
                // parser's message never echoes the password.
                crate::db::check_url(u)
                    .map_err(|e| self.invalid(key, format!("not a PostgreSQL URL: {e:#}")))?;
            }
        }
        Ok(DatabaseConfig {
            url: Secret::new(url),
            listen_url: d.listen_url.map(Secret::new),
            poll_interval: self.bounded("database.poll_interval", d.poll_interval, HOUR)?,
            batch_size: self.positive("database.batch_size", d.batch_size, 10_000)?,
            max_batches_in_flight: self.positive(
                "database.max_batches_in_flight",
                d.max_batches_in_flight,
                64,
            )?,
            keepalive_interval: self.bounded(
                "database.keepalive_interval",
                d.keepalive_interval,
                HOUR,
            )?,
            connect_timeout: self.bounded(
                "database.connect_timeout",
                d.connect_timeout,
                10 * MINUTE,
            )?,
            awake_poll_interval: match d.awake_poll_interval {
                short if short < MIN_AWAKE_POLL => {
                    return Err(self.invalid("database.awake_poll_interval", "must be at least 1ms"))
                }
                d => self.at_most("database.awake_poll_interval", d, MAX_AWAKE_POLL)?,
            },
            awake_linger: self.at_most("database.awake_linger", d.awake_linger, HOUR)?,
            awake_min_rate: match u32::try_from(d.awake_min_rate) {
                Ok(r) if r <= MAX_AWAKE_MIN_RATE => r,
                _ => {
                    return Err(self.invalid(
                        "database.awake_min_rate",
                        format!(
                            "must be between 0 and {MAX_AWAKE_MIN_RATE} rows per second, not {}",
                            d.awake_min_rate
                        ),
                    ))
                }
            },
            max_batch_duration: self.bounded(
                "database.max_batch_duration",
                d.max_batch_duration,
                HOUR,
            )?,
            outcome_hold: match self.at_most(
                "database.outcome_hold",
                d.outcome_hold,
                MAX_OUTCOME_HOLD,
            )? {
                hold if hold >= d.max_batch_duration && !hold.is_zero() => {
                    return Err(self.invalid(
                        "database.outcome_hold",
                        "must be shorter than max_batch_duration",
                    ))
                }
                hold => hold,
            },
            synchronous_commit: SYNCHRONOUS_COMMIT
                .into_iter()
                .find(|v| *v == d.synchronous_commit)
                .ok_or_else(|| {
                    self.invalid(
                        "database.synchronous_commit",
                        format!(
                            "must be one of {}, not {:?}",
                            SYNCHRONOUS_COMMIT.join(", "),
                            d.synchronous_commit
                        ),
                    )
                })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::parse;

    #[test]
    fn urls_with_libpqs_verifying_sslmodes_are_valid() {
        for mode in ["verify-ca", "verify-full"] {
            let text = format!("[database]\nurl = \"postgres://u@h/d?sslmode={mode}\"\n");
            assert!(parse(&text).is_ok(), "{mode}");
        }
        let e = parse("[database]\nurl = \"postgres://u@h/d?sslmode=maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("database.url") && e.contains("unknown sslmode"),
            "{e}"
        );
    }

    #[test]
    fn the_awake_keys_have_bounds() {
        let with = |keys: &str| parse(&format!("[database]\nurl = \"postgres://u@h/d\"\n{keys}\n"));
        let c = with("").unwrap();
        assert_eq!(
            c.database.awake_poll_interval,
            std::time::Duration::from_millis(2)
        );
        assert_eq!(c.database.awake_linger, std::time::Duration::from_secs(1));
        assert_eq!(c.database.awake_min_rate, 200);
        assert_eq!(c.database.synchronous_commit, "off");
        let on = with("synchronous_commit = \"remote_apply\"").unwrap();
        assert_eq!(on.database.synchronous_commit, "remote_apply");
        assert_eq!(
            with("awake_min_rate = 0").unwrap().database.awake_min_rate,
            0
        );
        assert!(with("awake_linger = \"0s\"")
            .unwrap()
            .database
            .awake_linger
            .is_zero());
        for (keys, message) in [
            ("awake_poll_interval = \"500us\"", "must be at least 1ms"),
            ("awake_poll_interval = \"2s\"", "must be at most 1s"),
            ("awake_linger = \"2h\"", "must be at most 1h"),
            (
                "awake_min_rate = -1",
                "must be between 0 and 1000000 rows per second",
            ),
            ("awake_min_rate = 1000001", "not 1000001"),
            (
                "synchronous_commit = \"maybe\"",
                "must be one of off, local, remote_write, on, remote_apply, not \"maybe\"",
            ),
            ("max_batch_duration = \"2h\"", "must be at most 1h"),
            ("max_batch_duration = \"0s\"", "must be longer than zero"),
        ] {
            let e = with(keys).unwrap_err().to_string();
            assert!(e.contains(message), "{keys}: {e}");
        }
    }
}
