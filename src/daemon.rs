//! Wiring: the listener and the dispatcher around one wake-up, the metrics endpoint, and
//! what systemd is told — READY=1 once the database is connected, LISTEN issued and the
//! first catch-up claim done; WATCHDOG=1 while the dispatcher loop turns; STATUS= with
//! the queue and the send rate; RELOADING=1/READY=1 around a reload; STOPPING=1.
//! Stopping is a drain bounded by `[daemon] shutdown_timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::config::{Config, DatabaseConfig};
use crate::db;
use crate::dispatcher::{Dispatcher, Heartbeat, Progress, Settings};
use crate::listener::Listener;
use crate::metrics::{self, Metrics};
use crate::outbox::migrate;
use crate::systemd::{self, Notifier};
use crate::transport::Transport;

/// How often the queue gauges and systemd's STATUS line are refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// After the drain deadline, how long batches get to commit what was answered.
const COMMIT_GRACE: Duration = Duration::from_secs(5);

/// The daemon, built but not yet running; watch its progress before calling [`Daemon::run`].
pub struct Daemon {
    config: Config,
    transport: Arc<dyn Transport>,
    progress: watch::Sender<Progress>,
    listening: watch::Sender<bool>,
    settings: watch::Sender<Settings>,
    database: watch::Sender<Result<(), String>>,
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    notifier: Notifier,
    /// READY=1 was sent; a reload before that must not send it early.
    ready: std::sync::atomic::AtomicBool,
}

impl Daemon {
    pub fn new(config: Config, transport: Arc<dyn Transport>) -> Daemon {
        let settings = settings_of(&config);
        let metrics = Arc::new(Metrics::new());
        metrics.set_apps(config.apps.keys());
        Daemon {
            config,
            transport,
            progress: watch::Sender::new(Progress::default()),
            listening: watch::Sender::new(false),
            settings: watch::Sender::new(settings),
            database: watch::Sender::new(Ok(())),
            metrics,
            heartbeat: Arc::new(Heartbeat::default()),
            notifier: Notifier::from_env(),
            ready: Default::default(),
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

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs until `cancel`, then drains: the batches in flight get `[daemon]
    /// shutdown_timeout` to send and record; after that each records what was answered
    /// and releases the rest untouched. Fails only when it cannot start (the database's
    /// schema is not the one this build needs, the metrics address is taken).
    pub async fn run(&self, cancel: CancellationToken) -> anyhow::Result<()> {
        let metrics_listener = match self.config.metrics.listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        if !self.wait_for_schema(&cancel).await? {
            return Ok(());
        }
        let db = &self.config.database;
        let wake = Arc::new(Notify::new());
        let tracker = TaskTracker::new();
        let stop = cancel.child_token();
        let hard_stop = CancellationToken::new();
        tracker.spawn(
            Listener {
                url: db.listen_url().clone(),
                keepalive_interval: db.keepalive_interval,
                connect_timeout: db.connect_timeout,
                wake: wake.clone(),
                listening: self.listening.clone(),
                metrics: self.metrics.clone(),
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
                metrics: self.metrics.clone(),
                heartbeat: self.heartbeat.clone(),
                database: self.database.clone(),
                hard_stop: hard_stop.clone(),
            }
            .run(stop.clone()),
        );
        // The binary protocol's feedback service, polled for unregistered tokens.
        for poller in crate::apns::binary::feedback::pollers(&self.config) {
            tracker.spawn(poller.run(stop.clone()));
        }
        if let Some(listener) = metrics_listener {
            let endpoint = Arc::new(metrics::Endpoint {
                metrics: self.metrics.clone(),
                transport: self.transport.clone(),
                database: self.database.subscribe(),
                listening: self.listening.subscribe(),
            });
            info!(listen = %listener.local_addr()?, "metrics at /metrics, health at /healthz");
            tracker.spawn(metrics::serve(listener, endpoint, stop.clone()));
        }
        // Background work that ends with the process, not part of the drain.
        let background = cancel.child_token();
        tokio::spawn(self.monitor(background.clone()));
        if let Some(period) = systemd::watchdog_interval() {
            tokio::spawn(watchdog(
                self.heartbeat.clone(),
                period,
                Notifier::from_env(),
                background.clone(),
            ));
        }
        if self.config.retention.is_enabled() {
            tracker.spawn(crate::retention::run(
                db.clone(),
                self.config.retention.clone(),
                stop.clone(),
            ));
        }
        tracker.close();

        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.ready() => {
                info!(apps = self.config.apps.len(), "pgpushd ready");
                self.notifier.ready();
                self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }

        stop.cancelled().await;
        background.cancel();
        self.notifier.stopping();
        let timeout = self.config.daemon.shutdown_timeout;
        info!(?timeout, "stopping: finishing the batches in flight");
        if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
            warn!(?timeout, "shutdown_timeout reached: recording what was answered, releasing the rest untouched");
            hard_stop.cancel();
            if tokio::time::timeout(COMMIT_GRACE, tracker.wait())
                .await
                .is_err()
            {
                warn!("batches did not commit in time; their rows are released untouched");
            }
        }
        Ok(())
    }

    /// Completes once LISTEN is in place and a claim has completed after it (the
    /// catch-up): from then on no row can be missed.
    async fn ready(&self) {
        let mut listening = self.listening.subscribe();
        let _ = listening.wait_for(|l| *l).await;
        let after = self.progress.borrow().claims;
        let _ = self
            .progress
            .subscribe()
            .wait_for(|p| p.claims > after)
            .await;
    }

    /// Applies what a reloaded config may change without a restart, telling systemd.
    /// (App credentials are reloaded by the caller, which owns the transport.)
    pub fn reload(&self, config: &Config) {
        let ready = self.ready.load(std::sync::atomic::Ordering::SeqCst);
        if ready {
            self.notifier.reloading();
        }
        self.settings.send_if_modified(|s| {
            let new = settings_of(config);
            let changed = *s != new;
            *s = new;
            changed
        });
        self.metrics.set_apps(config.apps.keys());
        if ready {
            self.notifier.ready();
        }
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

    /// Every few seconds: the queue gauges, and systemd's STATUS line.
    fn monitor(
        &self,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let db = self.config.database.clone();
        let metrics = self.metrics.clone();
        let progress = self.progress.subscribe();
        let notifier = Notifier::from_env();
        async move {
            let mut client = None;
            let mut last = (Instant::now(), progress.borrow().sent);
            let mut tick = tokio::time::interval(STATUS_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let queue = match queue_stats(&db, &mut client).await {
                    Ok((depth, oldest)) => {
                        metrics.queue_depth.set(depth);
                        metrics.oldest_pending_age.set(oldest);
                        format!("{depth} pending, oldest due {oldest:.0}s ago")
                    }
                    Err(e) => {
                        client = None;
                        format!("database unreachable: {e:#}")
                    }
                };
                let now = (Instant::now(), progress.borrow().sent);
                let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64().max(1e-3);
                last = now;
                notifier.status(&format!("{rate:.0} sent/s; {queue}"));
            }
        }
    }
}

/// Pending rows, and how long the oldest due one has waited (seconds).
async fn queue_stats(
    db: &DatabaseConfig,
    client: &mut Option<tokio_postgres::Client>,
) -> anyhow::Result<(i64, f64)> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(db::connect(&db.url, db.connect_timeout, "monitor").await?);
    }
    let c = client.as_ref().expect("connected above");
    let row = tokio::time::timeout(
        db.connect_timeout,
        c.query_one(
            "SELECT (SELECT count(*) FROM pgpushd.outbox WHERE status = 'pending'),
                    coalesce((SELECT extract(epoch FROM now() - min(send_after))::float8
                                FROM pgpushd.outbox
                               WHERE status = 'pending' AND send_after <= now()
                                 AND isfinite(send_after)), 0)",
            &[],
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("queue statistics timed out"))?
    .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))?;
    Ok((row.get(0), row.get(1)))
}

/// WATCHDOG=1 every half period, only while the dispatcher loop keeps turning.
async fn watchdog(
    heartbeat: Arc<Heartbeat>,
    period: Duration,
    notifier: Notifier,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let age = heartbeat.age();
        if age < period / 2 {
            notifier.watchdog();
        } else {
            warn!(
                ?age,
                "the dispatcher loop has not turned; withholding the watchdog ping"
            );
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
