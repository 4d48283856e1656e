//! The daemon's keeper of broadcast channels: it makes the channels the application
//! INSERTed at APNs, deletes the ones it set to `closing`, and writes what APNs answered
//! back to each row.
//!
//! One round: claim the due rows under a lease (committed before any request, see
//! `outbox::channels`), take each one's [`Step`], write its outcome under the lease.
//! Rounds run when the table's trigger notifies (through the listener), when a step
//! falls due (a retry, a lease running out), and every [`POLL`] as a safety net.
//!
//! A create is not idempotent at APNs. A row whose create may have made a channel without
//! the outcome being written (its daemon died, or the request got no answer) is
//! *uncertain*: before making another, the keeper lists the app's channels at APNs and
//! adopts the one no row names whose storage policy is the row's. It does that only when
//! no other create of the app is out (its channel could be listed before its row names
//! it), and before this round's own creates go out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{watch, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::outcome::{self, ChannelUpdate, ClaimedChannel, Step, Write};
use super::reconcile::compare;
use super::{ChannelError, ChannelOp, ChannelReply, MessageStorage};
use crate::backoff::backoff;
use crate::db::{self, Canceller};
use crate::dispatcher::Settings;
use crate::metrics::Metrics;
use crate::outbox::channels::{self as sql, Written};
use crate::secret::Secret;
use crate::transport::Transport;

/// The safety net's interval: the trigger's NOTIFY and the listener's catch-up after a
/// reconnect wake the keeper; this only bounds what a lost notification costs.
pub const POLL: Duration = Duration::from_secs(60);
/// Rows claimed in one round.
const ROUND: i64 = 16;
/// Requests of a round out at once.
const IN_FLIGHT: usize = 8;
/// How long a claim's lease holds its rows. Longer than any step (see [`STEP_TIMEOUT`]),
/// so a live keeper always writes its outcome within it; a lease found run out means its
/// keeper died.
pub const LEASE: Duration = Duration::from_secs(5 * 60);
/// The longest one row's step may take, its requests' timeouts included.
const STEP_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// The bound on each of the keeper's statements (cancelled at the server past it).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The least a keeper waits after a round that claimed nothing: a row due then is held
/// locked by another transaction (its claim skips it).
const SKIPPED_WAIT: Duration = Duration::from_secs(1);
/// How long a create that got no answer keeps its lease before it is looked for at APNs:
/// a server may act on a request after the client gave up on it, and the channel it
/// makes then must be listed before the row is made again. Meanwhile the app's other
/// finds wait too (the lease is out).
const UNSURE_WAIT: Duration = Duration::from_secs(10);
/// How long an uncertain row waits while another create of its app is out.
const FIND_WAIT: Duration = Duration::from_secs(5);
/// The channels of APNs's list a find reads (one request each) looking for its own; the
/// policies read are remembered, so a list longer than this is read on over rounds.
const FIND_READS: usize = 50;
/// At most this many channels' policies are remembered (Apple's limit, twice).
const MAX_POLICIES: usize = 2 * super::MAX_CHANNELS;

/// The storage policies of channels read while finding one, by app and channel id: a
/// channel's policy never changes (Apple: it "can't be modified later").
#[derive(Default)]
pub struct Policies(std::sync::Mutex<std::collections::HashMap<(String, String), MessageStorage>>);

impl Policies {
    fn get(&self, app: &str, id: &str) -> Option<MessageStorage> {
        let known = self.0.lock().unwrap();
        known.get(&(app.to_owned(), id.to_owned())).copied()
    }

    fn insert(&self, app: &str, id: &str, storage: MessageStorage) {
        let mut known = self.0.lock().unwrap();
        if known.len() >= MAX_POLICIES {
            known.clear();
        }
        known.insert((app.to_owned(), id.to_owned()), storage);
    }
}

pub struct Keeper {
    pub url: Secret<String>,
    pub connect_timeout: Duration,
    pub settings: watch::Receiver<Settings>,
    pub transport: Arc<dyn Transport>,
    /// Notified by the listener: a channel inserted or asked to close, or a reconnect.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// What finds have read (see [`Policies`]).
    pub policies: Policies,
}

impl Keeper {
    /// Runs until `cancel`; a round in progress finishes first. Database trouble never
    /// stops it: it reconnects with a backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let error = match self.serve(&cancel).await {
                Ok(()) => return,
                Err(e) => e,
            };
            failures += 1;
            let wait = backoff(failures - 1, Duration::from_millis(250), POLL);
            warn!(error = %format!("{error:#}"), retry_in = ?wait, "channel keeper lost its database connection");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn serve(&self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let (client, canceller) =
            db::connect_cancellable(&self.url, self.connect_timeout, "channels").await?;
        let db = Db {
            client: &client,
            canceller: &canceller,
        };
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let claimed = self.round(&db).await?;
            if claimed as i64 == ROUND {
                continue;
            }
            let counts = db.run(sql::counts(db.client)).await?;
            let counts: Vec<_> = counts
                .iter()
                .map(|(app, status, n)| (app.clone(), status.as_str(), *n))
                .collect();
            self.metrics.set_channels(&counts);
            let next = db.run(sql::next_due(db.client)).await?;
            let mut wait = next.map_or(POLL, |due| due.min(POLL));
            if claimed == 0 {
                // Due rows this round's claim skipped are locked (the application's open
                // transaction holds them): not claimed again at once, over and over.
                wait = wait.max(SKIPPED_WAIT);
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One round: claims, steps, outcomes. Returns how many rows it claimed.
    async fn round(&self, db: &Db<'_>) -> anyhow::Result<usize> {
        let lease = Uuid::new_v4();
        let claimed = db.run(sql::claim(db.client, ROUND, lease, LEASE)).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let retry = self.settings.borrow().retry.clone();
        debug!(rows = claimed.len(), "channels claimed");
        // Finds first, app by app: this round's creates are not out yet, so APNs's list
        // holds none of their channels.
        let mut finds: BTreeMap<&str, Vec<&ClaimedChannel>> = BTreeMap::new();
        let mut others = Vec::new();
        for c in &claimed {
            match outcome::step(c) {
                Step::Find(_) => finds.entry(c.app.as_str()).or_default().push(c),
                step => others.push((c, step)),
            }
        }
        for (app, rows) in finds {
            for (c, write) in self.find(db, app, &rows, lease, &retry).await? {
                self.write(db, c, &write, lease).await?;
            }
        }
        let steps: Vec<_> = others
            .into_iter()
            .map(|(c, step)| self.take(c, step, &retry))
            .collect();
        let steps: Vec<_> = futures::stream::iter(steps)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (c, write) in steps {
            self.write(db, c, &write, lease).await?;
        }
        Ok(claimed.len())
    }

    /// Takes one row's step (not a find): the request, and what its answer makes of the row.
    async fn take<'c>(
        &self,
        c: &'c ClaimedChannel,
        step: Step,
        retry: &crate::config::RetryConfig,
    ) -> (&'c ClaimedChannel, Write) {
        let op = match step {
            Step::Close => return (c, Write::Update(outcome::closed_unmade(c))),
            Step::Create(storage) => ChannelOp::Create(storage),
            Step::Delete(id) => ChannelOp::Delete(id),
            Step::Find(_) => unreachable!("finds are taken app by app"),
        };
        let answer =
            match tokio::time::timeout(STEP_TIMEOUT, self.transport.manage_channel(&c.app, &op))
                .await
            {
                Ok(answer) => answer,
                Err(_) => Err(ChannelError::NoAnswer(format!(
                    "no answer from APNs's channel management API within {STEP_TIMEOUT:?}"
                ))),
            };
        let write = match op {
            ChannelOp::Create(_) => outcome::created(c, &answer, retry),
            _ => Write::Update(outcome::deleted(c, &answer, retry)),
        };
        (c, write)
    }

    /// Looks at APNs for what the uncertain `rows` of `app` may have made, and adopts it.
    async fn find<'c>(
        &self,
        db: &Db<'_>,
        app: &str,
        rows: &[&'c ClaimedChannel],
        lease: Uuid,
        retry: &crate::config::RetryConfig,
    ) -> anyhow::Result<Vec<(&'c ClaimedChannel, Write)>> {
        let wait_all = |reason: &str, after: Duration| {
            rows.iter()
                .map(|c| (*c, Write::Update(outcome::deferred(c, reason, after))))
                .collect::<Vec<_>>()
        };
        let creates_out = || async {
            Ok::<_, StatementError>(
                if db.run(sql::other_lease_out(db.client, app, lease)).await? {
                    Some(wait_all(
                        "looking for a channel an earlier create may have made, once the app's \
                     creates in flight have finished",
                        FIND_WAIT,
                    ))
                } else {
                    None
                },
            )
        };
        if let Some(waits) = creates_out().await? {
            return Ok(waits);
        }
        let listed = match self.transport.manage_channel(app, &ChannelOp::List).await {
            Ok(ChannelReply::Listed(ids)) => ids,
            Ok(other) => {
                return Ok(wait_all(
                    &format!("APNs answered a list with {other:?}"),
                    FIND_WAIT,
                ))
            }
            Err(ChannelError::Deferred { reason, after }) => return Ok(wait_all(&reason, after)),
            Err(e) => {
                let after = backoff(
                    rows[0].attempts.max(0) as u32,
                    retry.backoff_base,
                    retry.backoff_max,
                );
                return Ok(wait_all(
                    &format!("cannot list the app's channels at APNs to find one an earlier create may have made: {e}"),
                    after,
                ));
            }
        };
        // Again, now that the list is in: a create claimed since the first look may be in
        // it, its channel named by no row yet. One claimed later made nothing listed; one
        // that has finished since is named in the table, read after this.
        if let Some(waits) = creates_out().await? {
            return Ok(waits);
        }
        let table = db.run(sql::named(db.client, app)).await?;
        let mut candidates = compare(&listed, &table).unknown.into_iter();
        // The channels read so far that no row adopted, with their storage: one read for
        // a row of the other policy may be the next row's.
        let mut read: Vec<(String, MessageStorage)> = Vec::new();
        // A read failed, or the budget left channels unread: a row that found nothing
        // cannot say its create made nothing.
        let mut unsure = false;
        let mut writes = Vec::new();
        let mut reads = 0;
        for c in rows {
            let mut found = read
                .iter()
                .position(|(_, storage)| *storage == c.storage)
                .map(|i| read.remove(i).0);
            while found.is_none() {
                if reads == FIND_READS {
                    unsure |= candidates.len() > 0;
                    break;
                }
                let Some(id) = candidates.next() else { break };
                let answer = match self.policies.get(app, &id) {
                    Some(storage) => Ok(ChannelReply::Read(storage)),
                    None => {
                        reads += 1;
                        let answer = self
                            .transport
                            .manage_channel(app, &ChannelOp::Read(id.clone()))
                            .await;
                        if let Ok(ChannelReply::Read(storage)) = &answer {
                            self.policies.insert(app, &id, *storage);
                        }
                        answer
                    }
                };
                match answer {
                    Ok(ChannelReply::Read(storage)) if storage == c.storage => found = Some(id),
                    Ok(ChannelReply::Read(storage)) => read.push((id, storage)),
                    Ok(_) | Err(ChannelError::NoSuchChannel(_)) => {}
                    Err(e) => {
                        debug!(app, channel = %id, error = %e, "cannot read a channel while finding one");
                        unsure = true;
                    }
                }
            }
            let exhausted = !unsure;
            let write = match found {
                Some(channel_id) => {
                    info!(app, id = c.id, channel = %channel_id,
                          "found the channel an earlier create made; adopting it");
                    outcome::created(c, &Ok(ChannelReply::Created { channel_id }), retry)
                }
                None if exhausted => {
                    info!(
                        app,
                        id = c.id,
                        "an earlier create made no channel; making one"
                    );
                    Write::Update(outcome::not_found(c, retry))
                }
                None => Write::Update(outcome::deferred(
                    c,
                    "could not read every channel APNs lists that no row names",
                    FIND_WAIT,
                )),
            };
            writes.push((*c, write));
        }
        Ok(writes)
    }

    /// Writes one row's outcome under `lease`. A channel made for a row whose lease was
    /// lost (this keeper stalled past it) is deleted again, unless the row names it.
    async fn write(
        &self,
        db: &Db<'_>,
        c: &ClaimedChannel,
        write: &Write,
        lease: Uuid,
    ) -> anyhow::Result<()> {
        let u = match write {
            Write::Unsure { id, reason } => {
                warn!(app = %c.app, id, reason = %reason,
                      "a channel create got no answer; APNs's list will say whether it was made");
                db.run(sql::unsure(db.client, *id, lease, reason, UNSURE_WAIT))
                    .await?;
                return Ok(());
            }
            Write::Update(u) => u,
        };
        let written = match db.run(sql::write(db.client, u, lease)).await {
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // Another row names that channel (another keeper adopted it first).
                let again = ChannelUpdate {
                    channel_id: None,
                    ..outcome::deferred(
                        c,
                        "another row names the channel found for this one",
                        FIND_WAIT,
                    )
                };
                db.run(sql::write(db.client, &again, lease)).await?
            }
            other => other?,
        };
        match written {
            Written::Done(status) => {
                debug!(app = %c.app, id = c.id, %status, last_error = ?u.last_error, "channel written");
                Ok(())
            }
            Written::LeaseLost => {
                warn!(app = %c.app, id = c.id, "a channel's lease was lost before its outcome was written");
                let Some(made) = &u.channel_id else {
                    return Ok(());
                };
                if db.run(sql::channel_of(db.client, c.id)).await?.as_ref() == Some(made) {
                    return Ok(());
                }
                let answer = self
                    .transport
                    .manage_channel(&c.app, &ChannelOp::Delete(made.clone()))
                    .await;
                info!(app = %c.app, channel = %made, outcome = ?answer,
                      "deleted the channel made for a row whose lease was lost");
                Ok(())
            }
        }
    }
}

/// The keeper's connection, every statement bounded at the server too.
struct Db<'a> {
    client: &'a Client,
    canceller: &'a Canceller,
}

impl Db<'_> {
    async fn run<T>(
        &self,
        statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StatementError> {
        match self.canceller.within(STATEMENT_TIMEOUT, statement).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StatementError::Database(e)),
            Err(_) => Err(StatementError::NoAnswer),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StatementError {
    #[error("{}", db::describe(.0))]
    Database(tokio_postgres::Error),
    #[error("no answer from the database within {STATEMENT_TIMEOUT:?}")]
    NoAnswer,
}

impl StatementError {
    fn code(&self) -> Option<&SqlState> {
        match self {
            StatementError::Database(e) => e.code(),
            StatementError::NoAnswer => None,
        }
    }
}
