//! An app's gateway connections: `connections` slots, each opened on demand and
//! replaced when it ends (which, in this protocol, every refused notification causes).
//!
//! A connection that ends without the gateway ever handling a notification on it — the
//! certificate turned away after the handshake, a gateway that closes at once — counts
//! as a failed attempt: the slot backs off (capped, jittered) before the next, and asks
//! for notifications to be deferred meanwhile, so a refused certificate costs no attempts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connection::{ConnectOptions, Connection};
use crate::backoff::backoff;

/// A connection unused this long is replaced rather than used. Nothing on an idle
/// connection tells a live gateway from one a NAT or firewall silently forgot (TCP
/// keepalive, probing after 30 s, narrows that but some middleboxes ignore it), and a
/// dead connection would swallow the first notifications written to it. NATs and
/// firewalls commonly forget a quiet flow after 2 to 5 minutes (some sooner): a minute
/// stays under all of those, and costs one TLS handshake per idle minute at most.
pub(crate) const MAX_IDLE: Duration = Duration::from_secs(60);

/// No connection now; try again in `after`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unavailable {
    pub reason: String,
    pub after: Duration,
}

pub(crate) struct Pool {
    app: String,
    opts: ConnectOptions,
    slots: Vec<Mutex<Slot>>,
    /// Where the search for a connection starts, so the load rotates.
    next: AtomicUsize,
    reconnect_base: Duration,
    reconnect_max: Duration,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Connection>>,
    /// Failed attempts in a row: the backoff grows with them.
    failures: u32,
    down: Option<(String, Instant)>,
}

impl Pool {
    pub(crate) fn new(
        app: &str,
        opts: ConnectOptions,
        connections: usize,
        reconnect_base: Duration,
        reconnect_max: Duration,
    ) -> Pool {
        Pool {
            app: app.to_owned(),
            opts,
            slots: (0..connections.max(1))
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            next: AtomicUsize::new(0),
            reconnect_base,
            reconnect_max,
            shutdown: CancellationToken::new(),
        }
    }

    /// A live connection: one already open, else the next slot's, connecting it if need be.
    pub(crate) async fn acquire(&self) -> Result<Arc<Connection>, Unavailable> {
        let n = self.slots.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            // A slot being connected is skipped here, not waited for.
            if let Ok(slot) = self.slots[(first + i) % n].try_lock() {
                if let Some(c) = slot.conn.as_ref().filter(|c| c.is_alive()) {
                    if c.idle_for() < MAX_IDLE {
                        return Ok(c.clone());
                    }
                }
            }
        }
        let mut slot = self.slots[first % n].lock().await;
        self.forget_dead(&mut slot);
        if let Some(c) = &slot.conn {
            return Ok(c.clone());
        }
        let now = Instant::now();
        if let Some((reason, until)) = slot.down.as_ref().filter(|(_, u)| *u > now) {
            return Err(Unavailable {
                reason: reason.clone(),
                after: *until - now,
            });
        }
        if self.shutdown.is_cancelled() {
            return Err(Unavailable {
                reason: "shutting down".into(),
                after: Duration::ZERO,
            });
        }
        match Connection::connect(&self.opts, &self.shutdown).await {
            Ok(c) => {
                let c = Arc::new(c);
                slot.conn = Some(c.clone());
                slot.down = None;
                Ok(c)
            }
            Err(reason) => Err(self.failed(&mut slot, reason)),
        }
    }

    /// Connections up now (slots being connected are not counted).
    pub(crate) fn open_connections(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|slot| slot.try_lock().ok())
            .filter(|slot| slot.conn.as_ref().is_some_and(|c| c.is_alive()))
            .count()
    }

    /// `Err` with the reason while no connection is up and a slot is backing off.
    pub(crate) fn health(&self) -> Result<(), String> {
        let now = Instant::now();
        let mut error = None;
        for slot in &self.slots {
            let Ok(slot) = slot.try_lock() else {
                return Ok(()); // connecting
            };
            if slot.conn.as_ref().is_some_and(|c| c.is_alive()) {
                return Ok(());
            }
            if let Some((reason, until)) = &slot.down {
                if *until > now {
                    error = Some(reason.clone());
                }
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Drops an ended connection, counting it as a failure if it never carried anything.
    fn forget_dead(&self, slot: &mut Slot) {
        if let Some(c) = slot.conn.as_ref().filter(|c| c.idle_for() >= MAX_IDLE) {
            debug!(app = %self.app, conn = c.id(), "replacing an idle gateway connection");
            c.kill("idle for too long");
            slot.conn = None;
            return;
        }
        let Some(conn) = slot.conn.take_if(|c| !c.is_alive()) else {
            return;
        };
        if conn.productive() {
            slot.failures = 0;
        } else {
            let reason = conn
                .end_reason()
                .unwrap_or_else(|| "the connection ended".into());
            self.failed(
                slot,
                format!("the gateway handled nothing before: {reason}"),
            );
        }
    }

    fn failed(&self, slot: &mut Slot, reason: String) -> Unavailable {
        let wait = backoff(slot.failures, self.reconnect_base, self.reconnect_max);
        slot.failures = slot.failures.saturating_add(1);
        warn!(app = %self.app, error = %reason, retry_in = ?wait, "APNs gateway connection trouble");
        slot.down = Some((reason.clone(), Instant::now() + wait));
        Unavailable {
            reason,
            after: wait,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
