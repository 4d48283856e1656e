//! Prometheus metrics (`pgpushd_*`) and the `/metrics` + `/healthz` endpoint.
//!
//! The daemon's parts update [`Metrics`] as they work; the endpoint encodes it on each
//! scrape, after refreshing the values that are read rather than counted (connections,
//! app health). `/healthz` answers 200 while the database and every app are usable, 503
//! with the reasons otherwise.
//!
//! The listener survives clients that connect and never speak: a connection must send
//! its request head within [`Limits::header_read_timeout`] (also between requests on a
//! kept-alive one), at most [`Limits::max_connections`] are served at once (the excess
//! is closed at once and counted in `pgpushd_metrics_connections_refused_total`), and
//! failing `accept`s (EMFILE) back off instead of spinning.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::apns::reason::Reason;
use crate::fcm;
use crate::outcome::RowStatus;
use crate::transport::Transport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    pub app: String,
    /// `sent`, `failed`, `expired`, `retried` (transient error) or `deferred` (the app's
    /// credentials were refused).
    pub outcome: String,
    /// Apple's reason word (`BadDeviceToken`, `TooManyRequests`, ...), `none` for sent
    /// rows, `other` for anything without one.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `awake` or `asleep`.
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub app: String,
    /// `pending`, `active`, `closing` or `failed` (closed ones are not counted).
    pub status: String,
}

/// Every metric the daemon keeps.
pub struct Metrics {
    registry: Registry,
    pub rows: Family<RowLabels, Counter>,
    pub request_latency: Family<AppLabels, Histogram, fn() -> Histogram>,
    pub requests_in_flight: Gauge,
    pub connections: Family<AppLabels, Gauge>,
    pub app_healthy: Family<AppLabels, Gauge>,
    pub batches: Counter,
    pub batch_failures: Counter,
    /// Rows answered whose outcome the database refused to record (see `dispatcher`).
    pub outcome_write_failures: Counter,
    /// Batches given up for holding their transaction past `max_batch_duration`.
    pub batches_abandoned: Counter,
    pub listener_reconnects: Counter,
    pub queue_depth: Gauge,
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    pub database_up: Gauge,
    /// 1 while this daemon is awake: it looks for rows itself and writers skip NOTIFY.
    pub awake: Gauge,
    pub wakeup_transitions: Family<TransitionLabels, Counter>,
    /// Attempts to sleep that found a writer still inside a transaction that may have
    /// seen the daemon awake (the daemon stays awake and tries again).
    pub wakeup_barrier_busy: Counter,
    /// NOTIFYs the listener received.
    pub notifications: Counter,
    /// Rows claimed while awake: their writers (most of them) did not notify.
    pub rows_found_awake: Counter,
    /// Looks (one statement, no transaction) that found no row due, so claimed nothing.
    pub looks_empty: Counter,
    /// Round trips to the database by the batches (looks, claims, outcomes) and the
    /// wake-up keeper: each costs the server a wake-up, whatever it carries.
    pub database_round_trips: Counter,
    /// Pauses of an app (credentials refused, throttled) whose backlog was set aside.
    pub app_pauses: Family<AppLabels, Counter>,
    /// Rows of paused apps moved to the end of their app's pause (see `paused_apps`).
    pub rows_set_aside: Family<AppLabels, Counter>,
    /// Connections to the metrics listener closed at once because
    /// [`Limits::max_connections`] were being served.
    pub metrics_connections_refused: Counter,
    /// Broadcast channels in `pgpushd.channels`, by app and status (see `channels`).
    pub channels: Family<ChannelLabels, Gauge>,
    /// The configured apps: rows naming any other app are counted as `unknown`, so a
    /// producer's typo cannot grow the series without bound.
    known_apps: std::sync::RwLock<std::collections::HashSet<String>>,
    /// The `channels` series set last time: one the table no longer counts goes to 0.
    channel_series: std::sync::Mutex<std::collections::HashSet<ChannelLabels>>,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgpushd");
        let m = Metrics {
            rows: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            requests_in_flight: Gauge::default(),
            connections: Family::default(),
            app_healthy: Family::default(),
            batches: Counter::default(),
            batch_failures: Counter::default(),
            outcome_write_failures: Counter::default(),
            batches_abandoned: Counter::default(),
            listener_reconnects: Counter::default(),
            queue_depth: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            database_up: Gauge::default(),
            awake: Gauge::default(),
            wakeup_transitions: Family::default(),
            wakeup_barrier_busy: Counter::default(),
            notifications: Counter::default(),
            rows_found_awake: Counter::default(),
            looks_empty: Counter::default(),
            database_round_trips: Counter::default(),
            app_pauses: Family::default(),
            rows_set_aside: Family::default(),
            metrics_connections_refused: Counter::default(),
            channels: Family::default(),
            known_apps: Default::default(),
            channel_series: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rows",
            "Rows settled, by app, outcome and the push service's reason",
            m.rows.clone(),
        );
        registry.register(
            "push_request_duration_seconds",
            "Time from handing a row to its push service to the answer, by app",
            m.request_latency.clone(),
        );
        registry.register(
            "push_requests_in_flight",
            "Requests to the push services awaiting an answer",
            m.requests_in_flight.clone(),
        );
        registry.register(
            "push_connections",
            "Open connections to the push services, by app",
            m.connections.clone(),
        );
        // The same series under their names from before Web Push, when they said apns_
        // for every service; kept for one release so dashboards and alerts do not break.
        registry.register(
            "apns_request_duration_seconds",
            "Deprecated: pgpushd_push_request_duration_seconds",
            m.request_latency.clone(),
        );
        registry.register(
            "apns_requests_in_flight",
            "Deprecated: pgpushd_push_requests_in_flight",
            m.requests_in_flight.clone(),
        );
        registry.register(
            "apns_connections",
            "Deprecated: pgpushd_push_connections",
            m.connections.clone(),
        );
        registry.register(
            "app_healthy",
            "1 while the app's push service accepts its credentials and a connection can be had",
            m.app_healthy.clone(),
        );
        registry.register("batches", "Batches claimed and recorded", m.batches.clone());
        registry.register(
            "batch_failures",
            "Batches that failed on a database error (their rows stay pending)",
            m.batch_failures.clone(),
        );
        registry.register(
            "outcome_write_failures",
            "Rows answered whose outcome could not be recorded, per failed write",
            m.outcome_write_failures.clone(),
        );
        registry.register(
            "batches_abandoned",
            "Batches given up for holding their transaction past max_batch_duration (unanswered rows released; those whose request went out count an attempt)",
            m.batches_abandoned.clone(),
        );
        registry.register(
            "listener_reconnects",
            "Times the LISTEN connection was lost and re-established",
            m.listener_reconnects.clone(),
        );
        registry.register(
            "queue_depth",
            "Pending rows (due or scheduled)",
            m.queue_depth.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "How long the oldest due pending row has been waiting",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "database_up",
            "1 while the database is reachable and LISTEN is in place",
            m.database_up.clone(),
        );
        registry.register(
            "awake",
            "1 while the daemon is awake: it looks for new rows itself and writers skip NOTIFY",
            m.awake.clone(),
        );
        registry.register(
            "wakeup_transitions",
            "Times the daemon woke up (to=awake) or went to sleep (to=asleep)",
            m.wakeup_transitions.clone(),
        );
        registry.register(
            "wakeup_barrier_busy",
            "Attempts to sleep put off by a writer's open transaction",
            m.wakeup_barrier_busy.clone(),
        );
        registry.register(
            "notifications",
            "NOTIFYs received by the listener",
            m.notifications.clone(),
        );
        registry.register(
            "rows_found_awake",
            "Rows claimed while awake, found without a NOTIFY",
            m.rows_found_awake.clone(),
        );
        registry.register(
            "looks_empty",
            "Looks for due rows (one statement, no transaction) that found none",
            m.looks_empty.clone(),
        );
        registry.register(
            "database_round_trips",
            "Round trips to the database by the batches and the wake-up keeper",
            m.database_round_trips.clone(),
        );
        registry.register(
            "app_pauses",
            "Pauses of an app whose service refused its credentials or throttled it, by app",
            m.app_pauses.clone(),
        );
        registry.register(
            "rows_set_aside",
            "Rows of a paused app moved to the end of its pause, by app",
            m.rows_set_aside.clone(),
        );
        registry.register(
            "metrics_connections_refused",
            "Connections to the metrics listener closed at once: too many were open",
            m.metrics_connections_refused.clone(),
        );
        registry.register(
            "channels",
            "Live Activity broadcast channels in pgpushd.channels, by app and status \
             (Apple allows 10,000 per app and environment)",
            m.channels.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets the apps that get series of their own.
    pub fn set_apps<'a>(&self, apps: impl IntoIterator<Item = &'a String>) {
        *self.known_apps.write().unwrap() = apps.into_iter().cloned().collect();
    }

    /// Sets the channel gauges from the table's counts: every app of the config gets
    /// each status, 0 when it has none; an app not in the config counts as `unknown`.
    pub fn set_channels(&self, counts: &[(String, &str, i64)]) {
        const STATUSES: [&str; 4] = ["pending", "active", "closing", "failed"];
        let mut totals: std::collections::HashMap<ChannelLabels, i64> = Default::default();
        // What was set last time, 0 unless counted again (an app gone from the config,
        // or `unknown` once its rows are gone).
        let mut series = self.channel_series.lock().unwrap();
        for labels in series.iter() {
            totals.insert(labels.clone(), 0);
        }
        for app in self.known_apps.read().unwrap().iter() {
            for status in STATUSES {
                totals.insert(
                    ChannelLabels {
                        app: app.clone(),
                        status: status.to_owned(),
                    },
                    0,
                );
            }
        }
        for (app, status, n) in counts {
            let labels = ChannelLabels {
                app: self.app_label(app).app,
                status: (*status).to_owned(),
            };
            *totals.entry(labels).or_default() += n;
        }
        series.clear();
        for (labels, n) in totals {
            self.channels.get_or_create(&labels).set(n);
            if n != 0 {
                series.insert(labels);
            }
        }
    }

    /// `app`, or `unknown` for an app not in the config.
    pub fn app_label(&self, app: &str) -> AppLabels {
        let known = self.known_apps.read().unwrap().contains(app);
        AppLabels {
            app: if known { app } else { "unknown" }.to_owned(),
        }
    }

    /// Counts one settled row.
    pub fn row(&self, app: &str, status: RowStatus, attempted: bool, last_error: Option<&str>) {
        let outcome = match (status, attempted) {
            (RowStatus::Pending, false) => "deferred",
            (RowStatus::Pending, true) => "retried",
            (s, _) => s.as_str(),
        };
        let labels = RowLabels {
            app: self.app_label(app).app,
            outcome: outcome.to_owned(),
            reason: last_error.map_or_else(|| "none".to_owned(), reason_label),
        };
        self.rows.get_or_create(&labels).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The service's reason word in a `last_error` ("gave up after 3 attempts: 503
/// ServiceUnavailable" -> `ServiceUnavailable`, "QUOTA_EXCEEDED: ..." ->
/// `QUOTA_EXCEEDED`), or `other`. Only the reasons Apple documents ([`Reason::KNOWN`])
/// and FCM's codes ([`fcm::response::KNOWN_CODES`]) become labels: a server (or a proxy
/// in the way) that answers words of its own cannot grow the series without bound.
pub fn reason_label(last_error: &str) -> String {
    static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        Reason::KNOWN
            .iter()
            .map(|r| r.to_string())
            .chain(fcm::response::KNOWN_CODES.iter().map(|c| c.to_string()))
            .collect()
    });
    let named = last_error
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find_map(|w| NAMES.iter().find(|name| *name == w));
    match named {
        Some(name) => name.clone(),
        None => http_status_label(last_error).unwrap_or_else(|| "other".to_owned()),
    }
}

/// A Web Push service's answers have no reason words, only statuses: `HTTP_410` for a
/// reason that starts `HTTP 410`, among the statuses the README names (a closed set, so
/// the series stay bounded).
fn http_status_label(last_error: &str) -> Option<String> {
    const STATUSES: [&str; 11] = [
        "400", "401", "403", "404", "410", "413", "429", "500", "502", "503", "504",
    ];
    // At the start, or after "gave up after N attempts: ".
    let (at, _) = last_error
        .match_indices("HTTP ")
        .find(|(i, _)| *i == 0 || last_error[..*i].ends_with(": "))?;
    let status = last_error.get(at + 5..at + 8)?;
    STATUSES.contains(&status).then(|| format!("HTTP_{status}"))
}

/// `/healthz` while the listener has never had its LISTEN in place: starting, or unable
/// to (the log says why: a pooler that forbids LISTEN, no connection slot, ...).
const STARTING_LISTENER: &str =
    "database: LISTEN is not in place yet (starting; if this lasts, the log says why)";

/// What `/healthz` and the read-on-scrape metrics read besides [`Metrics`]: the live
/// state of the transport, the database and the listener.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub transport: Arc<dyn Transport>,
    /// `Err(reason)` while batches fail on database errors.
    pub database: watch::Receiver<Result<(), String>>,
    /// `true` while the listener's LISTEN is in place.
    pub listening: watch::Receiver<bool>,
    /// How long the oldest batch transaction has been open, when past its bound (a
    /// stuck batch, see `dispatcher::Heartbeat::stuck_batch`).
    pub stuck_batch: StuckBatch,
}

/// Reads whether a batch is stuck, and for how long.
pub type StuckBatch = Arc<dyn Fn() -> Option<std::time::Duration> + Send + Sync>;

impl Sources {
    fn refresh(&self) {
        for (app, n) in self.transport.open_connections() {
            self.metrics
                .connections
                .get_or_create(&AppLabels { app })
                .set(n as i64);
        }
        for (app, h) in self.transport.health() {
            self.metrics
                .app_healthy
                .get_or_create(&AppLabels { app })
                .set(h.is_ok() as i64);
        }
        let up = self.database.borrow().is_ok() && *self.listening.borrow();
        self.metrics.database_up.set(up as i64);
    }

    /// `Ok` when the database and every app are usable, else every reason.
    pub fn health(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = &*self.database.borrow() {
            problems.push(format!("database: {e}"));
        }
        if !*self.listening.borrow() {
            // Never lost (the listener counts each loss): not in place yet.
            problems.push(match self.metrics.listener_reconnects.get() {
                0 => STARTING_LISTENER.to_owned(),
                _ => "database: the LISTEN connection is down".to_owned(),
            });
        }
        if let Some(open) = (self.stuck_batch)() {
            problems.push(format!(
                "database: a batch has held its transaction for {}s, past max_batch_duration",
                open.as_secs()
            ));
        }
        for (app, h) in self.transport.health() {
            if let Err(e) = h {
                problems.push(format!("app {app}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/metrics" => {
                self.refresh();
                (StatusCode::OK, self.metrics.encode())
            }
            "/healthz" => match self.health() {
                Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                Err(problems) => (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n"),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "try /metrics or /healthz\n".to_owned(),
            ),
        };
        let content_type = if path == "/metrics" {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    }
}

/// Binds now (so a bad address fails start-up), serves until `cancel`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"))
}

/// What the metrics listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the excess is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a connection may take to send a request head, the first or the next on a
    /// kept-alive connection; then it is closed.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    /// A few Prometheus servers and health checkers need a handful of connections; a
    /// scrape sends its request head at once.
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The longest pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS...): the failure
/// repeats until a descriptor is freed, and retrying at once would spin.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves with the default [`Limits`] until `cancel`.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>, cancel: CancellationToken) {
    serve_with(listener, sources, cancel, Limits::default()).await
}

pub async fn serve_with(
    listener: TcpListener,
    sources: Arc<Sources>,
    cancel: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut accept_failures = 0u32;
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    accept_failures = 0;
                    a
                }
                Err(e) => {
                    let wait = crate::backoff::nominal(
                        accept_failures,
                        Duration::from_millis(10),
                        ACCEPT_BACKOFF_MAX,
                    );
                    accept_failures = accept_failures.saturating_add(1);
                    warn!(error = %e, retry_in = ?wait, "metrics: accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            sources.metrics.metrics_connections_refused.inc();
            debug!(%peer, limit = limits.max_connections, "metrics: too many connections, closing");
            drop(stream);
            continue;
        };
        let sources = sources.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = sources.answer(req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_push_reasons_are_labelled_by_their_status() {
        assert_eq!(
            reason_label("HTTP 410: the subscription is gone (the browser unsubscribed)"),
            "HTTP_410"
        );
        assert_eq!(reason_label("HTTP 429: Too Many Requests"), "HTTP_429");
        assert_eq!(
            reason_label("gave up after 3 attempts: HTTP 503: the push service failed"),
            "HTTP_503"
        );
        assert_eq!(reason_label("HTTP 418: I'm a teapot"), "other");
        assert_eq!(reason_label("the payload is HTTP 410 bytes"), "other");
    }

    #[test]
    fn reason_labels_are_apples_words() {
        assert_eq!(
            reason_label("gave up after 3 attempts: 503 ServiceUnavailable"),
            "ServiceUnavailable"
        );
        assert_eq!(reason_label("BadDeviceToken"), "BadDeviceToken");
        assert_eq!(
            reason_label(
                "PayloadTooLarge: payload is 5000 bytes, the limit for alert pushes is 4096"
            ),
            "PayloadTooLarge"
        );
        assert_eq!(
            reason_label("unknown app \"x\": no [apps.x] section"),
            "other"
        );
        // FCM's codes, underscores and all.
        assert_eq!(
            reason_label("gave up after 8 attempts: QUOTA_EXCEEDED: slow down"),
            "QUOTA_EXCEEDED"
        );
        assert_eq!(
            reason_label("UNREGISTERED: Requested entity was not found."),
            "UNREGISTERED"
        );
        assert_eq!(reason_label("SOMETHING_NEW: who knows"), "other");
    }

    #[test]
    fn a_channel_series_no_longer_counted_falls_to_zero() {
        let m = Metrics::new();
        m.set_apps(&["default".to_owned()]);
        m.set_channels(&[
            ("default".into(), "active", 2),
            ("elsewhere".into(), "pending", 1),
        ]);
        let text = m.encode();
        assert!(text.contains("pgpushd_channels{app=\"default\",status=\"active\"} 2"));
        assert!(text.contains("pgpushd_channels{app=\"unknown\",status=\"pending\"} 1"));
        m.set_channels(&[]);
        let text = m.encode();
        assert!(text.contains("pgpushd_channels{app=\"default\",status=\"active\"} 0"));
        assert!(
            text.contains("pgpushd_channels{app=\"unknown\",status=\"pending\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn reasons_apple_never_listed_are_other() {
        // A server (or a proxy in the way) answering a reason of its own invention must
        // not grow the series: only Apple's known words become labels.
        assert_eq!(reason_label("400 MadeUpReasonNumber7351"), "other");
        assert_eq!(
            reason_label("gave up after 2 attempts: 500 WhateverTheProxySays"),
            "other"
        );
        assert_eq!(
            reason_label("Connection reset; 503 ServiceUnavailable"),
            "ServiceUnavailable"
        );
        let m = Metrics::new();
        m.set_apps(&["default".to_owned()]);
        for n in 0..100 {
            m.row(
                "default",
                RowStatus::Failed,
                true,
                Some(&format!("400 InventedReason{n}")),
            );
        }
        let text = m.encode();
        assert!(
            text.contains(
                r#"pgpushd_rows_total{app="default",outcome="failed",reason="other"} 100"#
            ),
            "{text}"
        );
        assert!(!text.contains("InventedReason"), "{text}");
    }

    #[test]
    fn rows_are_counted_by_outcome_and_encoded() {
        let m = Metrics::new();
        m.set_apps(&["default".to_owned()]);
        m.row("default", RowStatus::Sent, true, None);
        m.row("typo", RowStatus::Failed, false, Some("unknown app"));
        m.row("default", RowStatus::Sent, true, None);
        m.row(
            "default",
            RowStatus::Pending,
            false,
            Some("403 InvalidProviderToken"),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"pgpushd_rows_total{app="default",outcome="sent",reason="none"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pgpushd_rows_total{app="default",outcome="deferred",reason="InvalidProviderToken"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"app="unknown",outcome="failed""#), "{text}");
    }

    /// A transport with no apps, which is never asked to send.
    #[test]
    fn the_request_series_are_named_for_every_service_and_still_by_their_old_names() {
        let m = Metrics::new();
        let app = AppLabels { app: "web".into() };
        m.connections.get_or_create(&app).set(3);
        m.requests_in_flight.set(2);
        m.request_latency.get_or_create(&app).observe(0.004);
        let text = m.encode();
        for name in ["push", "apns"] {
            for line in [
                format!("pgpushd_{name}_connections{{app=\"web\"}} 3"),
                format!("pgpushd_{name}_requests_in_flight 2"),
                format!("pgpushd_{name}_request_duration_seconds_count{{app=\"web\"}} 1"),
            ] {
                assert!(text.contains(&line), "{line} missing:\n{text}");
            }
        }
        assert!(
            text.contains("# HELP pgpushd_apns_connections Deprecated: pgpushd_push_connections")
        );
    }

    /// Sources with no apps, the database up, `listening` and `stuck_batch`.
    fn sources(listening: watch::Receiver<bool>, stuck_batch: StuckBatch) -> Sources {
        Sources {
            metrics: Arc::new(Metrics::new()),
            transport: Arc::new(NoApps),
            database: watch::channel(Ok(())).1,
            listening,
            stuck_batch,
        }
    }

    #[test]
    fn a_stuck_batch_makes_the_daemon_unhealthy() {
        let (_listening, listening) = watch::channel(true);
        let sources = sources(listening, Arc::new(|| Some(Duration::from_secs(400))));
        let problems = sources.health().unwrap_err();
        assert!(
            problems.len() == 1 && problems[0].contains("400s"),
            "{problems:?}"
        );
    }

    #[test]
    fn healthz_tells_a_listener_starting_from_one_lost() {
        let (listening, listening_rx) = watch::channel(false);
        let sources = sources(listening_rx, Arc::new(|| None));
        let problems = || sources.health().unwrap_err();
        assert_eq!(problems(), [STARTING_LISTENER]);
        listening.send_replace(true);
        assert!(sources.health().is_ok());
        // The listener counts the loss as it reports it.
        sources.metrics.listener_reconnects.inc();
        listening.send_replace(false);
        assert_eq!(problems(), ["database: the LISTEN connection is down"]);
    }

    struct NoApps;

    impl Transport for NoApps {
        fn send<'a>(
            &'a self,
            _: &'a crate::transport::Notification,
        ) -> futures::future::BoxFuture<'a, crate::transport::Delivery> {
            unreachable!("no rows in these tests")
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_neither_blocks_the_listener_nor_lasts() {
        use tokio::io::AsyncReadExt;
        use tokio::time::{timeout, Instant};

        let limits = Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(500),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_database, database) = watch::channel(Ok(()));
        let (_listening, listening) = watch::channel(true);
        let metrics = Arc::new(Metrics::new());
        let sources = Arc::new(Sources {
            metrics: metrics.clone(),
            transport: Arc::new(NoApps),
            database,
            listening,
            stuck_batch: Arc::new(|| None),
        });
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_with(listener, sources, cancel.clone(), limits));

        // Twice the cap of connections that never send a byte.
        let flooded = Instant::now();
        let mut idle = Vec::new();
        for _ in 0..2 * limits.max_connections {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The excess is closed at once, and counted.
        let refused = async {
            while metrics.metrics_connections_refused.get() < limits.max_connections as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(Duration::from_secs(5), refused)
            .await
            .expect("the connections past the cap are refused");

        // /healthz answers within a second or two: as soon as the header timeout frees
        // the idle connections' slots.
        let answer = async {
            loop {
                match get(addr, "/healthz").await {
                    Ok(a) if a.starts_with("HTTP/1.1 200") => return a,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        let answer = timeout(Duration::from_secs(2), answer)
            .await
            .expect("/healthz answers despite the flood");
        assert!(answer.ends_with("ok\n"), "{answer}");
        assert!(flooded.elapsed() < Duration::from_secs(3));

        // Every idle connection has been closed by now (the header timeout), never sent
        // anything and is at its end.
        for mut c in idle {
            let mut buf = [0u8; 64];
            let n = timeout(Duration::from_secs(2), c.read(&mut buf))
                .await
                .expect("an idle connection is closed after the header timeout")
                .unwrap_or(0);
            assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
        }
        // The flood's excess, and perhaps a /healthz try made while the cap was full.
        let text = metrics.encode();
        let refused: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("pgpushd_metrics_connections_refused_total "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(refused >= limits.max_connections as u64, "{text}");
        cancel.cancel();
        server.await.unwrap();
    }
}
