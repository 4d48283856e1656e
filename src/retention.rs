//! Retention: a background task that deletes settled rows once they are older than the
//! ages in `[retention]`, so the outbox does not grow forever.
//!
//! Every `interval` a pass deletes, per configured status, the rows settled more than
//! its age ago, in batches of `batch_size`, each batch its own short transaction (see
//! [`crate::outbox::prune`]), until a batch comes back short. Ages count from
//! `settled_at`, when the row became sent, failed or expired, not from `created_at`: a
//! row scheduled weeks ahead that failed today is a fresh failure. Pending rows are never
//! deleted. Like the listener, the task survives a lost database: it logs, backs off and
//! tries again, and never stops the daemon.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::backoff;
use crate::config::{DatabaseConfig, RetentionConfig};
use crate::db;
use crate::outbox::prune;
use crate::outcome::RowStatus;

/// After a failed pass, retries wait from this ...
const RETRY_BASE: Duration = Duration::from_secs(1);
/// ... up to this (or `interval`, if shorter).
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub sent: u64,
    pub failed: u64,
    pub expired: u64,
    /// Settled rows without `settled_at` (from before schema version 2) given one.
    pub stamped: u64,
    /// Ended broadcast channels deleted from `pgpushd.channels`.
    pub channels: u64,
}

impl Pruned {
    /// Outbox rows deleted.
    pub fn deleted(&self) -> u64 {
        self.sent + self.failed + self.expired
    }
}

/// Runs passes every `interval` until `cancel`, following `config` as reloads change it:
/// idle while no age is configured, a pass at once when a reload changes the settings.
pub async fn run(
    database: DatabaseConfig,
    mut config: watch::Receiver<RetentionConfig>,
    cancel: CancellationToken,
) {
    let mut client: Option<(Client, db::Canceller)> = None;
    let mut failures = 0u32;
    let mut announced = RetentionConfig::default();
    loop {
        let current = config.borrow_and_update().clone();
        if current != announced {
            match current.is_enabled() {
                true => info!(sent = ?current.sent, failed = ?current.failed,
                              expired = ?current.expired, channels = ?current.channels,
                              interval = ?current.interval, "retention enabled"),
                false => info!("retention disabled"),
            }
            announced = current.clone();
        }
        let wait = if !current.is_enabled() {
            client = None;
            None
        } else {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = pass(&database, &current, &mut client) => outcome,
            };
            Some(match outcome {
                Ok(pruned) => {
                    if failures > 0 {
                        info!(after_failures = failures, "retention works again");
                    }
                    failures = 0;
                    report(&pruned);
                    current.interval
                }
                Err(e) => {
                    // Whatever failed, start the next pass on a fresh connection.
                    client = None;
                    failures += 1;
                    let wait = backoff(failures - 1, RETRY_BASE, RETRY_MAX.min(current.interval));
                    warn!(error = format!("{e:#}"), retry_in = ?wait, "retention pass failed");
                    wait
                }
            })
        };
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = config.changed() => {
                if changed.is_err() {
                    return; // the daemon is gone
                }
            }
            _ = sleep => {}
        }
    }
}

/// One pass on the task's connection, (re)connecting first when needed. After an error
/// the caller drops the connection.
async fn pass(
    database: &DatabaseConfig,
    config: &RetentionConfig,
    client: &mut Option<(Client, db::Canceller)>,
) -> anyhow::Result<Pruned> {
    let c = match client.take() {
        Some(c) if !c.0.is_closed() => c,
        _ => db::connect_cancellable(&database.url, database.connect_timeout, "retention").await?,
    };
    let (c, canceller) = client.insert(c);
    prune_once(c, canceller, config, database.connect_timeout).await
}

/// Deletes everything `config` says is due now, batch by batch, each statement bounded by
/// `timeout` (a half-open connection must not stall the task forever) and cancelled on
/// the server when it gets no answer in time (a DELETE must not go on after the task gave
/// up on it). After an error, drop the connection: a cancel may still be on its way.
pub async fn prune_once(
    client: &Client,
    canceller: &db::Canceller,
    config: &RetentionConfig,
    timeout: Duration,
) -> anyhow::Result<Pruned> {
    let batch = config.batch_size;
    let mut pruned = Pruned {
        // First give legacy rows a settled_at, or they would never be due.
        stamped: in_batches("stamping settled_at", canceller, timeout, batch, || {
            prune::stamp_unsettled(client, batch)
        })
        .await?,
        ..Pruned::default()
    };
    for (status, age) in [
        (RowStatus::Sent, config.sent),
        (RowStatus::Failed, config.failed),
        (RowStatus::Expired, config.expired),
    ] {
        let Some(age) = age else { continue };
        let n = in_batches("deleting settled rows", canceller, timeout, batch, || {
            prune::delete_settled(client, status, age, batch)
        })
        .await?;
        match status {
            RowStatus::Sent => pruned.sent = n,
            RowStatus::Failed => pruned.failed = n,
            _ => pruned.expired = n,
        }
    }
    if let Some(age) = config.channels {
        pruned.channels = in_batches("deleting ended channels", canceller, timeout, batch, || {
            prune::delete_channels(client, age, batch)
        })
        .await?;
    }
    Ok(pruned)
}

/// Runs `statement` (each one bounded as [`bounded`] does) again until one comes back
/// short of `batch` rows; how many rows in all.
async fn in_batches<F: std::future::Future<Output = Result<u64, tokio_postgres::Error>>>(
    what: &str,
    canceller: &db::Canceller,
    timeout: Duration,
    batch: usize,
    statement: impl Fn() -> F,
) -> anyhow::Result<u64> {
    let mut rows = 0;
    loop {
        let n = bounded(what, canceller, timeout, statement()).await?;
        rows += n;
        if n < batch as u64 {
            return Ok(rows);
        }
    }
}

async fn bounded(
    what: &str,
    canceller: &db::Canceller,
    timeout: Duration,
    statement: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>>,
) -> anyhow::Result<u64> {
    match canceller.within(timeout, statement).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what}: {}", db::describe(&e))),
        Err(e) => Err(anyhow::anyhow!("{what}: {e}")),
    }
}

fn report(p: &Pruned) {
    if p.deleted() > 0 || p.stamped > 0 || p.channels > 0 {
        info!(
            sent = p.sent,
            failed = p.failed,
            expired = p.expired,
            stamped = p.stamped,
            channels = p.channels,
            "retention: deleted old rows"
        );
    } else {
        debug!("retention: nothing to delete");
    }
}
