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

use crate::awake::Keeper;
use crate::backoff::backoff;
use crate::config::{Config, DatabaseConfig, RetentionConfig};
use crate::db;
use crate::dispatcher::{ClaimSignals, Dispatcher, Heartbeat, Progress, Settings, HEARTBEAT_EVERY};
use crate::listener::Listener;
use crate::metrics::{self, Metrics};
use crate::outbox::migrate;
use crate::outbox::status::Queue;
use crate::reports;
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
    retention: watch::Sender<RetentionConfig>,
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
            retention: watch::Sender::new(config.retention.clone()),
            config,
            transport,
            progress: watch::Sender::new(Progress::default()),
            listening: watch::Sender::new(false),
            settings: watch::Sender::new(settings),
            database: watch::Sender::new(Ok(())),
            metrics,
            // The watchdog pings every half period, when the loop beat within it.
            heartbeat: Arc::new(Heartbeat::beating_every(
                systemd::watchdog_interval().map_or(HEARTBEAT_EVERY, |period| period / 4),
            )),
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
        let tracker = TaskTracker::new();
        let stop = cancel.child_token();
        // Served from the start: while the database is out of reach, /healthz says so
        // (a probe that got no answer would wait out its own timeout).
        if let Some(addr) = self.config.metrics.listen {
            let listener = metrics::bind(addr).await?;
            info!(listen = %listener.local_addr()?, "metrics at /metrics, health at /healthz");
            tracker.spawn(metrics::serve(
                listener,
                self.metrics_sources(),
                stop.clone(),
            ));
        }
        if !self.wait_for_schema(&cancel).await? {
            tracker.close();
            tracker.wait().await;
            return Ok(());
        }
        let db = &self.config.database;
        let wake = Arc::new(Notify::new());
        let channels_wake = Arc::new(Notify::new());
        let hard_stop = CancellationToken::new();
        tracker.spawn(
            Listener {
                url: db.listen_url().clone(),
                keepalive_interval: db.keepalive_interval,
                connect_timeout: db.connect_timeout,
                wake: wake.clone(),
                channels_wake: channels_wake.clone(),
                listening: self.listening.clone(),
                metrics: self.metrics.clone(),
            }
            .run(stop.clone()),
        );
        let awake = watch::Sender::new(false);
        let signals = Arc::new(ClaimSignals::default());
        tracker.spawn(
            Keeper {
                url: db.url.clone(),
                connect_timeout: db.connect_timeout,
                settings: self.settings.subscribe(),
                signals: signals.clone(),
                awake: awake.clone(),
                wake: wake.clone(),
                metrics: self.metrics.clone(),
            }
            .run(stop.clone()),
        );
        tracker.spawn(
            crate::paused_apps::PausedApps {
                transport: self.transport.clone(),
                database: db.clone(),
                wake: wake.clone(),
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
                wake: wake.clone(),
                progress: self.progress.clone(),
                metrics: self.metrics.clone(),
                heartbeat: self.heartbeat.clone(),
                database: self.database.clone(),
                hard_stop: hard_stop.clone(),
                awake: awake.subscribe(),
                signals,
            }
            .run(stop.clone()),
        );
        tracker.spawn(
            crate::channels::keeper::Keeper {
                url: db.url.clone(),
                connect_timeout: db.connect_timeout,
                settings: self.settings.subscribe(),
                transport: self.transport.clone(),
                wake: channels_wake,
                metrics: self.metrics.clone(),
                policies: Default::default(),
            }
            .run(stop.clone()),
        );
        // What the transport reports on its own: tokens unregistered (binary feedback),
        // rows reported sent and then found undelivered (a late binary error packet).
        tracker.spawn(reports::run(
            &reports::UNREGISTERED,
            self.transport.clone(),
            db.clone(),
            stop.clone(),
        ));
        tracker.spawn(reports::run(
            &reports::UNDELIVERED,
            self.transport.clone(),
            db.clone(),
            stop.clone(),
        ));
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
        tracker.spawn(crate::retention::run(
            db.clone(),
            self.retention.subscribe(),
            stop.clone(),
        ));
        tracker.close();

        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.ready(&wake) => {
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

    /// What `/metrics` and `/healthz` read.
    fn metrics_sources(&self) -> Arc<metrics::Sources> {
        let heartbeat = self.heartbeat.clone();
        Arc::new(metrics::Sources {
            metrics: self.metrics.clone(),
            transport: self.transport.clone(),
            database: self.database.subscribe(),
            listening: self.listening.subscribe(),
            stuck_batch: Arc::new(move || heartbeat.stuck_batch()),
        })
    }

    /// Completes once LISTEN is in place and a claim has completed after it (the
    /// catch-up): from then on no row can be missed. It asks for that claim itself: the
    /// listener's catch-up may have completed before this read the count, and an idle
    /// daemon would then wait for the next wake-up to say it is ready.
    async fn ready(&self, wake: &Notify) {
        let mut listening = self.listening.subscribe();
        let _ = listening.wait_for(|l| *l).await;
        let after = self.progress.borrow().claims;
        wake.notify_one();
        let _ = self
            .progress
            .subscribe()
            .wait_for(|p| p.claims > after)
            .await;
    }

    /// Applies a reloaded config, all of it or nothing: the transport's apps first (a
    /// key or certificate that does not load keeps the running config), then what the
    /// loops read (`[database]` tuning, `[retry]`, `[retention]`) and the metrics' apps,
    /// telling systemd. Returns the apps rebuilt, added or removed. Keys read only at
    /// start (database URLs, `[metrics] listen`, `[log]`, `[daemon]`) are logged as
    /// needing a restart.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, String> {
        let ready = self.ready.load(std::sync::atomic::Ordering::SeqCst);
        if ready {
            self.notifier.reloading();
        }
        let changed = self.transport.reload(&config.apps);
        if changed.is_ok() {
            self.settings.send_if_modified(|s| {
                let new = settings_of(config);
                let changed = *s != new;
                *s = new;
                changed
            });
            self.retention.send_if_modified(|r| {
                let changed = *r != config.retention;
                *r = config.retention.clone();
                changed
            });
            self.metrics.set_apps(config.apps.keys());
            for key in restart_only_changes(&self.config, config) {
                warn!(key, "changed in the file; takes effect at the next restart");
            }
        }
        if ready {
            self.notifier.ready();
        }
        changed
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
                    let _ = self.database.send_replace(Ok(()));
                    return Ok(true);
                }
                Err(e) => {
                    let _ = self
                        .database
                        .send_replace(Err(format!("unreachable at start-up: {e:#}")));
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
                    Ok(Queue {
                        pending,
                        oldest_due_age,
                    }) => {
                        metrics.queue_depth.set(pending);
                        metrics.oldest_pending_age.set(oldest_due_age);
                        format!("{pending} pending, oldest due {oldest_due_age:.0}s ago")
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

/// The queue's gauges on the monitor's connection, (re)connecting first when needed; a
/// read that gets no answer in time is cancelled on the server (the caller then drops the
/// connection).
async fn queue_stats(
    db: &DatabaseConfig,
    connection: &mut Option<(tokio_postgres::Client, db::Canceller)>,
) -> anyhow::Result<Queue> {
    if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
        *connection = Some(db::connect_cancellable(&db.url, db.connect_timeout, "monitor").await?);
    }
    let (c, canceller) = connection.as_ref().expect("connected above");
    canceller
        .within(db.connect_timeout, Queue::read(c))
        .await
        .map_err(|e| anyhow::anyhow!("queue statistics: {e}"))?
        .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))
}

/// WATCHDOG=1 every half period, only while the dispatcher loop keeps turning and no batch
/// is stuck in its transaction.
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
        if let Some(open) = heartbeat.stuck_batch() {
            warn!(
                ?open,
                "a batch has held its transaction past max_batch_duration; withholding the watchdog ping"
            );
        } else if age < period / 2 {
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
        awake_poll_interval: config.database.awake_poll_interval,
        awake_linger: config.database.awake_linger,
        awake_min_rate: config.database.awake_min_rate,
        synchronous_commit: config.database.synchronous_commit,
        batch_size: config.database.batch_size,
        max_batches_in_flight: config.database.max_batches_in_flight,
        max_batch_duration: config.database.max_batch_duration,
        retry: config.retry.clone(),
        outcome_hold: config.database.outcome_hold,
    }
}

/// The keys a reload cannot apply, because only start-up reads them.
fn restart_only_changes(running: &Config, reloaded: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.database, &reloaded.database);
    [
        ("database.url", a.url != b.url),
        ("database.listen_url", a.listen_url != b.listen_url),
        (
            "database.keepalive_interval",
            a.keepalive_interval != b.keepalive_interval,
        ),
        (
            "database.connect_timeout",
            a.connect_timeout != b.connect_timeout,
        ),
        (
            "metrics.listen",
            running.metrics.listen != reloaded.metrics.listen,
        ),
        ("log.level", running.log.level != reloaded.log.level),
        (
            "daemon.shutdown_timeout",
            running.daemon.shutdown_timeout != reloaded.daemon.shutdown_timeout,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}
