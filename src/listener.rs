//! The LISTEN connection: turns the insert trigger's notifications into dispatcher
//! wake-ups (and the channels table's into the channel keeper's), and keeps itself alive.
//!
//! NOTIFY is only a hint; the table is the truth. So after every (re)connect the listener
//! issues LISTEN *first* and then wakes the dispatcher for a catch-up claim: a row
//! committed while it was away is found by that claim, a row committed after LISTEN by a
//! notification. A periodic keepalive query notices a half-open connection (which would
//! otherwise swallow notifications forever); reconnects back off with jitter and never
//! give up: a lost database never stops the process.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::db;
use crate::metrics::Metrics;
use crate::outbox::{channels, CHANNEL};
use crate::secret::Secret;

/// Reconnect waits: from a quarter second up to this.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(30);

pub struct Listener {
    pub url: Secret<String>,
    pub keepalive_interval: Duration,
    pub connect_timeout: Duration,
    /// Notified on every outbox notification and after every (re)connect.
    pub wake: Arc<Notify>,
    /// Notified on every channels notification (`pgpushd.channels`: one inserted or asked
    /// to close) and after every (re)connect.
    pub channels_wake: Arc<Notify>,
    /// `true` while LISTEN is in place; the daemon reports readiness and health from it.
    pub listening: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
}

impl Listener {
    /// Runs until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.listen_once(&mut failures) => outcome,
            };
            if self.listening.send_replace(false) {
                self.metrics.listener_reconnects.inc();
            }
            failures += 1;
            let wait = backoff(failures - 1, Duration::from_millis(250), MAX_RECONNECT_WAIT);
            warn!(error = %outcome, retry_in = ?wait, "listener lost its database connection");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One connection's life: connect, LISTEN, catch up, forward notifications until
    /// the connection fails. Returns why it ended.
    async fn listen_once(&self, failures: &mut u32) -> anyhow::Error {
        let (client, mut connection) =
            match db::connect_raw(&self.url, self.connect_timeout, "listener").await {
                Ok(c) => c,
                Err(e) => return e,
            };
        // Drive the connection ourselves: a spawned `Connection` future drops
        // notifications; `poll_message` hands them over.
        let (tx, mut notifications) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.channel() == channels::CHANNEL).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return anyhow::anyhow!("connection failed: {}", db::describe(&e)),
                }
            }
            anyhow::anyhow!("connection closed")
        });
        // Abort the driver whatever way this function ends.
        let _driver_guard = AbortOnDrop(driver.abort_handle());

        let listen = format!("LISTEN {CHANNEL}; LISTEN {}", channels::CHANNEL);
        if let Err(e) = client.batch_execute(&listen).await {
            return anyhow::anyhow!("LISTEN failed: {}", db::describe(&e));
        }
        if *failures > 0 {
            info!(after_failures = *failures, "listener reconnected");
        }
        *failures = 0;
        self.listening.send_replace(true);
        self.wake.notify_one(); // the catch-up claim
        self.channels_wake.notify_one();

        let mut keepalive = tokio::time::interval(self.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        loop {
            tokio::select! {
                n = notifications.recv() => match n {
                    Some(true) => self.channels_wake.notify_one(),
                    Some(false) => {
                        self.metrics.notifications.inc();
                        self.wake.notify_one();
                    }
                    None => break,
                },
                _ = keepalive.tick() => {
                    let probe = tokio::time::timeout(self.connect_timeout, client.simple_query("SELECT 1"));
                    match probe.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return anyhow::anyhow!("keepalive query failed: {}", db::describe(&e)),
                        Err(_) => return anyhow::anyhow!("keepalive query got no answer within {:?}", self.connect_timeout),
                    }
                }
            }
        }
        match driver.await {
            Ok(e) => e,
            Err(e) => anyhow::anyhow!("listener connection task failed: {e}"),
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
