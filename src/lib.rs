//! pgpushd turns rows inserted into a PostgreSQL outbox table into Apple push
//! notifications. `README.md` says how to run it; `DESIGN.md` (shared) gives the picture.
//!
//! The pipeline, one module per concept:
//! - [`config`]: the TOML file, validated;
//! - [`secret`]: `Secret`, a value whose `Debug` is masked (URLs with passwords);
//! - [`db`]: connecting to PostgreSQL (TLS per `sslmode`);
//! - [`outbox`]: the SQL: migrations, claim, write-back;
//! - [`listener`]: the LISTEN connection that wakes the dispatcher;
//! - [`dispatcher`]: wake -> claim -> send -> record;
//! - [`outcome`]: what an APNs answer means for a row;
//! - [`transport`]: the seam between the outbox and APNs (`Notification`, `Delivery`);
//! - [`apns`]: the HTTP/2 provider API client (and its push-type rules), and the retired
//!   binary protocol's (`apns::binary`);
//! - [`retention`]: deleting settled rows once they are old enough;
//! - [`daemon`]: wiring it all together;
//! - [`devdb`]: a throwaway PostgreSQL cluster;
//! - [`demo`]: `pgpushd demo`, everything above on one machine.

pub mod apns;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod devdb;
pub mod dispatcher;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod outcome;
pub mod retention;
pub mod secret;
pub mod systemd;
pub mod transport;
pub mod unregistered;
