//! Connecting to PostgreSQL: one place that turns a URL into a connected client, with TLS
//! as the URL's `sslmode` asks.
//!
//! tokio-postgres itself knows `disable`, `prefer` and `require`; pgpushd also honours
//! libpq's `verify-ca` and `verify-full` (and `sslrootcert`), so the same URL that works
//! for `psql` works here, with the same meaning:
//! - `prefer` (the default) and `require` encrypt without checking the server's
//!   certificate, exactly as libpq does;
//! - `verify-ca` checks the chain, `verify-full` the chain and the host name, against the
//!   system roots plus `sslrootcert` when given.

use std::time::Duration;

use anyhow::Context as _;
use native_tls::{Certificate, TlsConnector};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::Client;

use crate::secret::Secret;

/// How the server's certificate is checked, from `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    None,
    Chain,
    Full,
}

/// A URL with libpq's TLS options taken out and turned into a TLS connector.
struct Target {
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
}

fn target(url: &str, connect_timeout: Duration, role: &str) -> anyhow::Result<Target> {
    let (rest, sslmode, rootcert) = take_tls_options(url);
    let (mode_for_driver, verify) = tls_modes(sslmode.as_deref())?;
    let mut config: tokio_postgres::Config = with_sslmode(&rest, mode_for_driver)
        .parse()
        .context("the database URL is not valid")?;
    config
        .connect_timeout(connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        // A connection whose peer vanished (failover, NAT state dropped) fails within a
        // minute instead of the kernel's ~15 minutes of retransmissions.
        .tcp_user_timeout(Duration::from_secs(60));
    // Names the connection in pg_stat_activity: "pgpushd-listener", "pgpushd-batch", ...
    if config.get_application_name().is_none() {
        config.application_name(format!("pgpushd-{role}"));
    }
    let mut builder = TlsConnector::builder();
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
    if let Some(path) = rootcert {
        let pem = std::fs::read(&path).with_context(|| format!("sslrootcert {path}"))?;
        let cert = Certificate::from_pem(&pem)
            .with_context(|| format!("sslrootcert {path}: not a PEM certificate"))?;
        builder.add_root_certificate(cert);
    }
    let tls = MakeTlsConnector::new(builder.build().context("TLS set-up for PostgreSQL")?);
    Ok(Target { config, tls })
}

/// Checks a database URL as connecting will read it (libpq's `verify-ca` and
/// `verify-full` included), without connecting or reading any file.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    let (rest, sslmode, _) = take_tls_options(url);
    let (mode_for_driver, _) = tls_modes(sslmode.as_deref())?;
    with_sslmode(&rest, mode_for_driver).parse::<tokio_postgres::Config>()?;
    Ok(())
}

/// libpq's `sslmode` -> what tokio-postgres is told, and how the certificate is checked.
fn tls_modes(sslmode: Option<&str>) -> anyhow::Result<(&'static str, Verify)> {
    Ok(match sslmode {
        None | Some("prefer") | Some("allow") => ("prefer", Verify::None),
        Some("disable") => ("disable", Verify::None),
        Some("require") => ("require", Verify::None),
        Some("verify-ca") => ("require", Verify::Chain),
        Some("verify-full") => ("require", Verify::Full),
        Some(other) => anyhow::bail!("unknown sslmode {other:?} in the database URL"),
    })
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
    let (client, connection) = connect_raw(url, connect_timeout, role).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
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
    let Target { config, tls } = target(url.expose(), connect_timeout, role)?;
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

    #[test]
    fn every_libpq_sslmode_is_understood() {
        for mode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let url = format!("postgres://u@h/db?sslmode={mode}");
            assert!(
                target(&url, Duration::from_secs(1), "test").is_ok(),
                "{mode}"
            );
        }
        assert!(check_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem").is_ok());
        assert!(check_url("host=h sslmode=verify-ca dbname=d").is_ok());
        assert!(check_url("postgres://u@h/db?sslmode=sometimes").is_err());
        assert!(target(
            "postgres://u@h/db?sslmode=sometimes",
            Duration::from_secs(1),
            "test"
        )
        .is_err());
    }
}
