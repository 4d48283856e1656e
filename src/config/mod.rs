//! The configuration file: TOML -> validated, typed [`Config`].
//!
//! Parsing is strict (unknown keys are errors) and happens in two steps: serde reads the
//! file into the `*File` structs, then [`Config::from_file_str`] checks what serde cannot
//! (ranges, one auth mode per app, ...) and produces the types the rest of the daemon uses.
//! Every error names the file, the key and what is wrong. Secrets are held in
//! [`Secret`](crate::secret::Secret), whose `Debug` prints a mask, so a config can be
//! logged whole.
//!
//! This file owns the whole: [`Config`], loading (with the environment's override of the
//! database URL), [`ConfigError`] and the description of TOML errors. Each section has
//! its own file holding its `*File` struct, its validated type and its checks:
//! `database`, `retry`, `apps` (`[apps.NAME]`, auth included), `network` (the proxy to
//! APNs, and how an app's is chosen), `metrics`, `retention`, `daemon`, `log`. What the
//! sections share is in `validate` (the `Validator`) and `duration` (durations as
//! written). What loading reads from the process's environment is [`EnvVars`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod apps;
mod daemon;
mod database;
mod duration;
mod fingerprint;
mod log;
mod metrics;
mod network;
mod retention;
mod retry;
mod validate;

pub use apps::{
    AppConfig, Auth, BinaryConfig, CertificateAuth, Endpoint, Environment, FcmAuth, FeedbackConfig,
    Protocol, Provider, TokenAuth, FCM_HOST, FEEDBACK_PORT,
};
pub use daemon::DaemonConfig;
pub use database::DatabaseConfig;
pub use fingerprint::Fingerprint;
pub use log::LogConfig;
pub use metrics::MetricsConfig;
pub use network::{NetworkConfig, ProxySetting, PROXY_NONE};
pub use retention::RetentionConfig;
pub use retry::RetryConfig;

use apps::AppFile;
use daemon::DaemonFile;
use database::DatabaseFile;
use log::LogFile;
use metrics::MetricsFile;
use network::NetworkFile;
use retention::RetentionFile;
use retry::RetryFile;
use validate::Validator;

use crate::secret::Secret;

/// The environment variable that overrides `[database] url`.
pub const DATABASE_URL_ENV: &str = "PGPUSHD_DATABASE_URL";

/// The proxy for APNs when the config names none, as curl reads them: the lower-case
/// name first.
pub const HTTPS_PROXY_ENV: [&str; 2] = ["https_proxy", "HTTPS_PROXY"];
/// The hosts reached directly despite [`HTTPS_PROXY_ENV`].
pub const NO_PROXY_ENV: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// What loading reads from the process's environment besides the file. No `Debug`: it
/// holds a database URL and a proxy URL, both of which may carry a password.
#[derive(Clone, Default)]
pub struct EnvVars {
    /// [`DATABASE_URL_ENV`], when set and not empty: overrides `[database] url`.
    pub database_url: Option<String>,
    /// The first of [`HTTPS_PROXY_ENV`] set and not empty: its name and value.
    pub https_proxy: Option<(&'static str, Secret<String>)>,
    /// The first of [`NO_PROXY_ENV`] set (empty counts: it says "none").
    pub no_proxy: Option<String>,
}

impl EnvVars {
    /// This process's.
    pub fn of_process() -> EnvVars {
        let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        EnvVars {
            database_url: set(DATABASE_URL_ENV),
            https_proxy: HTTPS_PROXY_ENV
                .iter()
                .find_map(|&name| Some((name, Secret::new(set(name)?)))),
            no_proxy: NO_PROXY_ENV
                .iter()
                .find_map(|name| std::env::var(name).ok()),
        }
    }
}

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
    /// Each app's proxy is resolved into its `AppConfig::proxy`; this is the section as
    /// written.
    pub network: NetworkConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub daemon: DaemonConfig,
    pub log: LogConfig,
}

/// The file, as serde reads it; `[database]` is the only section that must be there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    database: DatabaseFile,
    #[serde(default)]
    retry: RetryFile,
    #[serde(default)]
    apps: BTreeMap<String, AppFile>,
    #[serde(default)]
    network: NetworkFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    daemon: DaemonFile,
    #[serde(default)]
    log: LogFile,
}

impl Config {
    /// Reads and validates the file at `path`, with this process's [`EnvVars`]
    /// (`PGPUSHD_DATABASE_URL` overrides the URL; `HTTPS_PROXY` and `NO_PROXY` apply to
    /// apps for which the file names no proxy).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text, &EnvVars::of_process())
    }

    /// Parses `text` as if read from `path` (which only names the source in errors, and
    /// anchors relative file paths), in an environment that sets at most the database
    /// URL.
    pub fn from_file_str(
        path: &Path,
        text: &str,
        url_override: Option<String>,
    ) -> Result<Config, ConfigError> {
        let env = EnvVars {
            database_url: url_override,
            ..EnvVars::default()
        };
        Config::parse(path, text, &env)
    }

    /// Parses `text` as if read from `path`, in `env`.
    pub fn parse(path: &Path, text: &str, env: &EnvVars) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        Validator { path }.config(file, env)
    }
}

/// `toml`'s message does not always name the key (a value serde refused, like a
/// duration too large to represent): add the line, and the key when the error points
/// at a value, so the user finds it.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            match key_at(text, start) {
                Some(key) => format!("line {line}: {key}: {message}"),
                None => format!("line {line}: {message}"),
            }
        }
        None => message.to_owned(),
    }
}

/// `section.key` when `offset` is in the value of a `key = value` line, as far as a
/// line-by-line reading can tell (the last `[section]` header above it).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[line_start..offset].split_once('=')?;
    let key = key.trim();
    let is_bare_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    if !is_bare_key(key) {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        let name = l
            .strip_prefix('[')?
            .split(']')
            .next()?
            .trim_start_matches('[');
        Some(name.trim().to_owned())
    });
    Some(match section {
        Some(section) if !section.is_empty() => format!("{section}.{key}"),
        _ => key.to_owned(),
    })
}

impl Validator<'_> {
    fn config(&self, f: ConfigFile, env: &EnvVars) -> Result<Config, ConfigError> {
        let network = self.network(f.network)?;
        let apps = f
            .apps
            .into_iter()
            .map(|(name, app)| Ok((name.clone(), self.app(name, app, &network, env)?)))
            .collect::<Result<_, ConfigError>>()?;
        let database = self.database(f.database, env.database_url.clone())?;
        self.batch_outlives_requests(&database, &apps)?;
        Ok(Config {
            database,
            retry: self.retry(f.retry)?,
            apps,
            network,
            metrics: self.metrics(f.metrics)?,
            retention: self.retention(f.retention)?,
            daemon: self.daemon(f.daemon)?,
            log: self.log(f.log)?,
        })
    }
}

/// How many `request_timeout`s one row's send may take (see `batch_outlives_requests`).
const REQUESTS_PER_BATCH: u32 = 4;

impl Validator<'_> {
    /// A batch must outlive its rows' requests: one abandoned at `max_batch_duration`
    /// while a request may still be waiting on its `request_timeout` releases rows whose
    /// request went out, unanswered and without an attempt counted, to be sent again, and
    /// against a slow endpoint that loops for ever. One request may wait `request_timeout`
    /// for a stream and as long for its answer, and be sent twice within one row's send
    /// (a server's GOAWAY, a renewed FCM token): four times `request_timeout`.
    fn batch_outlives_requests(
        &self,
        database: &DatabaseConfig,
        apps: &BTreeMap<String, AppConfig>,
    ) -> Result<(), ConfigError> {
        let longest = apps
            .values()
            .max_by_key(|a| a.request_timeout)
            .filter(|a| database.max_batch_duration < REQUESTS_PER_BATCH * a.request_timeout);
        match longest {
            None => Ok(()),
            Some(app) => Err(self.invalid(
                "database.max_batch_duration",
                format!(
                    "must be at least {REQUESTS_PER_BATCH} times apps.{}.request_timeout ({}), \
                     not {}: a batch abandoned while its requests wait would send their rows \
                     again",
                    app.name,
                    humantime::format_duration(app.request_timeout),
                    humantime::format_duration(database.max_batch_duration),
                ),
            )),
        }
    }
}

/// What the sections' tests share: a file that parses, and parsing from a fixed path.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::{Config, ConfigError};

    pub(super) const MINIMAL: &str = r#"
[database]
url = "postgres://pgpushd:hunter2@localhost/app"
"#;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), text, None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::testing::{parse, MINIMAL};
    use super::*;

    #[test]
    fn a_batch_must_outlive_four_times_the_longest_request() {
        let with = |batch: &str, request: &str| {
            parse(&format!(
                "{MINIMAL}max_batch_duration = \"{batch}\"\n\
                 [apps.slow]\ntopic = \"com.example\"\nrequest_timeout = \"{request}\"\n\
                 [apps.slow.token]\nkey_file = \"/k.p8\"\nkey_id = \"ABCDEFGHIJ\"\nteam_id = \"KLMNOPQRST\"\n"
            ))
        };
        if let Err(e) = with("4m", "60s") {
            panic!("{e}");
        }
        let e = with("30s", "60s").unwrap_err().to_string();
        assert!(
            e.contains("database.max_batch_duration")
                && e.contains("apps.slow.request_timeout (1m)")
                && e.contains("not 30s"),
            "{e}"
        );
        assert!(with("2m", "31s").is_err());
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
}
