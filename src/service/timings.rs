//! The timings every push service's client shares that are not in the config file:
//! sensible for Apple's and Google's services, shortened by tests. A service's own
//! timings (APNs's provider token, FCM's token endpoint) are in its `options.rs`.

use std::time::Duration;

use crate::config::AppConfig;
use crate::http2::connection::ConnectOptions;
use crate::http2::pool::{Pool, PoolOptions};

#[derive(Debug, Clone)]
pub struct Timings {
    /// PING a connection that has had no answer for this long.
    pub ping_interval: Duration,
    /// A PING unanswered this long means the connection is dead.
    pub ping_timeout: Duration,
    pub connect_timeout: Duration,
    /// Backoff between failed connection attempts.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Sends of a request the server never processed, beyond the first.
    pub max_resends: u32,
    /// How long a request waits for a connection and a stream before it gives up without
    /// having left (the row is deferred, no attempt counted). `request_timeout` runs
    /// from when it has its stream.
    pub stream_wait: Duration,
    /// Backoff of an app paused because its service refuses its credentials or
    /// throttles it without a `Retry-After` (see `app_gate`).
    pub pause_backoff_base: Duration,
    pub pause_backoff_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            max_resends: 3,
            stream_wait: Duration::from_secs(10),
            pause_backoff_base: Duration::from_secs(10),
            pause_backoff_max: Duration::from_secs(5 * 60),
        }
    }
}

impl Timings {
    /// How an app's HTTP/2 connections to `host:port` are made: through the app's proxy
    /// for that target, with `tls`, bounded by these timings and the app's
    /// `request_timeout`.
    pub fn connect(
        &self,
        config: &AppConfig,
        service: &'static str,
        host: &str,
        port: u16,
        tls: &native_tls::TlsConnector,
    ) -> ConnectOptions {
        ConnectOptions {
            service,
            host: host.to_owned(),
            port,
            proxy: config.proxy.for_target(host, port).cloned(),
            tls: tls.clone(),
            connect_timeout: self.connect_timeout,
            request_timeout: config.request_timeout,
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
        }
    }

    /// An app's pool of `connections` long-lived HTTP/2 connections made as `connect`
    /// says (connected lazily).
    pub fn pool(&self, app: &str, connections: usize, connect: ConnectOptions) -> Pool {
        Pool::new(
            app,
            PoolOptions {
                connect,
                connections,
                reconnect_base: self.reconnect_base,
                reconnect_max: self.reconnect_max,
                max_resends: self.max_resends,
                stream_wait: self.stream_wait,
            },
        )
    }
}
