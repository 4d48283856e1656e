//! The push services a Web Push app sends to, one [`Origin`] each (Mozilla's, Google's,
//! Apple's, Microsoft's...; a subscription's endpoint names its own): made when a row
//! first goes there, each with its own connections and its own gate, so that a slow,
//! failing, throttling or refusing push service holds up only its own rows, never the
//! app's others.
//!
//! - Connections: the first offers both protocols by ALPN; the service's choice makes
//!   the origin's [`Link`], a pool of HTTP/2 connections (`crate::http2`) or of HTTP/1.1
//!   keep-alive ones (`crate::http1`). A link whose HTTP/2 connections cannot be had is
//!   dropped, and the next row asks again (the name may now lead elsewhere).
//! - A first connection that fails is remembered, with a backoff: meanwhile the
//!   origin's rows fail at once (a counted retry), rather than each waiting for its own
//!   `connect_timeout` behind the others.
//! - Each origin's [`AppGate`]: its refusals of the app's VAPID token and its
//!   throttling pause that origin alone.
//! - At most [`MAX_ORIGINS`] are kept: one unused for [`ORIGIN_IDLE`] is closed (a sweep
//!   every minute), and the least recently used when a new one needs room; a paused one
//!   is kept (its rows are parked: forgetting it would end the pause).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::request::WebPushRequest;
use super::subscription::Subscription;
use crate::backoff::backoff;
use crate::config::AppConfig;
use crate::http1::{self, Http1Pool, Negotiated};
use crate::http2::pool::{Pool, PoolError};
use crate::http2::Answer;
use crate::service::{AppGate, Timings};
use crate::transport::Pause;

/// Push services an app keeps connections to at once.
pub const MAX_ORIGINS: usize = 64;

/// A push service no row has needed for this long has its connections closed.
pub const ORIGIN_IDLE: Duration = Duration::from_secs(10 * 60);

/// How often idle origins are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Origins {
    config: AppConfig,
    timings: Timings,
    /// TLS offering both protocols (an origin's first connection), or one.
    tls_either: native_tls::TlsConnector,
    tls_h2: native_tls::TlsConnector,
    tls_http1: native_tls::TlsConnector,
    map: Arc<Mutex<HashMap<String, Entry>>>,
    sweeper: Once,
}

struct Entry {
    origin: Arc<Origin>,
    used: Instant,
}

/// One push service.
pub(crate) struct Origin {
    /// `https://host[:port]`.
    pub(crate) name: String,
    /// Its standing: paused while it refuses the app's tokens or throttles it.
    pub(crate) gate: AppGate,
    /// Its connections, once the first was made; held while one is being made.
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// The last first connections that failed, and until when rows fail at once.
    down: Mutex<Down>,
}

#[derive(Default)]
struct Down {
    failures: u32,
    until: Option<(Instant, String)>,
}

/// An origin's connections, by the protocol it chose.
enum Link {
    Http2(Pool),
    Http1(Box<Http1Pool>),
}

impl Origins {
    pub(crate) fn new(config: &AppConfig, timings: &Timings, tls: Tls) -> Origins {
        Origins {
            config: config.clone(),
            timings: timings.clone(),
            tls_either: tls.either,
            tls_h2: tls.h2,
            tls_http1: tls.http1,
            map: Arc::default(),
            sweeper: Once::new(),
        }
    }

    /// `sub`'s push service, made (and room made for it) if need be.
    pub(crate) fn get(&self, sub: &Subscription) -> Arc<Origin> {
        self.sweeper.call_once(|| {
            tokio::spawn(sweep(Arc::downgrade(&self.map)));
        });
        let now = Instant::now();
        let mut map = self.map.lock().unwrap();
        if let Some(entry) = map.get_mut(sub.origin()) {
            entry.used = now;
            return entry.origin.clone();
        }
        if map.len() >= MAX_ORIGINS {
            // The least recently used, sparing paused ones (see `sweep`) unless all are.
            let oldest = map
                .iter()
                .min_by_key(|(_, e)| (e.origin.gate.pause().is_some(), e.used))
                .map(|(k, _)| k.clone());
            map.remove(&oldest.unwrap_or_default());
        }
        let origin = Arc::new(Origin {
            name: sub.origin().to_owned(),
            gate: AppGate::new(
                &format!("{} ({})", self.config.name, sub.origin()),
                "the push service",
                self.timings.pause_backoff_base,
                self.timings.pause_backoff_max,
                self.config.request_timeout,
            ),
            link: tokio::sync::Mutex::new(None),
            down: Mutex::default(),
        });
        map.insert(
            sub.origin().to_owned(),
            Entry {
                origin: origin.clone(),
                used: now,
            },
        );
        origin
    }

    /// Sends the request to `origin` (`sub`'s), connecting first if need be.
    pub(crate) async fn send(
        &self,
        origin: &Origin,
        sub: &Subscription,
        request: &WebPushRequest,
        authorization: &str,
        body: Bytes,
    ) -> Result<Answer, PoolError> {
        let link = self.link(origin, sub).await?;
        let sent = match &*link {
            Link::Http2(pool) => pool.send(|| request.to_http(authorization), body).await,
            Link::Http1(pool) => pool.send(request.to_http(authorization), body).await,
        };
        if let (Link::Http2(_), Err(PoolError::Unavailable { .. })) = (&*link, &sent) {
            let mut current = origin.link.lock().await;
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &link)) {
                debug!(origin = %origin.name, "no HTTP/2 connection; the next row asks again");
                *current = None;
            }
        }
        sent
    }

    /// Connections open now, to every origin.
    pub(crate) fn open_connections(&self) -> usize {
        let map = self.map.lock().unwrap();
        map.values()
            .filter_map(|e| e.origin.link.try_lock().ok()?.clone())
            .map(|link| match &*link {
                Link::Http2(pool) => pool.open_connections(),
                Link::Http1(pool) => pool.open_connections(),
            })
            .sum()
    }

    /// The push services paused now, each as a pause of the app with its `origin`.
    pub(crate) fn paused(&self) -> Vec<Pause> {
        let map = self.map.lock().unwrap();
        map.values()
            .filter_map(|e| {
                let pause = e.origin.gate.pause()?;
                Some(Pause {
                    app: self.config.name.clone(),
                    origin: Some(e.origin.name.clone()),
                    ..pause
                })
            })
            .collect()
    }

    /// `origin`'s link: the one it has, or a new one from a first connection (one at a
    /// time; while the last ones failed, none, at once).
    async fn link(&self, origin: &Origin, sub: &Subscription) -> Result<Arc<Link>, PoolError> {
        origin.down_now()?;
        let mut link = origin.link.lock().await;
        if let Some(link) = &*link {
            return Ok(link.clone());
        }
        // Another row's attempt may have failed while this one waited.
        origin.down_now()?;
        match self.connect(sub).await {
            Ok(made) => {
                *origin.down.lock().unwrap() = Down::default();
                let made = Arc::new(made);
                *link = Some(made.clone());
                Ok(made)
            }
            Err(reason) => Err(origin.failed(reason, &self.timings)),
        }
    }

    /// The first connection to `sub`'s push service, offering both protocols: HTTP/2
    /// when it chooses it (that connection is dropped, the pool makes its own), else
    /// HTTP/1.1 keep-alive, starting with this connection.
    async fn connect(&self, sub: &Subscription) -> Result<Link, String> {
        let opts = |tls| {
            self.timings.connect(
                &self.config,
                "the push service",
                sub.host(),
                sub.port(),
                tls,
            )
        };
        let (stream, negotiated) = http1::connect_tls(&opts(&self.tls_either))
            .await
            .map_err(|e| e.to_string())?;
        let name = format!("{} ({})", self.config.name, sub.origin());
        Ok(match negotiated {
            Negotiated::Http2 => {
                drop(stream);
                let pool = self
                    .timings
                    .pool(&name, self.config.connections, opts(&self.tls_h2));
                Link::Http2(pool)
            }
            Negotiated::Http1 => Link::Http1(Box::new(
                Http1Pool::new(
                    opts(&self.tls_http1),
                    self.config.connections,
                    self.timings.stream_wait,
                    self.timings.reconnect_base,
                    Some(stream),
                )
                .await,
            )),
        })
    }
}

/// The TLS settings an app's origins connect with.
pub(crate) struct Tls {
    pub(crate) either: native_tls::TlsConnector,
    pub(crate) h2: native_tls::TlsConnector,
    pub(crate) http1: native_tls::TlsConnector,
}

impl Origin {
    /// `Err` while the last first connections failed and their backoff runs.
    fn down_now(&self) -> Result<(), PoolError> {
        let down = self.down.lock().unwrap();
        match &down.until {
            Some((until, reason)) if *until > Instant::now() => Err(PoolError::Unavailable {
                reason: reason.clone(),
                retry_after: *until - Instant::now(),
            }),
            _ => Ok(()),
        }
    }

    /// A first connection failed: rows fail at once for a backoff.
    fn failed(&self, reason: String, timings: &Timings) -> PoolError {
        let mut down = self.down.lock().unwrap();
        let wait = backoff(down.failures, timings.reconnect_base, timings.reconnect_max);
        down.failures = down.failures.saturating_add(1);
        down.until = Some((Instant::now() + wait, reason.clone()));
        if down.failures == 1 {
            warn!(origin = %self.name, reason = %reason, "cannot connect to the push service");
        }
        PoolError::Unavailable {
            reason,
            retry_after: wait,
        }
    }
}

/// Closes the origins no row has needed for [`ORIGIN_IDLE`], every minute, while the app
/// lives. A paused one stays: its rows are parked meanwhile, and forgetting it would
/// end its pause (the daemon would bring them back, due at once).
async fn sweep(map: Weak<Mutex<HashMap<String, Entry>>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(map) = map.upgrade() else { return };
        let now = Instant::now();
        // Dropping a link closes its connections once the requests on them finish.
        map.lock().unwrap().retain(|_, e| {
            now.duration_since(e.used) < ORIGIN_IDLE || e.origin.gate.pause().is_some()
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn origins() -> Origins {
        let text = "[database]\nurl = \"postgres://x@localhost/x\"\n[apps.web]\n\
                    provider = \"webpush\"\n[apps.web.webpush]\nkey_file = \"v.pem\"\n\
                    subject = \"mailto:a@b\"\n";
        let config = Config::from_file_str(Path::new("t.toml"), text, None).unwrap();
        let tls = || native_tls::TlsConnector::new().unwrap();
        let tls = Tls {
            either: tls(),
            h2: tls(),
            http1: tls(),
        };
        Origins::new(&config.apps["web"], &Timings::default(), tls)
    }

    fn subscription(host: &str) -> Subscription {
        Subscription::parse(&format!(
            r#"{{"endpoint":"https://{host}/x","keys":{{"p256dh":"BHMblAN5R2-4wR_VtJZvahct1MMOntaS2h8IzO43766prhmtTCqsDo-fooBzdNLgF73GgLVDuX3H2FwFUR0ULhQ","auth":"-bVsP9Rp3nIexGSbs6rbuQ"}}}}"#
        ))
        .unwrap()
    }

    fn paused(origins: &Origins) -> Vec<String> {
        origins
            .paused()
            .into_iter()
            .filter_map(|p| p.origin)
            .collect()
    }

    /// Forgetting a paused push service would end its pause, and bring its parked rows
    /// back at once: neither the idle sweep nor the room for a new one drops it.
    #[tokio::test(start_paused = true)]
    async fn a_paused_push_service_is_neither_swept_nor_evicted() {
        let origins = origins();
        origins
            .get(&subscription("paused.example"))
            .gate
            .refused("no".into());
        for i in 0..MAX_ORIGINS {
            tokio::time::advance(Duration::from_millis(1)).await;
            origins.get(&subscription(&format!("o{i}.example")));
        }
        assert_eq!(paused(&origins), ["https://paused.example"]);
        assert_eq!(origins.map.lock().unwrap().len(), MAX_ORIGINS);
        assert!(
            !origins
                .map
                .lock()
                .unwrap()
                .contains_key("https://o0.example"),
            "the least recently used unpaused one made room"
        );

        tokio::time::sleep(ORIGIN_IDLE + 2 * SWEEP_EVERY).await;
        assert_eq!(paused(&origins), ["https://paused.example"]);
        assert_eq!(
            origins.map.lock().unwrap().len(),
            1,
            "the idle others swept"
        );
    }
}
