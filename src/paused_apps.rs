//! The task that keeps a paused app's backlog out of the other apps' way: for each new
//! pause the transport reports ([`Transport::paused`]: the service refuses the app's
//! credentials or throttles it), it sets the app's pending rows aside until the pause
//! ends ([`outbox::set_aside`]), once, then wakes the dispatcher, which learns when the
//! probe falls due from its next look.
//!
//! Like the other writers beside the dispatcher, it survives a lost database (a pause it
//! could not write is tried again while it lasts) and never stops the daemon. A pause
//! that ends before its turn costs nothing: the rows claimed meanwhile were deferred by
//! the gate, as they always are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app_gate::Pause;
use crate::backoff::backoff;
use crate::config::DatabaseConfig;
use crate::metrics::Metrics;
use crate::transport::Transport;
use crate::{db, outbox};

/// How often the apps' pauses are read.
pub const EVERY: Duration = Duration::from_millis(500);
/// The server's bound on each statement of a pass (a chunk of rows takes milliseconds).
const STATEMENT_BOUND: Duration = Duration::from_secs(10);
/// The client's bound on a whole pass.
const PASS_BOUND: Duration = Duration::from_secs(120);

pub struct PausedApps {
    pub transport: Arc<dyn Transport>,
    pub database: DatabaseConfig,
    /// The dispatcher's wake-up: the probe row's new time is its next due row.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl PausedApps {
    pub async fn run(self, cancel: CancellationToken) {
        // The last pause set aside, by app.
        let mut done: HashMap<String, u64> = HashMap::new();
        let mut client: Option<Client> = None;
        let mut failures = 0u32;
        loop {
            let wait = match failures {
                0 => EVERY,
                n => backoff(n - 1, EVERY, Duration::from_secs(30)),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            for pause in self.transport.paused() {
                if done.get(&pause.app) == Some(&pause.number) {
                    continue;
                }
                match self.set_aside(&mut client, &pause).await {
                    Ok(()) => {
                        done.insert(pause.app.clone(), pause.number);
                        failures = 0;
                    }
                    Err(e) => {
                        client = None;
                        failures += 1;
                        warn!(app = %pause.app, error = format!("{e:#}"),
                              "cannot set a paused app's backlog aside; trying again");
                        break;
                    }
                }
            }
        }
    }

    async fn set_aside(&self, client: &mut Option<Client>, pause: &Pause) -> anyhow::Result<()> {
        let c = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let d = &self.database;
                db::connect(&d.url, d.connect_timeout, "paused apps").await?
            }
        };
        let c = client.insert(c);
        let now = Instant::now();
        let pass = outbox::set_aside::set_aside(
            c,
            &pause.app,
            pause.until.saturating_duration_since(now),
            pause.backlog_at().saturating_duration_since(now),
            &pause.reason,
            STATEMENT_BOUND,
        );
        // On a timeout the connection is dropped (the caller forgets it), which ends the
        // statement on the server.
        let moved = tokio::time::timeout(PASS_BOUND, pass)
            .await
            .map_err(|_| anyhow::anyhow!("setting the backlog aside timed out"))?
            .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))?;
        let app = self.metrics.app_label(&pause.app);
        self.metrics.app_pauses.get_or_create(&app).inc();
        self.metrics
            .rows_set_aside
            .get_or_create(&app)
            .inc_by(moved.rows + u64::from(moved.probe));
        info!(app = %pause.app, pause = pause.number, cause = ?pause.cause,
              rows = moved.rows, probe = moved.probe,
              back_in = ?pause.backlog_at().saturating_duration_since(Instant::now()),
              "the paused app's backlog is set aside until the pause ends");
        self.wake.notify_one();
        Ok(())
    }
}
