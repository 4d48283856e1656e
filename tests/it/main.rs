//! The integration tests, one binary (the library links once), a module per area. Each
//! test starts what it needs: a throwaway PostgreSQL cluster (or a database on the server
//! `PGPUSHD_TEST_DATABASE_URL` names), the emulator, the daemon in process or as the
//! spawned `pgpushd` binary.

mod binary_protocol;
mod channels;
mod channels_unkind;
mod churn;
mod commands;
mod container;
mod dashboards;
mod delivery;
mod docs;
mod fcm;
mod legacy;
mod packaging;
mod paused;
mod pipeline;
mod postgres_tls;
mod proxy;
mod python_server;
mod retention;
mod service;
mod soak;
mod status;
mod support;
mod systemd;
mod tinyproxy;
mod untrusted;
mod upgrade;
mod wakeup;
mod webpush;
mod webpush_unkind;
