//! Records the device tokens a transport reports unregistered on its own (the binary
//! protocol's feedback service, through [`Transport::unregistered`]) in
//! `pgpushd.unregistered_tokens`, so later rows for them fail without being sent.
//!
//! The service forgets what it handed out, so tokens the database did not take are kept
//! and written again after a backoff; like the retention task, this one survives a lost
//! database and never stops the daemon.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::config::DatabaseConfig;
use crate::transport::{Transport, Unregistered};
use crate::{db, outbox};

/// After a failed write, retries wait from this ...
const RETRY_BASE: Duration = Duration::from_secs(1);
/// ... up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Takes the transport's reports and records them until `cancel`.
pub async fn run(
    transport: Arc<dyn Transport>,
    database: DatabaseConfig,
    cancel: CancellationToken,
) {
    let mut unsaved: Vec<Unregistered> = Vec::new();
    let mut client: Option<Client> = None;
    let mut failures = 0u32;
    loop {
        let retry = backoff(failures.saturating_sub(1), RETRY_BASE, RETRY_MAX);
        tokio::select! {
            _ = cancel.cancelled() => break,
            tokens = transport.unregistered() => unsaved.extend(tokens),
            _ = tokio::time::sleep(retry), if !unsaved.is_empty() => {}
        }
        match save(&database, &mut client, &unsaved).await {
            Ok(()) => {
                info!(
                    tokens = unsaved.len(),
                    "recorded tokens the push service reported unregistered"
                );
                unsaved.clear();
                failures = 0;
            }
            Err(e) => {
                client = None;
                failures += 1;
                warn!(
                    error = format!("{e:#}"),
                    tokens = unsaved.len(),
                    "cannot record unregistered tokens; keeping them to try again"
                );
            }
        }
    }
    if !unsaved.is_empty() {
        warn!(
            tokens = unsaved.len(),
            "stopping with unregistered tokens not recorded"
        );
    }
}

/// One write of everything not yet recorded, on the task's connection.
async fn save(
    database: &DatabaseConfig,
    client: &mut Option<Client>,
    tokens: &[Unregistered],
) -> anyhow::Result<()> {
    let c = match client.take() {
        Some(c) if !c.is_closed() => c,
        _ => db::connect(&database.url, database.connect_timeout, "unregistered").await?,
    };
    let c = client.insert(c);
    tokio::time::timeout(
        database.connect_timeout,
        outbox::record_unregistered(&*c, tokens),
    )
    .await
    .map_err(|_| anyhow::anyhow!("recording unregistered tokens timed out"))?
    .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))?;
    Ok(())
}
