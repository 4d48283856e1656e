//! Prometheus metrics (`pgpushd_*`) and the `/metrics` + `/healthz` endpoint.
//!
//! The daemon's parts update [`Metrics`] as they work; the endpoint encodes it on each
//! scrape, after refreshing the values that are read rather than counted (connections,
//! app health). `/healthz` answers 200 while the database and every app are usable, 503
//! with the reasons otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::apns::reason::Reason;
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
pub struct AppLabels {
    pub app: String,
}

/// Every metric the daemon keeps.
pub struct Metrics {
    registry: Registry,
    pub rows: Family<RowLabels, Counter>,
    pub apns_latency: Family<AppLabels, Histogram, fn() -> Histogram>,
    pub apns_in_flight: Gauge,
    pub apns_connections: Family<AppLabels, Gauge>,
    pub app_healthy: Family<AppLabels, Gauge>,
    pub batches: Counter,
    pub batch_failures: Counter,
    pub listener_reconnects: Counter,
    pub queue_depth: Gauge,
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    pub database_up: Gauge,
    /// The configured apps: rows naming any other app are counted as `unknown`, so a
    /// producer's typo cannot grow the series without bound.
    known_apps: std::sync::RwLock<std::collections::HashSet<String>>,
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
            apns_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            apns_in_flight: Gauge::default(),
            apns_connections: Family::default(),
            app_healthy: Family::default(),
            batches: Counter::default(),
            batch_failures: Counter::default(),
            listener_reconnects: Counter::default(),
            queue_depth: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            database_up: Gauge::default(),
            known_apps: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rows",
            "Rows settled, by app, outcome and APNs reason",
            m.rows.clone(),
        );
        registry.register(
            "apns_request_duration_seconds",
            "Time from handing a row to the APNs transport to its answer",
            m.apns_latency.clone(),
        );
        registry.register(
            "apns_requests_in_flight",
            "APNs requests awaiting an answer",
            m.apns_in_flight.clone(),
        );
        registry.register(
            "apns_connections",
            "Open APNs connections, by app",
            m.apns_connections.clone(),
        );
        registry.register(
            "app_healthy",
            "1 while APNs accepts the app's credentials and a connection can be had",
            m.app_healthy.clone(),
        );
        registry.register("batches", "Batches claimed and recorded", m.batches.clone());
        registry.register(
            "batch_failures",
            "Batches that failed on a database error (their rows stay pending)",
            m.batch_failures.clone(),
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
        Metrics { registry, ..m }
    }

    /// Sets the apps that get series of their own.
    pub fn set_apps<'a>(&self, apps: impl IntoIterator<Item = &'a String>) {
        *self.known_apps.write().unwrap() = apps.into_iter().cloned().collect();
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

/// Apple's reason word in a `last_error` ("gave up after 3 attempts: 503
/// ServiceUnavailable" -> `ServiceUnavailable`), or `other`. Only the reasons Apple
/// documents ([`Reason::KNOWN`]) become labels: a server (or a proxy in the way) that
/// answers words of its own cannot grow the series without bound.
pub fn reason_label(last_error: &str) -> String {
    static NAMES: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| Reason::KNOWN.iter().map(|r| r.to_string()).collect());
    last_error
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find_map(|w| NAMES.iter().find(|name| *name == w))
        .map_or_else(|| "other".to_owned(), Clone::clone)
}

/// What `/healthz` and the read-on-scrape metrics read besides [`Metrics`]: the live
/// state of the transport, the database and the listener.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub transport: Arc<dyn Transport>,
    /// `Err(reason)` while batches fail on database errors.
    pub database: watch::Receiver<Result<(), String>>,
    /// `true` while the listener's LISTEN is in place.
    pub listening: watch::Receiver<bool>,
}

impl Sources {
    fn refresh(&self) {
        for (app, n) in self.transport.open_connections() {
            self.metrics
                .apns_connections
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
            problems.push("database: the LISTEN connection is down".to_owned());
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

pub async fn serve(listener: TcpListener, sources: Arc<Sources>, cancel: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = sources.answer(req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
