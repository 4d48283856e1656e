//! Sets back to `pending` the rows a transport reported `Sent` and then found were not
//! delivered after all (the binary protocol: an error packet that came after later
//! notifications' settle windows, see [`Transport::undelivered`]), with
//! `outbox::revive_undelivered`. They are sent again.
//!
//! A row may still be held by the batch that is about to commit it as `sent`: the UPDATE
//! waits for that commit. What the database did not take is kept and written again after
//! a backoff; like the unregistered-token recorder, this task survives a lost database
//! and never stops the daemon. At shutdown it makes one last attempt, and logs the rows
//! it could not revive (they stay `sent`).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::config::DatabaseConfig;
use crate::transport::{Transport, Undelivered};
use crate::{db, outbox};

/// After a failed write, retries wait from this ...
const RETRY_BASE: Duration = Duration::from_secs(1);
/// ... up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Upper bound on one write, which may wait for batches to commit their rows.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// At shutdown, how long the last attempt may take.
const LAST_ATTEMPT: Duration = Duration::from_secs(5);

/// Takes the transport's reports and revives those rows until `cancel`.
pub async fn run(
    transport: Arc<dyn Transport>,
    database: DatabaseConfig,
    cancel: CancellationToken,
) {
    let mut unsaved: Vec<Undelivered> = Vec::new();
    let mut client: Option<Client> = None;
    let mut failures = 0u32;
    loop {
        let retry = backoff(failures.saturating_sub(1), RETRY_BASE, RETRY_MAX);
        tokio::select! {
            _ = cancel.cancelled() => break,
            rows = transport.undelivered() => unsaved.extend(rows),
            _ = tokio::time::sleep(retry), if !unsaved.is_empty() => {}
        }
        match save(&database, &mut client, &unsaved, WRITE_TIMEOUT).await {
            Ok(revived) => {
                info!(
                    reported = unsaved.len(),
                    revived, "rows reported sent but not delivered are pending again"
                );
                unsaved.clear();
                failures = 0;
            }
            Err(e) => {
                client = None;
                failures += 1;
                warn!(
                    error = format!("{e:#}"),
                    rows = unsaved.len(),
                    "cannot revive undelivered rows; keeping them to try again"
                );
            }
        }
    }
    if !unsaved.is_empty()
        && save(&database, &mut client, &unsaved, LAST_ATTEMPT)
            .await
            .is_err()
    {
        let rows: Vec<i64> = unsaved.iter().map(|u| u.id).collect();
        warn!(
            ?rows,
            "stopping with rows reported sent but not delivered: they stay sent"
        );
    }
}

/// One write of everything not yet revived, on the task's connection.
async fn save(
    database: &DatabaseConfig,
    client: &mut Option<Client>,
    rows: &[Undelivered],
    timeout: Duration,
) -> anyhow::Result<u64> {
    let c = match client.take() {
        Some(c) if !c.is_closed() => c,
        _ => db::connect(&database.url, database.connect_timeout, "undelivered").await?,
    };
    let c = client.insert(c);
    // On a timeout the connection is dropped (the caller forgets it), which ends the
    // statement still waiting on the server.
    tokio::time::timeout(timeout, outbox::revive_undelivered(&*c, rows))
        .await
        .map_err(|_| anyhow::anyhow!("reviving undelivered rows timed out"))?
        .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))
}
