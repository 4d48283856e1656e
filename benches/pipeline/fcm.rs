//! The `fcm_drain` scenario: the drain of `scenarios::drain_and_raw`, for an Android app
//! through Firebase Cloud Messaging. The FCM emulator (`pgpushd emulator --protocol
//! fcm`, its own process) issues the access token and answers `messages:send` at once;
//! the daemon drains a backlog of FCM rows with the shipped defaults.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::db;
use crate::procs::{self, EmulatorProc, Watched, Workdir};
use crate::scenarios::{Drain, Env};

/// Drains a backlog of `rows` FCM rows through the FCM emulator.
pub async fn drain(env: &Env<'_>, rows: u64) -> anyhow::Result<Drain> {
    db::empty(&env.client).await?;
    let load = load_backlog(&env.client, rows).await?;
    let emulator = start_emulator(env.work)?;
    let config = daemon_config(env.work, &env.url, &emulator)?;
    let mut watched = Watched {
        daemon: None,
        emulator: Some(emulator.proc.pid()),
        postmaster: env.postmaster,
    };
    procs::wait_quiet(Duration::from_secs(30)).await;
    let before = watched.mark();
    let daemon = procs::start_daemon(env.work, &config)?;
    watched.daemon = Some(daemon.pid());
    let deadline = Duration::from_secs(120 + rows / 1000);
    let done = db::wait_drained(&env.client, deadline)
        .await
        .with_context(|| fs::read_to_string(env.work.path("daemon.log")).unwrap_or_default())?;
    let elapsed = done.duration_since(daemon.started);
    let cpu = watched.since(&before, true);
    let peak_rss_mb = procs::peak_rss_mb(daemon.pid()).unwrap_or(f64::NAN);
    daemon.stop()?;
    emulator.proc.stop()?;
    let (sent, other) = db::sent_and_other(&env.client).await?;
    if sent != rows as i64 || other != 0 {
        bail!("after the FCM drain: {sent} rows sent and {other} not, of {rows}");
    }
    Ok(Drain {
        rows_per_s: rows as f64 / elapsed.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        load_s: load.as_secs_f64(),
        peak_rss_mb,
        cpu,
    })
}

/// Rows `1..=n` for the app `android`: a registration token and a message each, about
/// the size of the APNs drain's.
async fn load_backlog(client: &Client, n: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut first = 1u64;
    while first <= n {
        let last = (first + 99_999).min(n);
        client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 SELECT 'android', 'bench' || g || ':APA91b' || lpad(to_hex(g), 32, '0'),
                        jsonb_build_object('notification',
                                           jsonb_build_object('body', 'Bench #' || g))
                   FROM generate_series($1::bigint, $2::bigint) g",
                &[&(first as i64), &(last as i64)],
            )
            .await
            .context("loading the FCM backlog")?;
        first = last + 1;
    }
    client
        .batch_execute("VACUUM ANALYZE pgpushd.outbox")
        .await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(started.elapsed())
}

/// `pgpushd emulator --protocol fcm`, which writes its CA and a service account's key
/// to its own TLS directory ([`tls_dir`]) before it listens.
fn start_emulator(work: &Workdir) -> anyhow::Result<EmulatorProc> {
    fs::create_dir_all(tls_dir(work))?;
    let mut cmd = Command::new(procs::BIN);
    cmd.args(["emulator", "--protocol", "fcm", "--listen", "127.0.0.1:0"])
        .arg("--tls-dir")
        .arg(tls_dir(work));
    // "FCM emulator listening on https://127.0.0.1:PORT (token endpoint ...)"
    procs::spawn_emulator(
        work,
        &mut cmd,
        "fcm-emulator.log",
        "FCM emulator listening on ",
    )
}

fn tls_dir(work: &Workdir) -> PathBuf {
    work.path("fcm-tls")
}

/// The daemon's config: the shipped defaults, one FCM app pointing at the emulator.
fn daemon_config(work: &Workdir, db_url: &str, emulator: &EmulatorProc) -> anyhow::Result<PathBuf> {
    let text = format!(
        r#"[database]
url = "{db_url}"
poll_interval = "5s"

[apps.android]
provider = "fcm"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.android.fcm]
service_account_file = "{key}"
"#,
        endpoint = emulator.endpoint,
        ca = tls_dir(work).join("ca.pem").display(),
        key = tls_dir(work).join("service-account.json").display(),
    );
    let path = work.path("pgpushd-fcm.toml");
    fs::write(&path, text)?;
    Ok(path)
}
