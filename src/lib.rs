//! pgpushd turns rows inserted into a PostgreSQL outbox table into Apple push
//! notifications. See `README.md` for running it and `DESIGN` notes in each module.
//!
//! The pipeline, one module per concept:
//! - [`config`]: the TOML file, validated;
//! - [`transport`]: the seam between the outbox and APNs (`Notification`, `Delivery`);
//! - [`apns`]: the HTTP/2 provider API client (and its push-type rules);
//! - [`emulator`]: a local APNs for tests, the demo and benchmarks.

pub mod apns;
pub mod backoff;
pub mod config;
pub mod emulator;
pub mod transport;
