//! The configuration file: TOML -> validated, typed [`Config`].
//!
//! Parsing is strict (unknown keys are errors) and happens in two steps: serde reads the
//! file into the `*File` structs, then [`Config::from_file_str`] checks what serde cannot
//! (ranges, one auth mode per app, ...) and produces the types the rest of the daemon uses.
//! Every error names the file, the key and what is wrong. Secrets are held in [`Secret`],
//! whose `Debug` prints a mask, so a config can be logged whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// The environment variable that overrides `[database] url`.
pub const DATABASE_URL_ENV: &str = "PGPUSHD_DATABASE_URL";

/// A configuration problem, always naming the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub retry: RetryConfig,
    /// Keyed by the name rows carry in their `app` column.
    pub apps: BTreeMap<String, AppConfig>,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub daemon: DaemonConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// How long a stop waits for the batches in flight; keep it below systemd's
    /// `TimeoutStopSec`. Rows still unanswered then are released untouched.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `pgpushd=debug,info`, ...); `RUST_LOG` overrides it.
    pub level: String,
}

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
}

impl DatabaseConfig {
    /// The URL the listener connects to.
    pub fn listen_url(&self) -> &Secret<String> {
        self.listen_url.as_ref().unwrap_or(&self.url)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts (requests made) after which a transiently failing row becomes `failed`.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Sandbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http2,
    Binary,
}

/// Where an app's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Apple's servers for that environment and protocol.
    Apple(Environment),
    /// Any other host (an emulator, a gateway): `https://host:port` or `host:port`.
    Custom { host: String, port: u16 },
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    /// The bundle id; push types that need a suffix get it appended.
    pub topic: Option<String>,
    pub endpoint: Endpoint,
    /// An extra CA to trust (besides the system's) for the endpoint.
    pub ca_file: Option<PathBuf>,
    pub protocol: Protocol,
    /// Long-lived connections per app.
    pub connections: usize,
    /// Upper bound on one request, from write to answer.
    pub request_timeout: Duration,
    pub auth: Auth,
    /// What only the binary protocol has; the defaults (and unused) for HTTP/2 apps.
    pub binary: BinaryConfig,
}

/// Settings of the binary protocol (`protocol = "binary"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryConfig {
    /// The protocol never says "accepted": a notification counts as sent once this long
    /// has passed since it was written without an error packet naming it or one before it.
    /// Longer is safer against slow error packets, and makes every row wait that long.
    pub settle: Duration,
    /// The feedback service to poll for tokens APNs stopped delivering to; `None`: off.
    pub feedback: Option<FeedbackConfig>,
}

impl Default for BinaryConfig {
    fn default() -> Self {
        BinaryConfig {
            settle: defaults::binary_settle(),
            feedback: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackConfig {
    /// `Apple(env)`: feedback(.sandbox).push.apple.com:2196.
    pub endpoint: Endpoint,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub enum Auth {
    Token(TokenAuth),
    Certificate(CertificateAuth),
}

#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// The `.p8` file Apple hands out (a PKCS#8 P-256 private key).
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
}

#[derive(Debug, Clone)]
pub struct CertificateAuth {
    /// PEM (certificate + key, the key possibly encrypted) or PKCS#12.
    pub file: PathBuf,
    /// Holds the passphrase of the key or the .p12; a file so systemd credentials work.
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
}

// ---- the file, as serde reads it -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    database: DatabaseFile,
    #[serde(default)]
    retry: RetryFile,
    #[serde(default)]
    apps: BTreeMap<String, AppFile>,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    daemon: DaemonFile,
    #[serde(default)]
    log: LogFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonFile {
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    shutdown_timeout: Duration,
}

impl Default for DaemonFile {
    fn default() -> Self {
        DaemonFile {
            shutdown_timeout: defaults::shutdown_timeout(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFile {
    #[serde(default = "defaults::log_level")]
    level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: defaults::log_level(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseFile {
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    topic: Option<String>,
    environment: Option<Environment>,
    endpoint: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "defaults::protocol")]
    protocol: Protocol,
    #[serde(default = "defaults::connections")]
    connections: i64,
    #[serde(default = "defaults::request_timeout", with = "duration")]
    request_timeout: Duration,
    token: Option<TokenFile>,
    certificate: Option<CertificateFile>,
    #[serde(default, with = "optional_duration")]
    binary_settle: Option<Duration>,
    #[serde(default, with = "optional_duration")]
    feedback_interval: Option<Duration>,
    feedback_endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    key_file: PathBuf,
    key_id: String,
    team_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateFile {
    file: PathBuf,
    passphrase_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<String>,
}

mod defaults {
    use super::Protocol;
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
    pub fn max_attempts() -> i64 {
        8
    }
    pub fn backoff_base() -> Duration {
        Duration::from_secs(2)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn protocol() -> Protocol {
        Protocol::Http2
    }
    pub fn connections() -> i64 {
        2
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn binary_settle() -> Duration {
        Duration::from_millis(500)
    }
    pub fn feedback_interval() -> Duration {
        Duration::from_secs(3600)
    }
}

/// serde glue for humantime durations ("5s", "30m", "1h 30m").
mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (write it like \"5s\", \"250ms\", \"30m\")"
            ))
        })
    }
}

/// The same, for keys whose absence means something.
mod optional_duration {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

// ---- validation ------------------------------------------------------------------------

impl Config {
    /// Reads and validates the file at `path`; `PGPUSHD_DATABASE_URL` overrides the URL.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let url_override = std::env::var(DATABASE_URL_ENV)
            .ok()
            .filter(|u| !u.is_empty());
        Config::from_file_str(path, &text, url_override)
    }

    /// Parses `text` as if read from `path` (which only names the source in errors, and
    /// anchors relative file paths).
    pub fn from_file_str(
        path: &Path,
        text: &str,
        url_override: Option<String>,
    ) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        Validator { path }.config(file, url_override)
    }
}

/// `toml`'s message names the key; add the line so the user finds it.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message.to_owned(),
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn positive(&self, key: &str, value: i64, max: i64) -> Result<usize, ConfigError> {
        if value < 1 || value > max {
            return Err(self.invalid(key, format!("must be between 1 and {max}, not {value}")));
        }
        Ok(value as usize)
    }

    fn nonzero(&self, key: &str, value: Duration) -> Result<Duration, ConfigError> {
        if value.is_zero() {
            return Err(self.invalid(key, "must be longer than zero"));
        }
        Ok(value)
    }

    /// Relative paths in the file are relative to the file, not to the working directory.
    fn file_path(&self, p: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }

    fn config(&self, f: ConfigFile, url_override: Option<String>) -> Result<Config, ConfigError> {
        let apps = f
            .apps
            .into_iter()
            .map(|(name, app)| Ok((name.clone(), self.app(name, app)?)))
            .collect::<Result<_, ConfigError>>()?;
        Ok(Config {
            database: self.database(f.database, url_override)?,
            retry: self.retry(f.retry)?,
            apps,
            metrics: self.metrics(f.metrics)?,
            retention: self.retention(f.retention)?,
            daemon: DaemonConfig {
                shutdown_timeout: self
                    .nonzero("daemon.shutdown_timeout", f.daemon.shutdown_timeout)?,
            },
            log: self.log(f.log)?,
        })
    }

    fn log(&self, l: LogFile) -> Result<LogConfig, ConfigError> {
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

    fn database(
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
            poll_interval: self.nonzero("database.poll_interval", d.poll_interval)?,
            batch_size: self.positive("database.batch_size", d.batch_size, 10_000)?,
            max_batches_in_flight: self.positive(
                "database.max_batches_in_flight",
                d.max_batches_in_flight,
                64,
            )?,
            keepalive_interval: self
                .nonzero("database.keepalive_interval", d.keepalive_interval)?,
            connect_timeout: self.nonzero("database.connect_timeout", d.connect_timeout)?,
        })
    }

    fn retry(&self, r: RetryFile) -> Result<RetryConfig, ConfigError> {
        let max_attempts = self.positive("retry.max_attempts", r.max_attempts, 1_000)? as u32;
        let backoff_base = self.nonzero("retry.backoff_base", r.backoff_base)?;
        if r.backoff_max > Duration::from_secs(30 * 86_400) {
            return Err(self.invalid("retry.backoff_max", "must be at most 30 days"));
        }
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

    fn app(&self, name: String, a: AppFile) -> Result<AppConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        let endpoint =
            match (a.endpoint, a.environment) {
                (Some(_), Some(_)) => return Err(self.invalid(
                    key("endpoint"),
                    "set either environment (Apple's servers) or endpoint (another host), not both",
                )),
                (Some(e), None) => {
                    let (host, port) = parse_endpoint(&e, a.protocol)
                        .map_err(|m| self.invalid(key("endpoint"), m))?;
                    Endpoint::Custom { host, port }
                }
                (None, env) => Endpoint::Apple(env.unwrap_or(Environment::Production)),
            };
        let auth = match (a.token, a.certificate) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("apps.{name}"),
                    "has both [token] and [certificate]; choose one auth mode",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    format!("apps.{name}"),
                    format!(
                        "needs [apps.{name}.token] (key_file, key_id, team_id) \
                         or [apps.{name}.certificate] (file)"
                    ),
                ))
            }
            (Some(t), None) => {
                if a.protocol == Protocol::Binary {
                    return Err(self.invalid(
                        key("token"),
                        "the binary protocol only knows certificate auth; use [certificate]",
                    ));
                }
                for (k, v) in [("key_id", &t.key_id), ("team_id", &t.team_id)] {
                    if v.len() != 10 || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(self.invalid(
                            key(&format!("token.{k}")),
                            format!("{v:?} is not a 10-character Apple identifier"),
                        ));
                    }
                }
                Auth::Token(TokenAuth {
                    key_file: self.file_path(t.key_file),
                    key_id: t.key_id,
                    team_id: t.team_id,
                })
            }
            (None, Some(c)) => Auth::Certificate(CertificateAuth {
                file: self.file_path(c.file),
                passphrase_file: c.passphrase_file.map(|p| self.file_path(p)),
            }),
        };
        if let Some(t) = &a.topic {
            if t.is_empty() || t.contains(char::is_whitespace) {
                return Err(self.invalid(key("topic"), format!("{t:?} is not a bundle id")));
            }
        }
        let binary = self.binary(
            &name,
            a.protocol,
            BinaryKeys {
                settle: a.binary_settle,
                feedback_interval: a.feedback_interval,
                feedback_endpoint: a.feedback_endpoint,
            },
            &endpoint,
        )?;
        Ok(AppConfig {
            connections: self.positive(&key("connections"), a.connections, 64)?,
            request_timeout: self.nonzero(&key("request_timeout"), a.request_timeout)?,
            ca_file: a.ca_file.map(|p| self.file_path(p)),
            topic: a.topic,
            endpoint,
            protocol: a.protocol,
            auth,
            binary,
            name,
        })
    }

    /// The binary protocol's keys; an HTTP/2 app may not set them.
    fn binary(
        &self,
        name: &str,
        protocol: Protocol,
        a: BinaryKeys,
        endpoint: &Endpoint,
    ) -> Result<BinaryConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        if protocol != Protocol::Binary {
            let set = [
                ("binary_settle", a.settle.is_some()),
                ("feedback_interval", a.feedback_interval.is_some()),
                ("feedback_endpoint", a.feedback_endpoint.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, set)| *set) {
                return Err(self.invalid(key(k), "only applies to protocol = \"binary\""));
            }
            return Ok(BinaryConfig::default());
        }
        let settle = match a.settle {
            Some(s) => self.nonzero(&key("binary_settle"), s)?,
            None => defaults::binary_settle(),
        };
        let interval = a
            .feedback_interval
            .unwrap_or_else(defaults::feedback_interval);
        let feedback_endpoint = match (&a.feedback_endpoint, endpoint) {
            (Some(text), _) => {
                let (host, port) = parse_endpoint_with_port(text, FEEDBACK_PORT)
                    .map_err(|m| self.invalid(key("feedback_endpoint"), m))?;
                Endpoint::Custom { host, port }
            }
            (None, Endpoint::Apple(env)) => Endpoint::Apple(*env),
            // A gateway elsewhere (an emulator): its feedback service on Apple's port.
            (None, Endpoint::Custom { host, .. }) => Endpoint::Custom {
                host: host.clone(),
                port: FEEDBACK_PORT,
            },
        };
        Ok(BinaryConfig {
            settle,
            feedback: (!interval.is_zero()).then_some(FeedbackConfig {
                endpoint: feedback_endpoint,
                interval,
            }),
        })
    }

    fn metrics(&self, m: MetricsFile) -> Result<MetricsConfig, ConfigError> {
        let listen = m
            .listen
            .map(|l| {
                l.parse().map_err(|_| {
                    self.invalid(
                        "metrics.listen",
                        format!("{l:?} is not an address like 127.0.0.1:9187"),
                    )
                })
            })
            .transpose()?;
        Ok(MetricsConfig { listen })
    }
}

/// The binary protocol's keys of an `[apps.NAME]` section, as written.
struct BinaryKeys {
    settle: Option<Duration>,
    feedback_interval: Option<Duration>,
    feedback_endpoint: Option<String>,
}

/// The binary protocol's feedback service listens here on Apple's hosts.
pub const FEEDBACK_PORT: u16 = 2196;

/// `https://host:port`, `host:port` or `host` (default port by protocol).
fn parse_endpoint(text: &str, protocol: Protocol) -> Result<(String, u16), String> {
    let default_port = match protocol {
        Protocol::Http2 => 443,
        Protocol::Binary => 2195,
    };
    parse_endpoint_with_port(text, default_port)
}

fn parse_endpoint_with_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    let rest = text
        .strip_prefix("https://")
        .unwrap_or(text)
        .trim_end_matches('/');
    if rest.contains("://") || rest.contains('/') {
        return Err(format!("{text:?}: expected https://host:port or host:port"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (rest, default_port), // bare IPv6
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{text:?}: {p:?} is not a port"))?,
        ),
        None => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?}: no host"));
    }
    Ok((host.to_owned(), port))
}

// ---- [retention] ------------------------------------------------------------------------

/// `[retention]`: how long settled rows stay in the outbox. Each age is optional and
/// absent means "kept forever", the default: deleting is opt-in. Ages count from
/// `settled_at`, when the row became sent, failed or expired. Pending rows are never
/// deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionConfig {
    pub sent: Option<Duration>,
    pub failed: Option<Duration>,
    pub expired: Option<Duration>,
    /// How often a pass runs; each pass deletes everything due, batch by batch.
    pub interval: Duration,
    /// Rows per DELETE: each batch is its own short transaction.
    pub batch_size: usize,
}

impl RetentionConfig {
    /// Whether any age is set, i.e. whether there is anything to delete.
    pub fn is_enabled(&self) -> bool {
        self.sent.is_some() || self.failed.is_some() || self.expired.is_some()
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            sent: None,
            failed: None,
            expired: None,
            interval: Duration::from_secs(60),
            batch_size: 1000,
        }
    }
}

/// Beyond this an age cannot be turned into a PostgreSQL interval safely.
const MAX_RETENTION_AGE: Duration = Duration::from_secs(100 * 365 * 86_400);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    #[serde(default, deserialize_with = "optional_duration")]
    sent: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    failed: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    expired: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    interval: Option<Duration>,
    batch_size: Option<i64>,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

impl Validator<'_> {
    fn retention(&self, r: RetentionFile) -> Result<RetentionConfig, ConfigError> {
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
            interval: match r.interval {
                Some(i) => self.nonzero("retention.interval", i)?,
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
    use super::*;

    const MINIMAL: &str = r#"
[database]
url = "postgres://pgpushd:hunter2@localhost/app"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), text, None)
    }

    #[test]
    fn defaults_fill_what_is_missing() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.database.poll_interval, Duration::from_secs(5));
        assert_eq!(c.database.batch_size, 500);
        assert_eq!(c.database.max_batches_in_flight, 4);
        assert_eq!(c.retry.max_attempts, 8);
        assert_eq!(c.retry.backoff_max, Duration::from_secs(1800));
        assert!(c.apps.is_empty());
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(c.log.level, "info");
        let e = parse(&format!("{MINIMAL}[log]\nlevel = \"loud=???\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn the_design_example_parses() {
        let c = parse(
            r#"
[database]
url = "postgres://pgpushd@localhost/app"
poll_interval = "250ms"
batch_size = 100
max_batches_in_flight = 2

[retry]
max_attempts = 3
backoff_base = "1s"
backoff_max = "1m"

[apps.default]
topic = "com.example.app"
environment = "sandbox"
protocol = "http2"
connections = 3

[apps.default.token]
key_file = "AuthKey_ABC123DEFG.p8"
key_id = "ABC123DEFG"
team_id = "DEF123GHIJ"

[apps.other]
endpoint = "https://127.0.0.1:2197"
ca_file = "/tmp/ca.pem"
[apps.other.certificate]
file = "/etc/pgpushd/ck.pem"
passphrase_file = "ck.pass"

[metrics]
listen = "127.0.0.1:9187"
"#,
        )
        .unwrap();
        assert_eq!(c.database.poll_interval, Duration::from_millis(250));
        let app = &c.apps["default"];
        assert_eq!(app.endpoint, Endpoint::Apple(Environment::Sandbox));
        assert_eq!(app.connections, 3);
        match &app.auth {
            Auth::Token(t) => {
                assert_eq!(t.key_file, Path::new("/etc/pgpushd/AuthKey_ABC123DEFG.p8"))
            }
            other => panic!("{other:?}"),
        }
        let other = &c.apps["other"];
        assert_eq!(
            other.endpoint,
            Endpoint::Custom {
                host: "127.0.0.1".into(),
                port: 2197
            }
        );
        match &other.auth {
            Auth::Certificate(a) => {
                assert_eq!(
                    a.passphrase_file.as_deref(),
                    Some(Path::new("/etc/pgpushd/ck.pass"))
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.metrics.listen.unwrap().port(), 9187);
    }

    #[test]
    fn unknown_keys_are_rejected_with_file_and_line() {
        let e = parse("[database]\nurl = \"postgres://x@y/z\"\npoll_intervall = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/pgpushd/pgpushd.toml: line 3"), "{e}");
        assert!(e.contains("poll_intervall"), "{e}");
    }

    #[test]
    fn bad_durations_say_how_to_write_them() {
        let e = parse("[database]\nurl = \"postgres://x@y/z\"\npoll_interval = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration \"5\""), "{e}");
    }

    #[test]
    fn validation_errors_name_the_key() {
        let e = parse("[database]\nurl = \"postgres://x@y/z\"\nbatch_size = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/pgpushd/pgpushd.toml: database.batch_size: must be between 1 and 10000, not 0"
        );
        let e = parse(&format!("{MINIMAL}[apps.a]\ntopic = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.a: needs [apps.a.token]"), "{e}");
    }

    #[test]
    fn the_environment_overrides_the_url_and_the_url_is_masked() {
        let c = Config::from_file_str(
            Path::new("x.toml"),
            "[database]\n",
            Some("postgres://u:s3cret@h/d".into()),
        )
        .unwrap();
        assert_eq!(c.database.url.expose(), "postgres://u:s3cret@h/d");
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = parse("[database]\n").unwrap_err().to_string();
        assert!(e.contains("PGPUSHD_DATABASE_URL"), "{e}");
    }

    #[test]
    fn binary_apps_get_settle_and_feedback_defaults() {
        let cert = "[apps.{name}.certificate]\nfile = \"ck.pem\"\npassphrase_file = \"ck.pass\"\n";
        let app = |name: &str, body: &str| {
            format!("[apps.{name}]\n{body}\n{}", cert.replace("{name}", name))
        };
        let c = parse(&format!(
            "{MINIMAL}{}{}{}{}",
            app("apple", "protocol = \"binary\"\nenvironment = \"sandbox\""),
            app(
                "emu",
                "protocol = \"binary\"\nendpoint = \"127.0.0.1:12195\"\nbinary_settle = \"50ms\"\n\
                 feedback_interval = \"10s\""
            ),
            app(
                "elsewhere",
                "protocol = \"binary\"\nendpoint = \"gw.example.com\"\n\
                 feedback_endpoint = \"fb.example.com\""
            ),
            app("quiet", "protocol = \"binary\"\nfeedback_interval = \"0s\""),
        ))
        .unwrap();
        let apple = &c.apps["apple"];
        assert_eq!(apple.binary.settle, Duration::from_millis(500));
        assert_eq!(
            apple.binary.feedback,
            Some(FeedbackConfig {
                endpoint: Endpoint::Apple(Environment::Sandbox),
                interval: Duration::from_secs(3600),
            })
        );
        let emu = &c.apps["emu"];
        assert_eq!(
            emu.endpoint,
            Endpoint::Custom {
                host: "127.0.0.1".into(),
                port: 12195
            }
        );
        assert_eq!(emu.binary.settle, Duration::from_millis(50));
        assert_eq!(
            emu.binary.feedback,
            Some(FeedbackConfig {
                endpoint: Endpoint::Custom {
                    host: "127.0.0.1".into(),
                    port: 2196
                },
                interval: Duration::from_secs(10),
            })
        );
        let elsewhere = c.apps["elsewhere"].binary.feedback.as_ref().unwrap();
        assert_eq!(
            elsewhere.endpoint,
            Endpoint::Custom {
                host: "fb.example.com".into(),
                port: 2196
            }
        );
        assert_eq!(c.apps["quiet"].binary.feedback, None);
        match &apple.auth {
            Auth::Certificate(a) => assert_eq!(a.file, Path::new("/etc/pgpushd/ck.pem")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn binary_keys_are_refused_elsewhere() {
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nbinary_settle = \"1s\"\n[apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("apps.a.binary_settle: only applies to protocol = \"binary\""),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprotocol = \"binary\"\nbinary_settle = \"0s\"\n\
             [apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("apps.a.binary_settle: must be longer than zero"),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprotocol = \"binary\"\nfeedback_endpoint = \"x:y\"\n\
             [apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("apps.a.feedback_endpoint: "), "{e}");
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("https://localhost:2197", Protocol::Http2).unwrap(),
            ("localhost".into(), 2197)
        );
        assert_eq!(
            parse_endpoint("gw.example.com", Protocol::Binary).unwrap(),
            ("gw.example.com".into(), 2195)
        );
        assert!(parse_endpoint("https://x:99999", Protocol::Http2).is_err());
        assert!(parse_endpoint("http://x/y", Protocol::Http2).is_err());
    }

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
    fn retention_is_off_unless_an_age_is_set() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.retention, RetentionConfig::default());
        assert!(!c.retention.is_enabled());
        assert_eq!(c.retention.interval, Duration::from_secs(60));
        assert_eq!(c.retention.batch_size, 1000);
        let c = parse(&format!("{MINIMAL}[retention]\ninterval = \"5m\"\n")).unwrap();
        assert!(!c.retention.is_enabled());
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
