//! Wiring: the listener and the dispatcher around one wake-up, started once the
//! database answers with the expected schema, stopped by a cancellation token with a drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::config::Config;
use crate::db;
use crate::dispatcher::{Dispatcher, Progress, Settings};
use crate::listener::Listener;
use crate::outbox::migrate;
use crate::transport::Transport;

/// The daemon, built but not yet running; watch its progress before calling [`Daemon::run`].
pub struct Daemon {
    config: Config,
    transport: Arc<dyn Transport>,
    progress: watch::Sender<Progress>,
    listening: watch::Sender<bool>,
    settings: watch::Sender<Settings>,
}

impl Daemon {
    pub fn new(config: Config, transport: Arc<dyn Transport>) -> Daemon {
        let settings = settings_of(&config);
        Daemon {
            config,
            transport,
            progress: watch::Sender::new(Progress::default()),
            listening: watch::Sender::new(false),
            settings: watch::Sender::new(settings),
        }
    }

    /// Totals of rows sent, failed, ... since start.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// `true` while the listener's LISTEN is in place.
    pub fn listening(&self) -> watch::Receiver<bool> {
        self.listening.subscribe()
    }

    /// Runs until `cancel`, then gives the batches in flight up to `drain_timeout` to
    /// finish. Fails only when the database's schema is not the one this build needs.
    pub async fn run(
        &self,
        cancel: CancellationToken,
        drain_timeout: Duration,
    ) -> anyhow::Result<()> {
        if !self.wait_for_schema(&cancel).await? {
            return Ok(());
        }
        let db = &self.config.database;
        let wake = Arc::new(Notify::new());
        let tracker = TaskTracker::new();
        let stop = cancel.child_token();
        tracker.spawn(
            Listener {
                url: db.listen_url().clone(),
                keepalive_interval: db.keepalive_interval,
                connect_timeout: db.connect_timeout,
                wake: wake.clone(),
                listening: self.listening.clone(),
            }
            .run(stop.clone()),
        );
        tracker.spawn(
            Dispatcher {
                url: db.url.clone(),
                connect_timeout: db.connect_timeout,
                settings: self.settings.subscribe(),
                transport: self.transport.clone(),
                wake,
                progress: self.progress.clone(),
            }
            .run(stop.clone()),
        );
        if self.config.retention.is_enabled() {
            tracker.spawn(crate::retention::run(
                db.clone(),
                self.config.retention.clone(),
                stop.clone(),
            ));
        }
        tracker.close();
        info!(apps = self.config.apps.len(), "pgpushd running");

        stop.cancelled().await;
        info!(timeout = ?drain_timeout, "stopping: finishing the batches in flight");
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!("drain timed out; unsent claimed rows are released untouched");
        }
        Ok(())
    }

    /// Applies what a reloaded config may change without a restart.
    pub fn reload(&self, config: &Config) {
        self.settings.send_if_modified(|s| {
            let new = settings_of(config);
            let changed = *s != new;
            *s = new;
            changed
        });
    }

    /// Waits for the database (it may be down at start: keep trying), then checks the
    /// schema. `Ok(false)`: cancelled while waiting.
    async fn wait_for_schema(&self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let db = &self.config.database;
        let mut failures = 0;
        loop {
            match db::connect(&db.url, db.connect_timeout, "startup").await {
                Ok(client) => {
                    migrate::ensure_current(&client).await?;
                    return Ok(true);
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(
                        failures - 1,
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                    );
                    warn!(error = format!("{e:#}"), retry_in = ?wait, "database unreachable");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

fn settings_of(config: &Config) -> Settings {
    Settings {
        poll_interval: config.database.poll_interval,
        batch_size: config.database.batch_size,
        max_batches_in_flight: config.database.max_batches_in_flight,
        retry: config.retry.clone(),
    }
}
