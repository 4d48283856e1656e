//! `pgpushd migrate`: creates or upgrades the schema (idempotent; see `outbox::migrate`).

use crate::config::Config;
use crate::{db, outbox};

/// Applies what is missing and says what it did.
pub async fn run(config: &Config) -> anyhow::Result<String> {
    let database = &config.database;
    let mut client = db::connect(&database.url, database.connect_timeout, "migrate").await?;
    let applied = outbox::migrate::migrate(&mut client).await?;
    Ok(match applied.is_empty() {
        true => format!(
            "the schema is up to date (version {})",
            outbox::migrate::latest_version()
        ),
        false => format!("applied migration(s) {applied:?}"),
    })
}
