//! The `webpush_drain` scenario: the drain of `fcm_drain`, for a web app through Web
//! Push. The Web Push emulator (`pgpushd emulator --protocol webpush`, its own process)
//! makes [`SUBSCRIPTIONS`] browsers' subscriptions at start, and decrypts and checks
//! every push before it answers 201; the daemon drains a backlog of Web Push rows spread
//! over them, with the shipped defaults. Each row costs pgpushd an ECDH with a new key
//! pair and an AES-GCM encryption (RFC 8291), and the emulator the same ECDH and the
//! decryption, beside the VAPID signature's check.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use pgpushd::webpush::vapid::VapidKey;
use tokio_postgres::Client;

use crate::db;
use crate::procs::{self, EmulatorProc, Watched, Workdir};
use crate::scenarios::{Drain, Env};

/// The browsers the rows go to (each a P-256 key pair the emulator makes at start).
pub const SUBSCRIPTIONS: usize = 1000;

/// Drains a backlog of `rows` Web Push rows through the Web Push emulator.
pub async fn drain(env: &Env<'_>, rows: u64) -> anyhow::Result<Drain> {
    db::empty(&env.client).await?;
    // The subscriptions come from the emulator, so it starts before the backlog loads.
    let emulator = start_emulator(env.work)?;
    let subscriptions = read_subscriptions(env.work)?;
    let load = load_backlog(&env.client, rows, &subscriptions).await?;
    let config = daemon_config(env.work, &env.url)?;
    let mut watched = Watched {
        daemon: None,
        emulator: Some(emulator.proc.pid()),
        postmaster: env.postmaster,
    };
    procs::wait_quiet(Duration::from_secs(30)).await;
    let before = watched.mark();
    let daemon = procs::start_daemon(env.work, &config)?;
    watched.daemon = Some(daemon.pid());
    let deadline = Duration::from_secs(120 + rows / 200);
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
        bail!("after the Web Push drain: {sent} rows sent and {other} not, of {rows}");
    }
    Ok(Drain {
        rows_per_s: rows as f64 / elapsed.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        load_s: load.as_secs_f64(),
        peak_rss_mb,
        cpu,
    })
}

/// Rows `1..=n` for the app `web`, row `g` to subscription `g % SUBSCRIPTIONS` (so a
/// batch goes to many browsers), each a small JSON object as a service worker would
/// show: about the size of the APNs drain's payload.
async fn load_backlog(
    client: &Client,
    n: u64,
    subscriptions: &[String],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let count = subscriptions.len() as i64;
    let mut first = 1u64;
    while first <= n {
        let last = (first + 99_999).min(n);
        client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 SELECT 'web', s.token,
                        jsonb_build_object('title', 'Bench', 'body', 'Bench #' || g)
                   FROM generate_series($1::bigint, $2::bigint) g
                   JOIN unnest($3::text[]) WITH ORDINALITY AS s(token, i)
                     ON s.i = g % $4::bigint + 1",
                &[&(first as i64), &(last as i64), &subscriptions, &count],
            )
            .await
            .context("loading the Web Push backlog")?;
        first = last + 1;
    }
    client
        .batch_execute("VACUUM ANALYZE pgpushd.outbox")
        .await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(started.elapsed())
}

/// `pgpushd emulator --protocol webpush --subscriptions N`, which writes its CA and the
/// subscriptions (one PushSubscription JSON a line) to its own TLS directory
/// ([`tls_dir`]) before it listens.
fn start_emulator(work: &Workdir) -> anyhow::Result<EmulatorProc> {
    // A CA already there would be reused; the subscriptions are made anew each time.
    fs::create_dir_all(tls_dir(work))?;
    let mut cmd = Command::new(procs::BIN);
    cmd.args([
        "emulator",
        "--protocol",
        "webpush",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--tls-dir")
    .arg(tls_dir(work))
    .arg("--subscriptions")
    .arg(SUBSCRIPTIONS.to_string());
    // "Web Push emulator listening on https://127.0.0.1:PORT (push resources ...)"
    procs::spawn_emulator(
        work,
        &mut cmd,
        "webpush-emulator.log",
        "Web Push emulator listening on ",
    )
}

/// The subscriptions the emulator wrote, as the rows' device tokens.
fn read_subscriptions(work: &Workdir) -> anyhow::Result<Vec<String>> {
    let path = tls_dir(work).join("subscriptions.jsonl");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let subscriptions: Vec<String> = text.lines().map(str::to_owned).collect();
    if subscriptions.len() != SUBSCRIPTIONS {
        bail!(
            "{} has {} subscriptions, not {SUBSCRIPTIONS}",
            path.display(),
            subscriptions.len()
        );
    }
    Ok(subscriptions)
}

fn tls_dir(work: &Workdir) -> PathBuf {
    work.path("webpush-tls")
}

/// The daemon's config: the shipped defaults, one Web Push app with a new VAPID key. No
/// endpoint: each row's subscription names its push service, the emulator.
fn daemon_config(work: &Workdir, db_url: &str) -> anyhow::Result<PathBuf> {
    let key_file = work.path("vapid.pem");
    let key = VapidKey::generate()
        .and_then(|k| k.to_pem())
        .map_err(|e| anyhow!("making a VAPID key: {e}"))?;
    fs::write(&key_file, key)?;
    let text = format!(
        r#"[database]
url = "{db_url}"
poll_interval = "5s"
{keys}

[apps.web]
provider = "webpush"
ca_file = "{ca}"

[apps.web.webpush]
key_file = "{key}"
subject = "mailto:bench@example.com"
push_services = ["127.0.0.1"]
"#,
        keys = work.database_keys,
        ca = tls_dir(work).join("ca.pem").display(),
        key = key_file.display(),
    );
    let path = work.path("pgpushd-webpush.toml");
    fs::write(&path, text)?;
    Ok(path)
}
