//! `pgpushd demo`: the whole pipeline on one machine with nothing configured — a
//! throwaway PostgreSQL, the APNs emulator with token auth, and the daemon — delivering
//! N rows and saying how it went.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pgpushd_emulator::{Emulator, EmulatorAuth, EmulatorConfig};
use tokio_util::sync::CancellationToken;

use crate::apns::Apns;
use crate::config::Config;
use crate::daemon::Daemon;
use crate::devdb::DevDb;
use crate::outbox::status::Totals;
use crate::secret::Secret;
use crate::{db, outbox};

const TOPIC: &str = "com.example.pgpushd-demo";
const KEY_ID: &str = "DEMOKEY123";
const TEAM_ID: &str = "DEMOTEAM45";

/// What the demo saw, for its summary (and its test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub sent: i64,
    pub failed: i64,
    pub pending: i64,
    pub emulator_accepted: u64,
}

/// Runs the demo, printing progress to stdout.
pub async fn run(rows: u64) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut out = std::io::stdout();
    writeln!(
        out,
        "pgpushd demo: {rows} notifications through a throwaway PostgreSQL and the APNs emulator"
    )?;

    let cluster =
        tokio::task::block_in_place(DevDb::start).context("starting a throwaway PostgreSQL")?;
    let url = tokio::task::block_in_place(|| cluster.create_database("pgpushd_demo"))?;
    writeln!(out, "  PostgreSQL  started (port {})", cluster.port())?;

    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join(format!("AuthKey_{KEY_ID}.p8"));
    let key_pem = pgpushd_emulator::jwt::generate_signing_key()?;
    std::fs::write(&key_file, &key_pem)?;
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::Token {
            public_key_pem: key_pem,
            key_id: KEY_ID.into(),
            team_id: TEAM_ID.into(),
        },
        topic: Some(TOPIC.into()),
        keep_records: 0,
        ..EmulatorConfig::default()
    })
    .await
    .context("starting the APNs emulator")?;
    let ca_file = dir.path().join("emulator-ca.pem");
    std::fs::write(&ca_file, emulator.ca_pem())?;
    writeln!(
        out,
        "  emulator    {} (token auth, topic {TOPIC})",
        emulator.endpoint()
    )?;

    let config = demo_config(dir.path(), &url, &emulator.endpoint(), &key_file, &ca_file)?;
    let client = db::connect(&Secret::new(url.clone()), Duration::from_secs(10), "demo").await?;
    {
        let mut c = db::connect(
            &Secret::new(url.clone()),
            Duration::from_secs(10),
            "migrate",
        )
        .await?;
        outbox::migrate::migrate(&mut c).await?;
    }

    let transport = Arc::new(Apns::new(&config.apps).context("setting up APNs")?);
    let daemon = Daemon::new(config, transport);
    let cancel = CancellationToken::new();
    let daemon_task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    writeln!(
        out,
        "  daemon      running; inserting {rows} rows in statements of up to 100"
    )?;

    let insert_started = Instant::now();
    let mut inserted = 0u64;
    while inserted < rows {
        // The application's INSERT: the one statement pgpushd leaves to its users.
        let n = (rows - inserted).min(100) as i64;
        client
            .execute(
                "INSERT INTO pgpushd.outbox (device_token, payload)
                 SELECT encode(sha256(('demo' || g)::bytea), 'hex'),
                        jsonb_build_object('aps', jsonb_build_object('alert', 'Hello #' || g))
                   FROM generate_series($1::bigint, $2::bigint) g",
                &[&(inserted as i64 + 1), &(inserted as i64 + n)],
            )
            .await
            .context("inserting demo rows")?;
        inserted += n as u64;
    }

    let deadline = Instant::now() + Duration::from_secs(60 + rows / 500);
    let mut last = (0, 0, rows as i64);
    loop {
        let Totals {
            sent,
            failed,
            pending,
        } = Totals::read(&client).await?;
        if (sent, failed, pending) != last {
            writeln!(
                out,
                "  progress    {sent:>7} sent  {failed:>5} failed  {pending:>7} pending"
            )?;
            last = (sent, failed, pending);
        }
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = insert_started.elapsed();
    cancel.cancel();
    daemon_task.await??;

    let (sent, failed, pending) = last;
    let summary = Summary {
        rows,
        sent,
        failed,
        pending,
        emulator_accepted: emulator.stats().count(200),
    };
    writeln!(
        out,
        "delivered {sent} of {rows} notifications in {:.2} s ({:.0}/s); {failed} failed, {pending} still pending; \
         the emulator accepted {} (total run time {:.1} s)",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64().max(1e-3),
        summary.emulator_accepted,
        started.elapsed().as_secs_f64(),
    )?;
    emulator.shutdown().await;
    drop(cluster);
    Ok(summary)
}

/// The config a user would write for this set-up, parsed like any other.
fn demo_config(
    dir: &Path,
    url: &str,
    endpoint: &str,
    key_file: &Path,
    ca_file: &Path,
) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[database]
url = "{url}"
poll_interval = "5s"

[apps.default]
topic = "{TOPIC}"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.default.token]
key_file = "{key}"
key_id = "{KEY_ID}"
team_id = "{TEAM_ID}"
"#,
        ca = ca_file.display(),
        key = key_file.display(),
    );
    let path = dir.join("pgpushd.toml");
    std::fs::write(&path, &text)?;
    Ok(Config::from_file_str(&path, &text, None)?)
}
