//! pgpushd turns rows inserted into a PostgreSQL outbox table into Apple push
//! notifications (and Android ones, through FCM). `README.md` says how to run it; `ARCHITECTURE.md` gives the picture:
//! the code map, the invariants and the seams.
//!
//! The pipeline, one module per concept:
//! - [`config`]: the TOML file, validated;
//! - [`secret`]: `Secret`, a value whose `Debug` is masked (URLs with passwords);
//! - [`db`]: connecting to PostgreSQL (TLS per `sslmode`);
//! - [`outbox`]: the SQL: migrations, claim, write-back;
//! - [`listener`]: the LISTEN connection that wakes the dispatcher;
//! - [`dispatcher`]: wake -> claim -> send -> record;
//! - [`awake`]: awake or asleep: when the daemon looks for rows itself and writers skip
//!   NOTIFY;
//! - [`channels`]: Live Activity broadcast channels, made and deleted at APNs from
//!   `pgpushd.channels` by the channel keeper;
//! - [`outcome`]: what an APNs answer means for a row;
//! - [`transport`]: the seam between the outbox and APNs (`Notification`, `Delivery`,
//!   `Unregistered`);
//! - [`apns`]: the APNs client: `apns::http2` (the provider API) beside `apns::binary`
//!   (the retired binary protocol), what both use at `apns/`;
//! - [`http2`]: the HTTP/2 client (connection, pool) the push services share;
//! - [`http1`]: the HTTP/1.1 keep-alive client, for push services without HTTP/2;
//! - [`tls`]: TLS to the push services;
//! - [`es256`]: ES256 JSON Web Tokens (APNs's provider tokens, Web Push's VAPID);
//! - [`fcm`]: Firebase Cloud Messaging (HTTP v1), for Android;
//! - [`webpush`]: Web Push (RFC 8030, 8291, 8292), for browsers;
//! - [`providers`]: the transport the daemon uses: APNs and FCM, each row routed by its
//!   app's provider;
//! - [`proxy`]: HTTP proxies to APNs: which one a connection takes, the CONNECT tunnel;
//! - [`reports`]: writing what the transport reports on its own (unregistered tokens,
//!   rows found undelivered after all) to the outbox;
//! - [`retention`]: deleting settled rows once they are old enough;
//! - [`metrics`]: Prometheus `/metrics` and `/healthz`;
//! - [`systemd`]: sd_notify (READY, WATCHDOG, STATUS, RELOADING, STOPPING);
//! - [`paused_apps`]: setting a paused app's backlog aside until its pause ends;
//! - [`service`]: the layer every push service shares: the per-app registry and gate,
//!   timings, what an exchange came to;
//! - [`backoff`]: capped exponential backoff with jitter;
//! - [`daemon`]: wiring it all together;
//! - [`devdb`]: a throwaway PostgreSQL cluster;
//! - [`demo`]: `pgpushd demo`, everything above on one machine;
//! - [`commands`]: the bodies of the other commands (`status`);
//! - [`console`]: output that changes in place (progress, `status --watch`).

pub mod apns;
pub mod arrival_rate;
pub mod awake;
pub mod backoff;
pub mod channels;
pub mod commands;
pub mod config;
pub mod console;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod devdb;
pub mod dispatcher;
pub mod es256;
pub mod fcm;
pub mod host_list;
pub mod http1;
pub mod http2;
pub mod listener;
pub mod metrics;
pub mod openssl_reason;
pub mod outbox;
pub mod outcome;
pub mod paused_apps;
pub mod providers;
pub mod proxy;
pub mod reports;
pub mod retention;
pub mod secret;
pub mod service;
pub mod systemd;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod transport;
pub mod webpush;
