//! Schema migrations: the files of `sql/`, embedded, applied in order, each version
//! recorded in `pgpushd.schema_migrations`. Idempotent; concurrent runs are serialised by
//! an advisory lock, so two daemons deploying at once cannot both apply a file.

use anyhow::Context as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::describe;

/// `(version, name, sql)`, in order. Never edit a released file: add the next one.
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
];

/// The version the code expects; the daemon refuses to start on an older schema.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies what is missing; returns the versions it applied (empty when up to date).
pub async fn migrate(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    let txn = client.transaction().await?;
    txn.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgpushd.migrate'));
         CREATE SCHEMA IF NOT EXISTS pgpushd;
         CREATE TABLE IF NOT EXISTS pgpushd.schema_migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(|e| anyhow::anyhow!("preparing migrations: {}", describe(&e)))?;
    let done: Vec<i32> = txn
        .query("SELECT version FROM pgpushd.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        txn.batch_execute(sql)
            .await
            .map_err(|e| match e.code() {
                Some(&SqlState::LOCK_NOT_AVAILABLE) => anyhow::anyhow!(
                    "{}: a long transaction holds pgpushd.outbox (`pgpushd status` shows \
                     long batches); nothing was changed, run `pgpushd migrate` again",
                    describe(&e)
                ),
                _ => anyhow::anyhow!("{}", describe(&e)),
            })
            .with_context(|| format!("applying migration {version:03}_{name}.sql"))?;
        txn.execute(
            "INSERT INTO pgpushd.schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        applied.push(version);
    }
    txn.commit().await?;
    Ok(applied)
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
