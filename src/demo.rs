//! `pgpushd demo`: the whole pipeline on one machine with nothing configured — a
//! throwaway PostgreSQL, the APNs emulator with token auth, and the daemon — delivering
//! N rows and saying how it went.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pgpushd_emulator::{Emulator, EmulatorAuth, EmulatorConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::console::{bar, Console};
use crate::daemon::Daemon;
use crate::devdb::DevDb;
use crate::outbox::status::Totals;
use crate::providers::Providers;
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
