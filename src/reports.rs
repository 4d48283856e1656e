//! What a transport reports on its own, outside any answer, written to the outbox by a
//! task of the daemon's:
//! - [`UNREGISTERED`]: device tokens the service says are gone (the binary protocol's
//!   feedback service), recorded in `pgpushd.unregistered_tokens` so later rows for them
//!   fail without being sent;
//! - [`UNDELIVERED`]: rows the transport reported `Sent` and then found were not delivered
//!   after all (the binary protocol's late error packets), set back to `pending` to be
//!   sent again. Such a row may still be held by the batch about to commit it as `sent`:
//!   the UPDATE waits for that commit.
//!
//! The service forgets what it handed out, so reports the database did not take are kept
//! and written again after a backoff; like retention, the task survives a lost database
//! and never stops the daemon. At shutdown it makes one last, short attempt and logs what
//! it could not write.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::config::DatabaseConfig;
use crate::transport::{Transport, Undelivered, Unregistered};
use crate::{db, outbox};

/// After a failed write, retries wait from this ...
const RETRY_BASE: Duration = Duration::from_secs(1);
/// ... up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// At shutdown, how long the last attempt may take.
const LAST_ATTEMPT: Duration = Duration::from_secs(5);

type Write<T> =
    for<'c> fn(&'c Client, &'c [T]) -> BoxFuture<'c, Result<u64, tokio_postgres::Error>>;

/// One kind of report: where it comes from, how it is written, what the log calls it.
pub struct Kind<T: 'static> {
    /// Names it in logs and errors ("unregistered tokens").
    pub what: &'static str,
    /// The connection's role, in PostgreSQL's `application_name`.
    role: &'static str,
    take: fn(&dyn Transport) -> BoxFuture<'_, Vec<T>>,
    write: Write<T>,
    /// Upper bound on one write (a revival may wait for batches to commit).
    write_timeout: fn(&DatabaseConfig) -> Duration,
}

pub const UNREGISTERED: Kind<Unregistered> = Kind {
    what: "unregistered tokens",
    role: "unregistered",
    take: |t| t.unregistered(),
    write: |c, tokens| Box::pin(outbox::record_unregistered(c, tokens)),
    write_timeout: |d| d.connect_timeout,
};

pub const UNDELIVERED: Kind<Undelivered> = Kind {
    what: "rows reported sent but not delivered",
    role: "undelivered",
    take: |t| t.undelivered(),
    write: |c, rows| Box::pin(outbox::revive_undelivered(c, rows)),
    write_timeout: |_| Duration::from_secs(60),
};

/// Takes the transport's reports of `kind` and writes them until `cancel`.
pub async fn run<T: Send + Sync + Debug + 'static>(
    kind: &'static Kind<T>,
    transport: Arc<dyn Transport>,
    database: DatabaseConfig,
    cancel: CancellationToken,
) {
    let what = kind.what;
    let mut unsaved: Vec<T> = Vec::new();
    let mut client: Option<(Client, db::Canceller)> = None;
    let mut failures = 0u32;
    loop {
        let retry = backoff(failures.saturating_sub(1), RETRY_BASE, RETRY_MAX);
        tokio::select! {
            _ = cancel.cancelled() => break,
            reported = (kind.take)(&*transport) => unsaved.extend(reported),
            _ = tokio::time::sleep(retry), if !unsaved.is_empty() => {}
        }
        let timeout = (kind.write_timeout)(&database);
        match save(kind, &database, &mut client, &unsaved, timeout).await {
            Ok(written) => {
                info!(
                    what,
                    reported = unsaved.len(),
                    written,
                    "recorded what the push service reported"
                );
                unsaved.clear();
                failures = 0;
            }
            Err(e) => {
                client = None;
                failures += 1;
                warn!(
                    what,
                    error = format!("{e:#}"),
                    reported = unsaved.len(),
                    "cannot record what the push service reported; keeping it to try again"
                );
            }
        }
    }
    if !unsaved.is_empty()
        && save(kind, &database, &mut client, &unsaved, LAST_ATTEMPT)
            .await
            .is_err()
    {
        warn!(what, lost = ?unsaved, "stopping with reports not recorded");
    }
}

/// One write of everything not yet recorded, on the task's connection.
async fn save<T>(
    kind: &Kind<T>,
    database: &DatabaseConfig,
    client: &mut Option<(Client, db::Canceller)>,
    reported: &[T],
    timeout: Duration,
) -> anyhow::Result<u64> {
    let c = match client.take() {
        Some(c) if !c.0.is_closed() => c,
        _ => db::connect_cancellable(&database.url, database.connect_timeout, kind.role).await?,
    };
    let (c, canceller) = client.insert(c);
    // A write that gets no answer in time (a revival waits for the batch holding its row)
    // is cancelled on the server, where it would otherwise wait on and land later, and the
    // caller drops the connection.
    canceller
        .within(timeout, (kind.write)(c, reported))
        .await
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", kind.what))?
        .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))
}
