//! Connecting to PostgreSQL: one place that turns a URL into a connected client, with TLS
//! as the URL's `sslmode` asks and keepalives on both ends of the connection.
//!
//! tokio-postgres itself knows `disable`, `prefer` and `require`; pgpushd reads libpq's
//! `sslmode` and `sslrootcert` itself (from the URL, else `PGSSLMODE` and
//! `PGSSLROOTCERT`), so the same URL that works for `psql` works here, with the same
//! meaning:
//! - `disable`: no TLS;
//! - `allow`, `prefer` (the default): TLS when the server offers it, its certificate not
//!   checked;
//! - `require`: TLS, and when a root file is there (`sslrootcert`, else
//!   `~/.postgresql/root.crt`) the chain is checked against it, as `verify-ca`;
//! - `verify-ca`: the chain, `verify-full`: the chain and the host name, checked against
//!   the root file ONLY (`sslrootcert`, else `~/.postgresql/root.crt`, which must exist),
//!   or the system's roots with `sslrootcert=system` (which implies `verify-full` and
//!   refuses anything weaker).
//!
//! A root file is a bundle: every certificate in it is trusted. A root file the URL (or
//! `PGSSLROOTCERT`) names must be readable: [`check_tls_files`] says so before the daemon
//! starts, rather than in a reconnect loop.
//!
//! Keepalives: the client's socket probes an idle connection (30 s, then every 10 s,
//! three times; a 60 s `tcp_user_timeout`), and the server is asked through the startup
//! `options` to do the same (`tcp_keepalives_*`), so that a daemon whose host vanished
//! loses its backends, its transactions and their row locks within about a minute.
//!
//! Bounds: a statement the client stops waiting for goes on running on the server (a
//! backend notices its client is gone only when it next reads or writes), holding its
//! snapshot and locks, and may still take effect after the client moved on.
//! [`Canceller::within`] bounds a statement on both ends: when the client's time is up it
//! asks the server to cancel the statement, as `psql`'s Ctrl-C does. Drop the connection
//! afterwards: a cancel that arrives late would hit its next statement.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::future::Future;

use anyhow::Context as _;
use native_tls::{Certificate, TlsConnector};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::{CancelToken, Client};

use crate::secret::Secret;

/// Idle time before the first keepalive probe, on both ends.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Time between unanswered probes.
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the connection is dead: 30 s + 3 × 10 s = one minute.
pub const KEEPALIVES_COUNT: u32 = 3;

/// The startup `options` that set the server's keepalives; the URL's own `options` come
/// after them, so a URL that sets `tcp_keepalives_*` itself wins.
fn server_keepalive_options() -> String {
    format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
        KEEPALIVES_IDLE.as_secs(),
        KEEPALIVES_INTERVAL.as_secs(),
        KEEPALIVES_COUNT
    )
}

/// What libpq would read besides the URL: `PGSSLMODE`, `PGSSLROOTCERT` and the home
/// directory (for `~/.postgresql/root.crt`). A parameter so tests need not touch the
/// process's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgEnv {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub home: Option<PathBuf>,
}

impl PgEnv {
    /// This process's: the variables when set and not empty; `HOME`, else the user's
    /// home directory from the password database (as libpq does).
    pub fn from_process() -> PgEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from).or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::Uid::effective())
                .ok()
                .flatten()
                .map(|u| u.dir)
        });
        PgEnv {
            sslmode: var("PGSSLMODE"),
            sslrootcert: var("PGSSLROOTCERT"),
            home,
        }
    }

    /// libpq's default root file, `~/.postgresql/root.crt`.
    fn default_root_file(&self) -> Option<PathBuf> {
        self.home
            .as_ref()
            .map(|h| h.join(".postgresql").join("root.crt"))
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Not at all (`allow`, `prefer`, `require` without a root file).
    None,
    /// The chain (`verify-ca`, `require` with a root file).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// What the server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// Nothing is checked.
    Unchecked,
    /// `sslrootcert=system`: the system's (OpenSSL's) roots.
    System,
    /// Only the certificates in this file. `optional`: a missing file means no check
    /// (`require` with libpq's default file); otherwise a missing file is an error.
    File { path: PathBuf, optional: bool },
}

/// The TLS half of a URL, resolved as libpq resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsPlan {
    /// What tokio-postgres is told: `disable`, `prefer` or `require`.
    driver_mode: &'static str,
    verify: Verify,
    roots: Roots,
}

/// The URL's `sslmode`/`sslrootcert`, else the environment's, turned into a plan. Reads no
/// file.
fn tls_plan(
    sslmode: Option<&str>,
    sslrootcert: Option<&str>,
    env: &PgEnv,
) -> anyhow::Result<TlsPlan> {
    let rootcert = sslrootcert.or(env.sslrootcert.as_deref());
    let system = rootcert == Some("system");
    // libpq: with sslrootcert=system the default sslmode is verify-full.
    let default_mode = if system { "verify-full" } else { "prefer" };
    let mode = sslmode.or(env.sslmode.as_deref()).unwrap_or(default_mode);
    if system && mode != "verify-full" {
        anyhow::bail!(
            "weak sslmode {mode:?} may not be used with sslrootcert=system (use \"verify-full\"): \
             anyone can get a certificate the system trusts for a host name they control"
        );
    }
    let root_file = || match rootcert {
        Some(path) => Some((PathBuf::from(path), false)),
        None => env.default_root_file().map(|p| (p, true)),
    };
    let verifying = |verify: Verify| -> anyhow::Result<TlsPlan> {
        let roots = if system {
            Roots::System
        } else {
            match root_file() {
                Some((path, _)) => Roots::File {
                    path,
                    optional: false,
                },
                None => anyhow::bail!(
                    "sslmode={mode} needs a root certificate file, and there is no sslrootcert \
                     and no home directory for ~/.postgresql/root.crt: give sslrootcert=FILE, \
                     or sslrootcert=system for the system's roots"
                ),
            }
        };
        Ok(TlsPlan {
            driver_mode: "require",
            verify,
            roots,
        })
    };
    Ok(match mode {
        "disable" => TlsPlan {
            driver_mode: "disable",
            verify: Verify::None,
            roots: Roots::Unchecked,
        },
        "allow" | "prefer" => TlsPlan {
            driver_mode: "prefer",
            verify: Verify::None,
            roots: Roots::Unchecked,
        },
        // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
        // same as that of verify-ca".
        "require" => match root_file() {
            Some((path, optional)) => TlsPlan {
                driver_mode: "require",
                verify: Verify::Chain,
                roots: Roots::File { path, optional },
            },
            None => TlsPlan {
                driver_mode: "require",
                verify: Verify::None,
                roots: Roots::Unchecked,
            },
        },
        "verify-ca" => verifying(Verify::Chain)?,
        "verify-full" => verifying(Verify::Full)?,
        other => anyhow::bail!("unknown sslmode {other:?}"),
    })
}

/// The TLS connector for a plan: reads the root file.
fn tls_connector(plan: &TlsPlan) -> anyhow::Result<MakeTlsConnector> {
    let mut builder = TlsConnector::builder();
    let mut verify = plan.verify;
    match &plan.roots {
        Roots::Unchecked => verify = Verify::None,
        Roots::System => {}
        Roots::File { path, optional } => match std::fs::read(path) {
            Ok(pem) => {
                let certs = read_bundle(path, &pem)?;
                // Only this file: not the system's roots besides.
                builder.disable_built_in_roots(true);
                for cert in certs {
                    builder.add_root_certificate(cert);
                }
            }
            Err(e) if *optional && e.kind() == std::io::ErrorKind::NotFound => {
                verify = Verify::None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!(
                    "root certificate file {} does not exist: give the file, use the \
                     system's roots with sslrootcert=system, or change sslmode to one that \
                     does not check the server's certificate",
                    path.display()
                )
            }
            Err(e) => anyhow::bail!("sslrootcert {}: cannot read: {e}", path.display()),
        },
    }
    match verify {
        Verify::None => {
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        Verify::Chain => {
            builder.danger_accept_invalid_hostnames(true);
        }
        Verify::Full => {}
    }
    let connector = builder.build().context("TLS set-up for PostgreSQL")?;
    Ok(MakeTlsConnector::new(connector))
}

/// Every certificate in a PEM bundle.
fn read_bundle(path: &Path, pem: &[u8]) -> anyhow::Result<Vec<Certificate>> {
    let certs = Certificate::stack_from_pem(pem).map_err(|e| {
        anyhow::anyhow!("sslrootcert {}: not PEM certificates: {e}", path.display())
    })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "sslrootcert {}: holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// A URL with libpq's TLS options taken out: the driver's config, and the TLS plan.
struct Parsed {
    config: tokio_postgres::Config,
    tls: TlsPlan,
}

/// Parses a URL as connecting reads it; reads no file.
fn parse(url: &str, env: &PgEnv) -> anyhow::Result<Parsed> {
    let (rest, sslmode, rootcert) = take_tls_options(url);
    let tls = tls_plan(sslmode.as_deref(), rootcert.as_deref(), env)?;
    let config: tokio_postgres::Config = with_sslmode(&rest, tls.driver_mode)
        .parse()
        .context("the database URL is not valid")?;
    Ok(Parsed { config, tls })
}

/// A URL turned into a driver config (timeouts, keepalives, name) and a TLS connector.
struct Target {
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
}

fn target(url: &str, connect_timeout: Duration, role: &str, env: &PgEnv) -> anyhow::Result<Target> {
    let Parsed { mut config, tls } = parse(url, env)?;
    config
        .connect_timeout(connect_timeout)
        .keepalives(true)
        .keepalives_idle(KEEPALIVES_IDLE)
        .keepalives_interval(KEEPALIVES_INTERVAL)
        .keepalives_retries(KEEPALIVES_COUNT)
        // A connection whose peer vanished (failover, NAT state dropped) fails within a
        // minute instead of the kernel's ~15 minutes of retransmissions.
        .tcp_user_timeout(Duration::from_secs(60));
    // The server's end: without these a backend whose client vanished keeps its
    // transaction, and the rows it locked, for the kernel's ~2 hours of silence.
    let options = match config.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{} {own}", server_keepalive_options()),
        _ => server_keepalive_options(),
    };
    config.options(&options);
    // Names the connection in pg_stat_activity: "pgpushd-listener", "pgpushd-batch", ...
    if config.get_application_name().is_none() {
        config.application_name(format!("pgpushd-{role}"));
    }
    let tls = tls_connector(&tls)?;
    Ok(Target { config, tls })
}

/// Checks a database URL as connecting will read it (libpq's `sslmode` and
/// `sslrootcert`, with `PGSSLMODE` and `PGSSLROOTCERT` from this process), without
/// connecting or reading any file.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    check_url_with(url, &PgEnv::from_process())
}

/// [`check_url`] with the given environment.
pub fn check_url_with(url: &str, env: &PgEnv) -> anyhow::Result<()> {
    parse(url, env).map(|_| ())
}

/// Checks what connecting will read from disk: the root certificate file, when the URL's
/// `sslmode` needs it, exists and holds certificates. Errors name the file.
pub fn check_tls_files(url: &str) -> anyhow::Result<()> {
    check_tls_files_with(url, &PgEnv::from_process())
}

/// [`check_tls_files`] with the given environment.
pub fn check_tls_files_with(url: &str, env: &PgEnv) -> anyhow::Result<()> {
    tls_connector(&parse(url, env)?.tls).map(|_| ())
}

/// Splits `sslmode` and `sslrootcert` out of a URL (`postgres://...?sslmode=...`) or a
/// key/value connection string (`host=... sslmode=...`).
fn take_tls_options(url: &str) -> (String, Option<String>, Option<String>) {
    let mut sslmode = None;
    let mut rootcert = None;
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            sslmode = Some(value.to_owned());
            true
        }
        "sslrootcert" => {
            rootcert = Some(value.to_owned());
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim().trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, sslmode, rootcert)
}

fn with_sslmode(rest: &str, mode: &str) -> String {
    if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("{rest}{sep}sslmode={mode}")
    } else {
        format!("{rest} sslmode={mode}")
    }
}

/// Connects and spawns the connection's driver; for connections that need no
/// notifications (the listener drives its own, see `listener`).
pub async fn connect(
    url: &Secret<String>,
    connect_timeout: Duration,
    role: &str,
) -> anyhow::Result<Client> {
    connect_with(url, connect_timeout, role, &PgEnv::from_process()).await
}

/// [`connect`] with the given environment instead of this process's.
pub async fn connect_with(
    url: &Secret<String>,
    connect_timeout: Duration,
    role: &str,
    env: &PgEnv,
) -> anyhow::Result<Client> {
    let (client, connection) = connect_raw_with(url, connect_timeout, role, env).await?;
    spawn(connection);
    Ok(client)
}

/// [`connect`], with the [`Canceller`] of the connection's statements.
pub async fn connect_cancellable(
    url: &Secret<String>,
    connect_timeout: Duration,
    role: &str,
) -> anyhow::Result<(Client, Canceller)> {
    let env = PgEnv::from_process();
    let Target { config, tls } = target(url.expose(), connect_timeout, role, &env)?;
    let (client, connection) = handshake(&config, tls.clone(), connect_timeout).await?;
    spawn(connection);
    let canceller = Canceller {
        token: client.cancel_token(),
        tls,
        connect_timeout,
    };
    Ok((client, canceller))
}

fn spawn(connection: Connection) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
}

/// Cancels the statement a connection is running, from outside: its cancel key, sent to
/// the server on a connection of its own (TLS as the URL says, as for connecting), as
/// `psql`'s Ctrl-C does. The server then ends the statement at its next check for
/// interrupts, a lock wait included, and its transaction's snapshot and locks with it; a
/// stopped backend ends it as soon as it runs again. A backend between statements ignores
/// a cancel.
#[derive(Clone)]
pub struct Canceller {
    token: CancelToken,
    tls: MakeTlsConnector,
    /// Bounds the cancel request's own connection.
    connect_timeout: Duration,
}

/// [`Canceller::within`]: the statement did not finish in time (and was cancelled, or
/// the server could not be told).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no answer within {}", humantime::format_duration(*.0))]
pub struct NoAnswer(pub Duration);

impl Canceller {
    /// Runs `statement` (any future of the connection's statements: one, or a whole
    /// transaction) for at most `timeout`. When the time is up, the server is asked to
    /// cancel it before this returns (waiting at most `connect_timeout` more for that),
    /// so that nothing goes on running there after the client gave up: a scan holding its
    /// snapshot, a write that would land after the caller moved on. Then drop the
    /// connection (the cancel may land late, on whatever it runs next).
    pub async fn within<F: Future>(
        &self,
        timeout: Duration,
        statement: F,
    ) -> Result<F::Output, NoAnswer> {
        match tokio::time::timeout(timeout, statement).await {
            Ok(output) => Ok(output),
            Err(_) => {
                self.cancel().await;
                Err(NoAnswer(timeout))
            }
        }
    }

    /// Asks the server to cancel what the connection is running; logs (at debug) when
    /// the server cannot be told.
    pub async fn cancel(&self) {
        let request = self.token.cancel_query(self.tls.clone());
        match tokio::time::timeout(self.connect_timeout * 2, request).await {
            Ok(Ok(())) => tracing::debug!("asked the server to cancel a statement"),
            Ok(Err(e)) => tracing::debug!(error = %describe(&e), "cannot cancel a statement"),
            Err(_) => tracing::debug!("cannot cancel a statement: no answer"),
        }
    }
}

/// The connection future of [`connect_raw`]; poll it (or `poll_message` it) to make
/// progress.
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    postgres_native_tls::TlsStream<tokio_postgres::Socket>,
>;

/// Connects without spawning the connection future. `role` names the connection
/// (`application_name` = `pgpushd-<role>`) unless the URL sets a name.
pub async fn connect_raw(
    url: &Secret<String>,
    connect_timeout: Duration,
    role: &str,
) -> anyhow::Result<(Client, Connection)> {
    connect_raw_with(url, connect_timeout, role, &PgEnv::from_process()).await
}

async fn connect_raw_with(
    url: &Secret<String>,
    connect_timeout: Duration,
    role: &str,
    env: &PgEnv,
) -> anyhow::Result<(Client, Connection)> {
    let Target { config, tls } = target(url.expose(), connect_timeout, role, env)?;
    handshake(&config, tls, connect_timeout).await
}

async fn handshake(
    config: &tokio_postgres::Config,
    tls: MakeTlsConnector,
    connect_timeout: Duration,
) -> anyhow::Result<(Client, Connection)> {
    // connect_timeout bounds each address tried; bound the whole handshake too.
    tokio::time::timeout(connect_timeout * 2, config.connect(tls))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL timed out"))?
        .map_err(|e| anyhow::anyhow!("connecting to PostgreSQL: {}", describe(&e)))
}

/// A driver error with its cause (tokio-postgres's Display alone often says only "db
/// error"), never the URL.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_out_of_urls() {
        let (rest, mode, root) =
            take_tls_options("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&x=1");
        assert_eq!(rest, "postgres://u@h/db?x=1");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        let (rest, mode, _) = take_tls_options("postgres://u@h/db?sslmode=disable");
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(
            with_sslmode(&rest, "disable"),
            "postgres://u@h/db?sslmode=disable"
        );
        assert_eq!(mode.as_deref(), Some("disable"));
        let (rest, mode, _) = take_tls_options("host=h user=u sslmode=require dbname=d");
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(mode.as_deref(), Some("require"));
    }

    fn env(home: Option<&str>) -> PgEnv {
        PgEnv {
            sslmode: None,
            sslrootcert: None,
            home: home.map(PathBuf::from),
        }
    }

    fn plan(url: &str, env: &PgEnv) -> anyhow::Result<TlsPlan> {
        parse(url, env).map(|p| p.tls)
    }

    fn file(path: &str, optional: bool) -> Roots {
        Roots::File {
            path: PathBuf::from(path),
            optional,
        }
    }

    #[test]
    fn every_libpq_sslmode_is_understood() {
        let home = env(Some("/home/p"));
        for mode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let url = format!("postgres://u@h/db?sslmode={mode}");
            assert!(check_url_with(&url, &home).is_ok(), "{mode}");
        }
        assert!(check_url_with(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem",
            &home
        )
        .is_ok());
        assert!(check_url_with("host=h sslmode=verify-ca dbname=d", &home).is_ok());
        let e = check_url_with("postgres://u@h/db?sslmode=sometimes", &home).unwrap_err();
        assert!(e.to_string().contains("unknown sslmode"), "{e}");
    }

    #[test]
    fn verifying_modes_trust_only_the_root_file() {
        let home = env(Some("/home/p"));
        let p = plan(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=/ca.pem",
            &home,
        )
        .unwrap();
        assert_eq!((p.verify, p.roots), (Verify::Chain, file("/ca.pem", false)));
        // No sslrootcert: libpq's default file, which must then exist.
        let p = plan("postgres://u@h/db?sslmode=verify-full", &home).unwrap();
        assert_eq!(
            (p.verify, p.roots),
            (Verify::Full, file("/home/p/.postgresql/root.crt", false))
        );
        let e = plan("postgres://u@h/db?sslmode=verify-full", &env(None)).unwrap_err();
        assert!(e.to_string().contains("sslrootcert=system"), "{e}");
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_nothing_weaker() {
        let home = env(Some("/home/p"));
        let p = plan("postgres://u@h/db?sslrootcert=system", &home).unwrap();
        assert_eq!((p.verify, p.roots), (Verify::Full, Roots::System));
        let p = plan(
            "postgres://u@h/db?sslrootcert=system&sslmode=verify-full",
            &home,
        )
        .unwrap();
        assert_eq!((p.verify, p.roots), (Verify::Full, Roots::System));
        for weak in ["verify-ca", "require", "prefer", "disable"] {
            let url = format!("postgres://u@h/db?sslrootcert=system&sslmode={weak}");
            let e = plan(&url, &home).unwrap_err();
            assert!(e.to_string().contains("weak sslmode"), "{weak}: {e}");
        }
    }

    #[test]
    fn require_checks_the_chain_when_there_is_a_root_file() {
        let home = env(Some("/home/p"));
        let p = plan(
            "postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem",
            &home,
        )
        .unwrap();
        assert_eq!((p.verify, p.roots), (Verify::Chain, file("/ca.pem", false)));
        // libpq's default file counts when it exists, and is no error when it does not.
        let p = plan("postgres://u@h/db?sslmode=require", &home).unwrap();
        assert_eq!(
            (p.verify, p.roots),
            (Verify::Chain, file("/home/p/.postgresql/root.crt", true))
        );
        let p = plan("postgres://u@h/db?sslmode=require", &env(None)).unwrap();
        assert_eq!((p.verify, p.roots), (Verify::None, Roots::Unchecked));
        let dir = tempfile::tempdir().unwrap();
        let nowhere = env(dir.path().to_str());
        assert!(check_tls_files_with("postgres://u@h/db?sslmode=require", &nowhere).is_ok());
        assert!(check_tls_files_with("postgres://u@h/db", &nowhere).is_ok());
    }

    #[test]
    fn pgsslmode_and_pgsslrootcert_apply_when_the_url_does_not_say() {
        let from_env = PgEnv {
            sslmode: Some("verify-full".into()),
            sslrootcert: Some("/env-ca.pem".into()),
            home: Some("/home/p".into()),
        };
        let p = plan("postgres://u@h/db", &from_env).unwrap();
        assert_eq!(
            (p.verify, p.roots),
            (Verify::Full, file("/env-ca.pem", false))
        );
        let p = plan("host=h dbname=d", &from_env).unwrap();
        assert_eq!(
            (p.verify, p.roots),
            (Verify::Full, file("/env-ca.pem", false))
        );
        // The URL wins.
        let p = plan(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=/url-ca.pem",
            &from_env,
        )
        .unwrap();
        assert_eq!(
            (p.verify, p.roots),
            (Verify::Chain, file("/url-ca.pem", false))
        );
        let p = plan("postgres://u@h/db?sslmode=disable", &from_env).unwrap();
        assert_eq!((p.driver_mode, p.verify), ("disable", Verify::None));
        // PGSSLROOTCERT=system alone implies verify-full.
        let system = PgEnv {
            sslmode: None,
            sslrootcert: Some("system".into()),
            home: None,
        };
        let p = plan("postgres://u@h/db", &system).unwrap();
        assert_eq!((p.verify, p.roots), (Verify::Full, Roots::System));
        let bad = PgEnv {
            sslmode: Some("sometimes".into()),
            ..PgEnv::default()
        };
        assert!(check_url_with("postgres://u@h/db", &bad).is_err());
        // Nothing anywhere: prefer, unchecked.
        let p = plan("postgres://u@h/db", &env(None)).unwrap();
        assert_eq!((p.driver_mode, p.verify), ("prefer", Verify::None));
    }

    #[test]
    fn a_missing_or_unreadable_root_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let home = env(dir.path().to_str());
        let missing = dir.path().join("missing.pem");
        for mode in ["require", "verify-ca", "verify-full", "prefer"] {
            let url = format!(
                "postgres://u@h/db?sslmode={mode}&sslrootcert={}",
                missing.display()
            );
            if mode == "prefer" {
                assert!(check_tls_files_with(&url, &home).is_ok(), "{mode}");
                continue;
            }
            let e = check_tls_files_with(&url, &home).unwrap_err().to_string();
            assert!(e.contains(&missing.display().to_string()), "{mode}: {e}");
        }
        let e = check_tls_files_with("postgres://u@h/db?sslmode=verify-ca", &home)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(".postgresql/root.crt") && e.contains("does not exist"),
            "{e}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert={}",
            garbage.display()
        );
        let e = check_tls_files_with(&url, &home).unwrap_err().to_string();
        assert!(e.contains("garbage.pem"), "{e}");
        // A directory cannot be read as a file.
        let url = format!(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert={}",
            dir.path().display()
        );
        let e = check_tls_files_with(&url, &home).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn a_root_file_is_a_bundle() {
        let a = pgpushd_emulator::tls::CertificateAuthority::generate("a").unwrap();
        let b = pgpushd_emulator::tls::CertificateAuthority::generate("b").unwrap();
        let pem = [a.cert_pem(), b.cert_pem()].concat();
        assert_eq!(read_bundle(Path::new("bundle.pem"), &pem).unwrap().len(), 2);
    }

    #[test]
    fn the_server_is_asked_for_keepalives_and_the_urls_options_come_after() {
        let home = env(None);
        let t = target("postgres://u@h/db", Duration::from_secs(1), "test", &home).unwrap();
        assert_eq!(
            t.config.get_options(),
            Some(
                "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
            )
        );
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(30));
        assert!(t.config.get_keepalives());
        let t = target(
            "postgres://u@h/db?options=-c%20search_path%3Dapp",
            Duration::from_secs(1),
            "test",
            &home,
        )
        .unwrap();
        assert_eq!(
            t.config.get_options(),
            Some(
                "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 \
                 -c tcp_keepalives_count=3 -c search_path=app"
            )
        );
    }
}
