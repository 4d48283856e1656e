//! The task that keeps a paused app's backlog out of the other apps' way (see
//! `app_gate`: the service refuses the app's credentials, throttles it or cannot be
//! reached), and a paused Web Push service's rows out of its app's others' way. It reads
//! the pauses ([`Transport::paused`]: an app's, or one push service's of an app) a few
//! times a second and, for each, through [`outbox::set_aside`]:
//!
//! - at each new pause, makes one row due when the pause ends (the probe) and parks the
//!   app's other waiting rows [`PARK`] ahead (rows parked less than half of that ago
//!   stay where they are, so a dead app's backlog is written once per half hour however
//!   often its probes fail), then wakes the dispatcher, which learns the probe's time
//!   from its next look;
//! - when the pause has ended but no probe went out within a probe's time (the row
//!   settled without a request, or its answer proved nothing), makes another row due;
//! - once the app is no longer paused (a probe was accepted, or a reload rebuilt it),
//!   brings the parked rows back, due at once.
//!
//! Like the other writers beside the dispatcher, it survives a lost database (what it
//! could not do is tried again while it still applies) and never stops the daemon; one
//! app's failing pass does not hold up the others'. Rows it parked come back by
//! themselves at their parking time, should the daemon stop before releasing them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::DatabaseConfig;
use crate::db;
use crate::metrics::Metrics;
use crate::outbox::set_aside;
use crate::transport::Pause;
use crate::transport::Transport;

/// How often the apps' pauses are read.
pub const EVERY: Duration = Duration::from_millis(200);
/// How far ahead a paused app's backlog is parked.
pub const PARK: Duration = Duration::from_secs(3600);
/// The server's bound on each statement (a chunk of rows takes milliseconds).
const STATEMENT_BOUND: Duration = Duration::from_secs(10);
/// The client's bound on one app's pass.
const PASS_BOUND: Duration = Duration::from_secs(120);

pub struct PausedApps {
    pub transport: Arc<dyn Transport>,
    pub database: DatabaseConfig,
    /// The dispatcher's wake-up: a probe row's new time is its next due row.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

/// What is paused: an app, or one push service (`https://host[:port]`) of an app.
type Paused = (String, Option<String>);

fn paused_key(pause: &Pause) -> Paused {
    (pause.app.clone(), pause.origin.clone())
}

/// What the task did for one paused app (or push service).
struct Parked {
    /// The pause it handled last.
    pause: u64,
    /// The times it parked the app's rows at (what a release looks for).
    at: Vec<SystemTime>,
    /// When it last made a probe row due.
    probe_due: Instant,
}

impl PausedApps {
    pub async fn run(self, cancel: CancellationToken) {
        let mut parked: HashMap<Paused, Parked> = HashMap::new();
        let mut client: Option<Client> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            let paused = self.transport.paused();
            for pause in &paused {
                let key = paused_key(pause);
                let done = parked.get(&key);
                let step = match done {
                    // No probe out a probe's time after the last was due (never before
                    // the pause's end): another.
                    Some(p) if p.pause == pause.number => {
                        if pause.probing || p.probe_due + pause.probe_wait > Instant::now() {
                            continue;
                        }
                        Step::ProbeAgain
                    }
                    _ => Step::NewPause,
                };
                let entry = parked.entry(key).or_insert_with(|| Parked {
                    pause: 0,
                    at: Vec::new(),
                    probe_due: Instant::now(),
                });
                if let Err(e) = self.pass(&mut client, pause, step, entry).await {
                    client = None;
                    warn!(app = %pause.app, origin = pause.origin, error = format!("{e:#}"),
                          "cannot set a paused app's backlog aside; trying again");
                }
            }
            let still: HashSet<Paused> = paused.iter().map(paused_key).collect();
            let reopened: Vec<Paused> = parked
                .keys()
                .filter(|key| !still.contains(*key))
                .cloned()
                .collect();
            for key in reopened {
                match self.release(&mut client, &key, &parked[&key].at).await {
                    Ok(()) => {
                        parked.remove(&key);
                    }
                    Err(e) => {
                        client = None;
                        warn!(app = %key.0, origin = key.1, error = format!("{e:#}"),
                              "cannot bring a paused app's backlog back; trying again");
                    }
                }
            }
        }
    }

    async fn connection<'c>(
        &self,
        client: &'c mut Option<Client>,
    ) -> anyhow::Result<&'c mut Client> {
        let c = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let d = &self.database;
                db::connect(&d.url, d.connect_timeout, "paused apps").await?
            }
        };
        Ok(client.insert(c))
    }

    /// A new pause: the probe, then the backlog parked; or another probe.
    async fn pass(
        &self,
        client: &mut Option<Client>,
        pause: &Pause,
        step: Step,
        entry: &mut Parked,
    ) -> anyhow::Result<()> {
        let c = self.connection(client).await?;
        // Rows parked at a time now past have come back already (and were parked again).
        entry.at.retain(|t| *t > SystemTime::now());
        let work = async {
            let now = Instant::now();
            let probe_at =
                set_aside::time_ahead(c, pause.until.saturating_duration_since(now)).await?;
            let probe = set_aside::probe(
                c,
                &pause.app,
                pause.origin.as_deref(),
                probe_at,
                &entry.at,
                &pause.reason,
                STATEMENT_BOUND,
            )
            .await?;
            let mut moved = 0;
            if step == Step::NewPause {
                let threshold = set_aside::time_ahead(c, PARK / 2).await?;
                let park_at = set_aside::time_ahead(c, PARK).await?;
                moved = set_aside::park(
                    c,
                    &pause.app,
                    pause.origin.as_deref(),
                    threshold,
                    park_at,
                    probe,
                    &pause.reason,
                    STATEMENT_BOUND,
                )
                .await?;
                if moved > 0 {
                    entry.at.push(park_at);
                }
            }
            Ok::<_, tokio_postgres::Error>((probe, moved))
        };
        let (probe, moved) = tokio::time::timeout(PASS_BOUND, work)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {PASS_BOUND:?}"))?
            .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))?;
        entry.pause = pause.number;
        entry.probe_due = pause.until.max(Instant::now());
        let app = self.metrics.app_label(&pause.app);
        if step == Step::NewPause {
            self.metrics.app_pauses.get_or_create(&app).inc();
        }
        self.metrics
            .rows_set_aside
            .get_or_create(&app)
            .inc_by(moved);
        info!(app = %pause.app, origin = pause.origin, cause = ?pause.cause, parked = moved, probe = ?probe,
              probe_in = ?pause.until.saturating_duration_since(Instant::now()),
              again = step == Step::ProbeAgain,
              "a paused app: its backlog parked, one row due for the probe");
        self.wake.notify_one();
        Ok(())
    }

    /// The app (or push service) is no longer paused: its parked rows are due now.
    async fn release(
        &self,
        client: &mut Option<Client>,
        (app, origin): &Paused,
        at: &[SystemTime],
    ) -> anyhow::Result<()> {
        if at.is_empty() {
            return Ok(());
        }
        let c = self.connection(client).await?;
        let release = set_aside::release(c, app, origin.as_deref(), at, STATEMENT_BOUND);
        let released = tokio::time::timeout(PASS_BOUND, release)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {PASS_BOUND:?}"))?
            .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))?;
        info!(app = %app, origin, released, "the app delivers again: its parked backlog is due");
        self.wake.notify_one();
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The pause is new: a probe row, and the backlog parked.
    NewPause,
    /// The probe did not go out (or proved nothing): another row for it.
    ProbeAgain,
}
