//! The bodies of the commands that are not the daemon: `main.rs` parses the command
//! line and hands over here.
//! - [`status`]: `pgpushd status` (`--json`, `--watch`).

pub mod status;
