//! `pgpushd demo`: the whole pipeline on one machine with nothing configured — a
//! throwaway PostgreSQL, the APNs emulator with token auth (or the FCM emulator with its
//! service account, or the Web Push emulator with browsers' subscriptions, or several:
//! [`Services`]), and the daemon — delivering N rows and saying how it went.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pgpushd_emulator::fcm::{FcmEmulator, FcmEmulatorConfig, FcmEndpoint};
use pgpushd_emulator::webpush::{WebPushEmulator, WebPushEmulatorConfig};
use pgpushd_emulator::{Emulator, EmulatorAuth, EmulatorConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::console::{bar, Console};
use crate::daemon::Daemon;
use crate::devdb::DevDb;
use crate::outbox::status::Totals;
use crate::providers::Providers;
use crate::secret::Secret;
use crate::webpush::vapid::VapidKey;
use crate::{db, outbox};

const TOPIC: &str = "com.example.pgpushd-demo";
const KEY_ID: &str = "DEMOKEY123";
const TEAM_ID: &str = "DEMOTEAM45";

/// Which push services the demo's rows go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Services {
    /// APNs (the default): every row to the APNs emulator.
    Apns,
    /// FCM: every row, for Android, to the FCM emulator.
    Fcm,
    /// Web Push: every row, for a browser, to the Web Push emulator.
    Webpush,
    /// APNs and FCM, half the rows each, through one daemon.
    Both,
    /// APNs, FCM and Web Push, a third of the rows each, through one daemon.
    All,
}

impl Services {
    /// How many rows go to APNs, FCM and Web Push.
    fn split(self, rows: u64) -> (u64, u64, u64) {
        match self {
            Services::Apns => (rows, 0, 0),
            Services::Fcm => (0, rows, 0),
            Services::Webpush => (0, 0, rows),
            Services::Both => (rows - rows / 2, rows / 2, 0),
            Services::All => (rows - 2 * (rows / 3), rows / 3, rows / 3),
        }
    }

    fn emulators(self) -> &'static str {
        match self {
            Services::Apns => "the APNs emulator",
            Services::Fcm => "the FCM emulator",
            Services::Webpush => "the Web Push emulator",
            Services::Both => "the APNs and FCM emulators",
            Services::All => "the APNs, FCM and Web Push emulators",
        }
    }
}

/// Browsers the Web Push rows go to (rows beyond take turns).
const BROWSERS: u64 = 100;

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
pub async fn run(rows: u64, services: Services) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut out = std::io::stdout();
    let (apns_rows, fcm_rows, webpush_rows) = services.split(rows);
    let emulators = services.emulators();
    writeln!(
        out,
        "pgpushd demo: {rows} notifications through a throwaway PostgreSQL and {emulators}"
    )?;

    let cluster =
        tokio::task::block_in_place(DevDb::start).context("starting a throwaway PostgreSQL")?;
    let url = tokio::task::block_in_place(|| cluster.create_database("pgpushd_demo"))?;
    writeln!(out, "  PostgreSQL  started (port {})", cluster.port())?;

    let dir = tempfile::tempdir()?;
    let mut apps = String::new();
    let apns = match apns_rows {
        0 => None,
        _ => {
            let (emulator, toml) = start_apns(dir.path()).await?;
            writeln!(
                out,
                "  emulator    {} (APNs, token auth, topic {TOPIC})",
                emulator.endpoint()
            )?;
            apps.push_str(&toml);
            Some(emulator)
        }
    };
    let fcm = match fcm_rows {
        0 => None,
        _ => {
            let (emulator, toml) = start_fcm(dir.path(), fcm_rows).await?;
            writeln!(
                out,
                "  emulator    {} (FCM, service account of project {})",
                emulator.endpoint(),
                emulator.project_id().unwrap_or("?")
            )?;
            apps.push_str(&toml);
            Some(emulator)
        }
    };

    let webpush = match webpush_rows {
        0 => None,
        _ => {
            let (emulator, toml, subscriptions) = start_webpush(dir.path(), webpush_rows).await?;
            writeln!(
                out,
                "  emulator    {} (Web Push, {} browsers subscribed with the app's VAPID key)",
                emulator.endpoint(),
                subscriptions.len()
            )?;
            apps.push_str(&toml);
            Some((emulator, subscriptions))
        }
    };

    let config = demo_config(dir.path(), &url, &apps)?;
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

    let transport = Arc::new(Providers::new(&config.apps).context("loading the apps")?);
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
    insert(&client, APNS_ROWS, apns_rows).await?;
    insert(&client, FCM_ROWS, fcm_rows).await?;
    if let Some((_, subscriptions)) = &webpush {
        insert_webpush(&client, subscriptions, webpush_rows).await?;
    }

    let deadline = Instant::now() + Duration::from_secs(60 + rows / 500);
    let mut console = Console::stdout();
    let mut progress = Progress::new(rows);
    let last = loop {
        let totals = Totals::read(&client).await?;
        console.progress(&progress.line(&totals, Instant::now()))?;
        if totals.pending == 0 || Instant::now() > deadline {
            break totals;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    console.end_progress()?;
    let elapsed = insert_started.elapsed();
    cancel.cancel();
    daemon_task.await??;

    let Totals {
        sent,
        failed,
        pending,
    } = last;
    let fcm_accepted = fcm.as_ref().map_or(0, |e| {
        e.records()
            .iter()
            .filter(|r| r.endpoint == FcmEndpoint::Send && r.status == 200)
            .count() as u64
    });
    let webpush_accepted = webpush.as_ref().map_or(0, |(e, _)| {
        e.records().iter().filter(|r| r.status == 201).count() as u64
    });
    let summary = Summary {
        rows,
        sent,
        failed,
        pending,
        emulator_accepted: apns.as_ref().map_or(0, |e| e.stats().count(200))
            + fcm_accepted
            + webpush_accepted,
    };
    writeln!(
        out,
        "delivered {sent} of {rows} notifications in {:.2} s ({:.0}/s); {failed} failed, {pending} still pending; \
         {emulators} accepted {} (total run time {:.1} s)",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64().max(1e-3),
        summary.emulator_accepted,
        started.elapsed().as_secs_f64(),
    )?;
    if let Some(e) = apns {
        e.shutdown().await;
    }
    if let Some(e) = fcm {
        e.shutdown().await;
    }
    if let Some((e, _)) = webpush {
        e.shutdown().await;
    }
    drop(cluster);
    Ok(summary)
}

/// The progress line: a bar, the counts and the send rate over the last second.
struct Progress {
    rows: u64,
    /// `(when, sent)` over the last second or so, oldest first.
    samples: VecDeque<(Instant, i64)>,
}

impl Progress {
    fn new(rows: u64) -> Progress {
        Progress {
            rows,
            samples: VecDeque::new(),
        }
    }

    fn line(&mut self, t: &Totals, now: Instant) -> String {
        self.samples.push_back((now, t.sent));
        while self.samples.len() > 2
            && now.duration_since(self.samples[1].0) >= Duration::from_secs(1)
        {
            self.samples.pop_front();
        }
        let (since, sent_then) = self.samples[0];
        let secs = now.duration_since(since).as_secs_f64();
        let rate = match secs > 0.0 {
            true => format!("{:.0}/s", (t.sent - sent_then) as f64 / secs),
            false => "-/s".to_owned(),
        };
        let width = self.rows.to_string().len();
        format!(
            "  {} {:>width$} of {} sent  {} failed  {:>width$} pending  {rate}",
            bar((t.sent + t.failed).max(0) as u64, self.rows, 30),
            t.sent,
            self.rows,
            t.failed,
            t.pending,
        )
    }
}

/// The application's INSERT for `n` rows of `statement`'s kind, in statements of up to
/// 100: the one statement pgpushd leaves to its users.
async fn insert(client: &tokio_postgres::Client, statement: &str, n: u64) -> anyhow::Result<()> {
    let mut inserted = 0u64;
    while inserted < n {
        let chunk = (n - inserted).min(100) as i64;
        client
            .execute(
                statement,
                &[&(inserted as i64 + 1), &(inserted as i64 + chunk)],
            )
            .await
            .context("inserting demo rows")?;
        inserted += chunk as u64;
    }
    Ok(())
}

/// Rows for the APNs app: a hex token and an alert each.
const APNS_ROWS: &str = "
INSERT INTO pgpushd.outbox (device_token, payload)
SELECT encode(sha256(('demo' || g)::bytea), 'hex'),
       jsonb_build_object('aps', jsonb_build_object('alert', 'Hello #' || g))
  FROM generate_series($1::bigint, $2::bigint) g";

/// Rows for the Android app: a registration token and FCM's message without it each.
const FCM_ROWS: &str = "
INSERT INTO pgpushd.outbox (app, device_token, payload)
SELECT 'android', 'demo' || g || ':APA91b' || encode(sha256(('demo' || g)::bytea), 'hex'),
       jsonb_build_object('notification', jsonb_build_object('title', 'pgpushd demo',
                                                             'body', 'Hello #' || g),
                          'data', jsonb_build_object('n', g::text))
  FROM generate_series($1::bigint, $2::bigint) g";

/// `n` rows for the browser app, taking turns over `subscriptions`: what the service
/// worker's push event gets as each payload.
async fn insert_webpush(
    client: &tokio_postgres::Client,
    subscriptions: &[String],
    n: u64,
) -> anyhow::Result<()> {
    let mut inserted = 0u64;
    while inserted < n {
        let chunk = (n - inserted).min(100);
        let tokens: Vec<&str> = (inserted..inserted + chunk)
            .map(|i| subscriptions[(i % subscriptions.len() as u64) as usize].as_str())
            .collect();
        client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 SELECT 'web', s, jsonb_build_object('title', 'pgpushd demo',
                                                     'body', 'Hello #' || ($2 + g))
                   FROM unnest($1::text[]) WITH ORDINALITY AS t(s, g)",
                &[&tokens, &(inserted as i64)],
            )
            .await
            .context("inserting demo rows")?;
        inserted += chunk;
    }
    Ok(())
}

/// The Web Push emulator, a VAPID key, the browsers' subscriptions made with it, and the
/// `[apps.web]` that reaches them; it keeps a record of each of the `rows` pushes.
async fn start_webpush(
    dir: &Path,
    rows: u64,
) -> anyhow::Result<(WebPushEmulator, String, Vec<String>)> {
    let emulator = WebPushEmulator::start(WebPushEmulatorConfig {
        keep_records: usize::try_from(rows)
            .unwrap_or(usize::MAX)
            .saturating_add(100),
        ..WebPushEmulatorConfig::default()
    })
    .await
    .context("starting the Web Push emulator")?;
    let ca_file = dir.join("webpush-emulator-ca.pem");
    std::fs::write(&ca_file, emulator.ca_pem())?;
    let key = VapidKey::generate().map_err(anyhow::Error::msg)?;
    let key_file = dir.join("vapid.pem");
    std::fs::write(&key_file, key.to_pem().map_err(anyhow::Error::msg)?)?;
    let application_server_key = crate::webpush::base64url::decode(&key.public_key_b64url())
        .context("the VAPID key's public key")?;
    let subscriptions = (0..rows.min(BROWSERS))
        .map(|_| Ok(emulator.subscribe(Some(&application_server_key))?.to_json()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let toml = format!(
        r#"
[apps.web]
provider = "webpush"
ca_file = "{ca}"

[apps.web.webpush]
key_file = "{key}"
subject = "mailto:demo@example.com"
push_services = ["localhost", "127.0.0.1"]
"#,
        ca = ca_file.display(),
        key = key_file.display(),
    );
    Ok((emulator, toml, subscriptions))
}

/// The APNs emulator with token auth, and the `[apps.default]` that reaches it.
async fn start_apns(dir: &Path) -> anyhow::Result<(Emulator, String)> {
    let key_file = dir.join(format!("AuthKey_{KEY_ID}.p8"));
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
    let ca_file = dir.join("emulator-ca.pem");
    std::fs::write(&ca_file, emulator.ca_pem())?;
    let toml = format!(
        r#"
[apps.default]
topic = "{TOPIC}"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.default.token]
key_file = "{key}"
key_id = "{KEY_ID}"
team_id = "{TEAM_ID}"
"#,
        endpoint = emulator.endpoint(),
        ca = ca_file.display(),
        key = key_file.display(),
    );
    Ok((emulator, toml))
}

/// The FCM emulator with the service account it makes, and the `[apps.android]` that
/// reaches it; it keeps a record of each of the `rows` sends, to count them.
async fn start_fcm(dir: &Path, rows: u64) -> anyhow::Result<(FcmEmulator, String)> {
    let emulator = FcmEmulator::start(FcmEmulatorConfig {
        keep_records: usize::try_from(rows)
            .unwrap_or(usize::MAX)
            .saturating_add(100),
        ..FcmEmulatorConfig::default()
    })
    .await
    .context("starting the FCM emulator")?;
    let ca_file = dir.join("fcm-emulator-ca.pem");
    std::fs::write(&ca_file, emulator.ca_pem())?;
    let key_file = dir.join("service-account.json");
    let key = emulator
        .service_account_json()
        .context("the FCM emulator made no service account")?;
    std::fs::write(&key_file, key)?;
    let toml = format!(
        r#"
[apps.android]
provider = "fcm"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.android.fcm]
service_account_file = "{key}"
"#,
        endpoint = emulator.endpoint(),
        ca = ca_file.display(),
        key = key_file.display(),
    );
    Ok((emulator, toml))
}

/// The config a user would write for this set-up, parsed like any other.
fn demo_config(dir: &Path, url: &str, apps: &str) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[database]
url = "{url}"
poll_interval = "5s"
{apps}"#
    );
    let path = dir.join("pgpushd.toml");
    std::fs::write(&path, &text)?;
    Ok(Config::from_file_str(&path, &text, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_a_bar_counts_and_the_rate_over_the_last_second() {
        let mut p = Progress::new(1000);
        let t0 = Instant::now();
        let totals = |sent, failed, pending| Totals {
            sent,
            failed,
            pending,
        };
        assert_eq!(
            p.line(&totals(0, 0, 1000), t0),
            format!(
                "  [{}]    0 of 1000 sent  0 failed  1000 pending  -/s",
                ".".repeat(30)
            )
        );
        let half = p.line(&totals(500, 0, 500), t0 + Duration::from_millis(500));
        assert!(
            half.contains(&format!("[{}{}]", "#".repeat(15), ".".repeat(15))),
            "{half}"
        );
        assert!(
            half.ends_with(" 500 of 1000 sent  0 failed   500 pending  1000/s"),
            "{half}"
        );
        // Two seconds later the rate is over the last second's samples only.
        p.line(&totals(600, 0, 400), t0 + Duration::from_millis(1500));
        let late = p.line(&totals(700, 10, 290), t0 + Duration::from_millis(2500));
        assert!(
            late.ends_with("  700 of 1000 sent  10 failed   290 pending  100/s"),
            "{late}"
        );
    }
}
