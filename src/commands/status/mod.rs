//! `pgpushd status`: the outbox's [`StatusReport`] once, or refreshed in place
//! (`--watch`), as text for people (`text`: aligned tables) or as JSON for scripts
//! (`json`: one object per line, so a watch is a JSON Lines stream).
//!
//! A read gets `connect_timeout` to answer, and is bounded on the server too (issue 20,
//! item 9): its statements by a `statement_timeout` local to its transaction, and a read
//! the client gave up on is cancelled, so that no scan is left running on the server,
//! holding its snapshot (and back vacuum), let alone one per refresh of a watch.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::console::Console;
use crate::db;
use crate::outbox::migrate;
use crate::outbox::status::StatusReport;

mod json;
mod text;

pub use text::age;

/// The shortest refresh `--watch` accepts.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub json: bool,
    pub full_tokens: bool,
    /// Refresh every this long until `stop`; `None`: once.
    pub watch: Option<Duration>,
}

/// Prints the status once; an error (no database, an old schema) is the command's.
pub async fn once(
    database: &DatabaseConfig,
    options: Options,
    console: &mut Console<impl Write>,
) -> anyhow::Result<()> {
    let (mut client, canceller) = connect(database).await?;
    let report = read(&mut client, &canceller, database.connect_timeout).await?;
    console.line(render(&report, options).trim_end())?;
    Ok(())
}

/// Prints the status every `every` until `stop` completes. Errors (the database down, a
/// query refused) are shown in the report's place and the next refresh tries again,
/// reconnecting, as an operator watching an outage expects.
pub async fn watch(
    database: &DatabaseConfig,
    options: Options,
    every: Duration,
    console: &mut Console<impl Write>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut connection: Option<(Client, db::Canceller)> = None;
    loop {
        // Interruptible while it reads too, and bounded: a partition or a lock must not
        // hang the watch.
        let refresh = async {
            let (c, canceller) = match connection.as_mut() {
                Some(c) => c,
                None => connection.insert(connect(database).await?),
            };
            read(c, canceller, database.connect_timeout).await
        };
        let result = tokio::select! {
            _ = &mut stop => return Ok(()),
            result = refresh => result,
        };
        let at = humantime::format_rfc3339_seconds(SystemTime::now());
        match (&result, options.json) {
            (Ok(report), true) => console.line(render(report, options).trim_end())?,
            (Ok(report), false) => console.screen(&format!(
                "pgpushd status, every {}: {at}\n\n{}",
                humantime::format_duration(every),
                render(report, options)
            ))?,
            (Err(e), true) => console.line(
                &serde_json::json!({"read_at": at.to_string(), "error": format!("{e:#}")})
                    .to_string(),
            )?,
            (Err(e), false) => console.screen(&format!(
                "pgpushd status, every {}: {at}\n\n{e:#}\n(trying again)\n",
                humantime::format_duration(every),
            ))?,
        }
        if result.is_err() {
            connection = None;
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn connect(database: &DatabaseConfig) -> anyhow::Result<(Client, db::Canceller)> {
    let (client, canceller) =
        db::connect_cancellable(&database.url, database.connect_timeout, "status")
            .await
            .context("cannot reach the database")?;
    canceller
        .within(database.connect_timeout, migrate::ensure_current(&client))
        .await
        .map_err(|e| anyhow::anyhow!("reading the schema's version: {e}"))??;
    Ok((client, canceller))
}

/// The report within `bound`, on the client and the server; after an error, drop the
/// connection (a cancel may still be on its way).
async fn read(
    client: &mut Client,
    canceller: &db::Canceller,
    bound: Duration,
) -> anyhow::Result<StatusReport> {
    canceller
        .within(bound, StatusReport::read_within(client, bound))
        .await
        .map_err(|e| anyhow::anyhow!("reading the outbox: {e}"))?
        .map_err(|e| anyhow::anyhow!("reading the outbox: {}", db::describe(&e)))
}

fn render(report: &StatusReport, options: Options) -> String {
    if options.json {
        format!(
            "{}\n",
            report.to_json(options.full_tokens, SystemTime::now())
        )
    } else {
        report.display(options.full_tokens).to_string()
    }
}
