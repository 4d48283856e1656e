//! Schema migrations: the files of `sql/`, embedded, applied in order, each version
//! recorded in `pgpushd.schema_migrations`. Idempotent; concurrent runs are serialised by
//! an advisory lock, so two daemons deploying at once cannot both apply a file.
//!
//! An upgrade never holds the application's writes for longer than [`LOCK_TIMEOUT`]:
//!
//! - Each version is applied on its own and recorded in its last transaction, so an
//!   interrupted upgrade keeps the versions it finished and resumes at the next one.
//! - A file is one or more steps (see [`steps`]). A step that PostgreSQL refuses inside a
//!   transaction (`CREATE INDEX CONCURRENTLY`, which builds an index while writers go on)
//!   runs alone, outside one. A version left unrecorded runs again from its first step, so
//!   the steps of a version of more than one must each be safe to run twice (`IF NOT
//!   EXISTS`; the constraint last, in the transaction that records the version).
//! - Every statement runs with `lock_timeout` = [`LOCK_TIMEOUT`]. A writer queues behind a
//!   lock request that conflicts with its own; migrate gives up its request after that
//!   long, so no writer waits longer, and says to run it again.
//! - An index build that failed leaves its index INVALID. The next run drops every INVALID
//!   index of schema `pgpushd` before it applies anything, and builds it again.

use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::describe;

/// `(version, name, sql)`, in order. Never change what a released file makes: add the
/// next one. How a file is applied (its steps, `CONCURRENTLY`, `IF NOT EXISTS`) may
/// change, as long as the schema it leaves stays the same (the test `it::upgrade` compares
/// an upgraded database with a fresh one).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "outbox", include_str!("../../sql/001_outbox.sql")),
    (
        2,
        "settled_at",
        include_str!("../../sql/002_settled_at.sql"),
    ),
    (
        3,
        "robustness",
        include_str!("../../sql/003_robustness.sql"),
    ),
    (4, "wakeup", include_str!("../../sql/004_wakeup.sql")),
    (
        5,
        "finite_send_after",
        include_str!("../../sql/005_finite_send_after.sql"),
    ),
    (
        6,
        "fcm_tokens",
        include_str!("../../sql/006_fcm_tokens.sql"),
    ),
    (7, "webpush", include_str!("../../sql/007_webpush.sql")),
    (8, "channels", include_str!("../../sql/008_channels.sql")),
    (
        9,
        "row_checks",
        include_str!("../../sql/009_row_checks.sql"),
    ),
];

/// How long any statement of `migrate` waits for a lock before it gives up, and so the
/// longest a writer queued behind one of its lock requests waits. It bounds the waits of
/// an index build too: `CREATE INDEX CONCURRENTLY` waits for the transactions that are
/// writing to the table when it starts, and before it finishes for every transaction in
/// the database older than itself.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a run that found another one running tries the advisory lock again.
const LOCK_RETRY: Duration = Duration::from_millis(200);

/// The marker line that starts a step of a migration file: alone, a step run in a
/// transaction; followed by ` no-transaction`, one statement run outside any.
pub const STEP_MARKER: &str = "-- pgpushd:step";

/// One part of a migration file, run on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step<'a> {
    /// False for a statement PostgreSQL refuses inside a transaction block.
    pub in_transaction: bool,
    pub sql: &'a str,
}

/// A migration file's steps, in order. The text before the first marker line is a step in
/// a transaction; a step without SQL (comments only) is left out.
pub fn steps(sql: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    let mut current = Step {
        in_transaction: true,
        sql: "",
    };
    let mut start = 0;
    let mut offset = 0;
    for line in sql.split_inclusive('\n') {
        if let Some(rest) = line.trim_end().strip_prefix(STEP_MARKER) {
            let in_transaction = match rest.trim() {
                "" => true,
                "no-transaction" => false,
                other => panic!("unknown step marker `{STEP_MARKER} {other}`"),
            };
            current.sql = &sql[start..offset];
            steps.push(current);
            current = Step {
                in_transaction,
                sql: "",
            };
            start = offset + line.len();
        }
        offset += line.len();
    }
    current.sql = &sql[start..];
    steps.push(current);
    steps.retain(|s| has_sql(s.sql));
    steps
}

fn has_sql(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with("--")
    })
}

/// The version the code expects; the daemon refuses to start on an older schema.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies what is missing; returns the versions it applied (empty when up to date).
pub async fn migrate(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    migrate_to(client, latest_version()).await
}

/// Applies the missing versions up to `target` (tests build older schemas with it).
pub async fn migrate_to(client: &mut Client, target: i32) -> anyhow::Result<Vec<i32>> {
    take_lock(client).await?;
    let applied = apply_pending(client, target).await;
    // Also after a failure: the connection may be the caller's to keep using.
    let released = client
        .batch_execute(
            "RESET lock_timeout; SELECT pg_advisory_unlock(hashtext('pgpushd.migrate'));",
        )
        .await;
    let applied = applied?;
    released.map_err(|e| anyhow::anyhow!("finishing migrations: {}", describe(&e)))?;
    Ok(applied)
}

/// The session's advisory lock, tried until it is free. Not `pg_advisory_lock`: a run
/// waiting inside a statement would have an index build of the run it waits for wait for
/// it in turn (a deadlock). Between tries, it holds no snapshot.
async fn take_lock(client: &Client) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        let taken: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('pgpushd.migrate'))",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("preparing migrations: {}", describe(&e)))?
            .get(0);
        if taken {
            return Ok(());
        }
        if !said {
            tracing::info!("another `pgpushd migrate` is running; waiting for it to finish");
            said = true;
        }
        tokio::time::sleep(LOCK_RETRY).await;
    }
}

async fn apply_pending(client: &mut Client, target: i32) -> anyhow::Result<Vec<i32>> {
    client
        .batch_execute(&format!(
            "SET lock_timeout = '{}ms';
             CREATE SCHEMA IF NOT EXISTS pgpushd;
             CREATE TABLE IF NOT EXISTS pgpushd.schema_migrations (
                 version    int PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
            LOCK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(|e| anyhow::anyhow!("preparing migrations: {}", describe(&e)))?;
    let done: Vec<i32> = client
        .query("SELECT version FROM pgpushd.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pending: Vec<_> = MIGRATIONS
        .iter()
        .filter(|m| m.0 <= target && !done.contains(&m.0))
        .collect();
    if !pending.is_empty() {
        drop_invalid_indexes(client)
            .await
            .map_err(|e| lock_error(&e))
            .context("dropping what an interrupted index build left")?;
    }
    let mut applied = Vec::new();
    for &&(version, name, sql) in &pending {
        apply(client, version, name, sql).await?;
        applied.push(version);
    }
    Ok(applied)
}

/// One version: its steps in order, the version recorded with the last one.
async fn apply(client: &mut Client, version: i32, name: &str, sql: &str) -> anyhow::Result<()> {
    let steps = steps(sql);
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        run_step(client, step, last.then_some((version, name)))
            .await
            .map_err(|e| lock_error(&e))
            .with_context(|| {
                let how = match step.in_transaction {
                    true => "",
                    false => ", outside a transaction",
                };
                format!(
                    "applying migration {version:03}_{name}.sql (step {} of {}{how}); \
                     version {version} is not recorded, and the next run applies it again",
                    i + 1,
                    steps.len()
                )
            })?;
    }
    Ok(())
}

/// A step, in a transaction of its own or alone; `record`, the version to record once it
/// is done (in its transaction, when it has one).
async fn run_step(
    client: &mut Client,
    step: &Step<'_>,
    record: Option<(i32, &str)>,
) -> Result<(), tokio_postgres::Error> {
    const RECORD: &str = "INSERT INTO pgpushd.schema_migrations (version, name) VALUES ($1, $2)";
    if step.in_transaction {
        let txn = client.transaction().await?;
        txn.batch_execute(step.sql).await?;
        if let Some((version, name)) = record {
            txn.execute(RECORD, &[&version, &name]).await?;
        }
        txn.commit().await
    } else {
        client.batch_execute(step.sql).await?;
        if let Some((version, name)) = record {
            client.execute(RECORD, &[&version, &name]).await?;
        }
        Ok(())
    }
}

/// The schema version in the database, 0 when pgpushd was never migrated there.
pub async fn schema_version(client: &Client) -> anyhow::Result<i32> {
    let read =
        |e: tokio_postgres::Error| anyhow::anyhow!("reading the schema version: {}", describe(&e));
    // Two queries: a query naming a table that does not exist fails at parse time.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgpushd.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(read)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgpushd.schema_migrations",
            &[],
        )
        .await
        .map_err(read)?;
    Ok(row.get(0))
}

/// Fails with instructions unless the schema is the one this build expects.
pub async fn ensure_current(client: &Client) -> anyhow::Result<()> {
    let have = schema_version(client).await?;
    let want = latest_version();
    if have < want {
        anyhow::bail!(
            "the database schema is at version {have}, this pgpushd needs {want}: \
             run `pgpushd migrate --config FILE` first"
        );
    }
    Ok(())
}

/// What a failed `CREATE INDEX CONCURRENTLY` leaves: an INVALID index, which writers keep
/// up to date and no query uses, and which `IF NOT EXISTS` would take for the index.
async fn drop_invalid_indexes(client: &Client) -> Result<(), tokio_postgres::Error> {
    let drops = client
        .query(
            "SELECT format('DROP INDEX CONCURRENTLY IF EXISTS %I.%I', n.nspname, c.relname)
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'pgpushd' AND NOT i.indisvalid",
            &[],
        )
        .await?;
    for drop in drops {
        let sql: String = drop.get(0);
        tracing::info!(statement = %sql, "dropping an index an interrupted build left INVALID");
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

/// A statement's error as one line; waiting longer than [`LOCK_TIMEOUT`] for a lock says
/// who may hold it and what to do.
fn lock_error(e: &tokio_postgres::Error) -> anyhow::Error {
    match e.code() {
        Some(&SqlState::LOCK_NOT_AVAILABLE) => anyhow::anyhow!(
            "{}: another transaction held what this step waits for longer than {}s (a long \
             batch, which `pgpushd status` shows, or a long transaction of the application's, \
             in pg_stat_activity); migrate gave up rather than make writers wait: \
             run `pgpushd migrate` again",
            describe(e),
            LOCK_TIMEOUT.as_secs()
        ),
        _ => anyhow::anyhow!("{}", describe(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_split_into_steps_at_its_marker_lines() {
        let sql = "-- header\n\nALTER TABLE t ADD COLUMN IF NOT EXISTS c int;\n\
                   -- pgpushd:step no-transaction\n\
                   CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (c);\n\
                   -- only a comment\n\
                   -- pgpushd:step\n\
                   ALTER TABLE t ADD CONSTRAINT k CHECK (c > 0) NOT VALID;\n";
        assert_eq!(
            steps(sql),
            [
                Step {
                    in_transaction: true,
                    sql: "-- header\n\nALTER TABLE t ADD COLUMN IF NOT EXISTS c int;\n",
                },
                Step {
                    in_transaction: false,
                    sql: "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (c);\n-- only a comment\n",
                },
                Step {
                    in_transaction: true,
                    sql: "ALTER TABLE t ADD CONSTRAINT k CHECK (c > 0) NOT VALID;\n",
                },
            ]
        );
        // Comments alone before a marker are no step.
        assert_eq!(
            steps("-- a\n-- pgpushd:step no-transaction\nCREATE INDEX CONCURRENTLY i ON t (c);"),
            [Step {
                in_transaction: false,
                sql: "CREATE INDEX CONCURRENTLY i ON t (c);",
            }]
        );
    }

    /// The tables `code`'s `CREATE [UNIQUE] INDEX ... ON table` statements index.
    fn indexed_tables(code: &str) -> Vec<&str> {
        code.split("CREATE ")
            .skip(1)
            .filter(|s| s.starts_with("INDEX") || s.starts_with("UNIQUE INDEX"))
            .filter_map(|s| s.split(" ON ").nth(1))
            .filter_map(|s| s.split_whitespace().next())
            .collect()
    }

    /// What an upgrade of a large outbox must not do: build an index under a lock that
    /// holds writers. A step outside a transaction is one statement (several would run in
    /// one implicit transaction, which `CONCURRENTLY` refuses).
    #[test]
    fn every_index_on_an_existing_table_is_built_concurrently_alone() {
        for &(version, name, sql) in &MIGRATIONS[1..] {
            for step in steps(sql) {
                let code: String = step
                    .sql
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n");
                for table in indexed_tables(&code) {
                    // A table the same step creates holds no row yet: no writer waits.
                    let created_here = code.contains(&format!("CREATE TABLE {table} "));
                    assert!(
                        created_here
                            || (!step.in_transaction && code.contains("CREATE INDEX CONCURRENTLY")),
                        "{version:03}_{name}: {code}"
                    );
                }
                if !step.in_transaction {
                    assert_eq!(code.matches(';').count(), 1, "{version:03}_{name}: {code}");
                }
            }
        }
        // The released files' steps, as the comments in 002 and 003 describe them.
        assert_eq!(
            MIGRATIONS[..6]
                .iter()
                .map(|m| steps(m.2).len())
                .collect::<Vec<_>>(),
            [1, 3, 2, 1, 1, 1]
        );
    }
}
