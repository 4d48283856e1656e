//! The bodies of the commands that are not the daemon: `main.rs` parses the command
//! line, prints and picks the exit code; the work is here.
//! - [`channels`]: `pgpushd channels list` (broadcast channels at APNs and in the table);
//! - [`check_config`]: `pgpushd check-config`;
//! - [`health`]: `pgpushd health`;
//! - [`migrate`]: `pgpushd migrate`;
//! - [`send`]: `pgpushd send`;
//! - [`status`]: `pgpushd status` (`--json`, `--watch`);
//! - [`webpush_key`]: `pgpushd webpush-key`.

pub mod channels;
pub mod check_config;
pub mod health;
pub mod migrate;
pub mod send;
pub mod status;
pub mod webpush_key;
