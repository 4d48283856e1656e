//! Rows through a real HTTP proxy (`tinyproxy`, see `tinyproxy.rs`): HTTP/2 and the
//! binary protocol (gateway and feedback service) tunnel through it, with Basic
//! authentication; refused credentials keep the rows pending, say why, and a reload
//! that fixes them delivers the rows; a proxy killed mid-run makes rows wait until it
//! is back; `HTTPS_PROXY` and `NO_PROXY` steer a spawned daemon. Every test checks the
//! proxy's log for the tunnels it was asked for, so a daemon that bypassed the proxy
//! fails it.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::binary_protocol::{start_binary, taken, Identity, Setup};
use crate::service::{signal, wait_exit, write_config};
use crate::support::*;
use crate::tinyproxy::{self, Tinyproxy};
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(60);

/// The daemon binary with `env`, its log (debug level) written to `log`.
fn spawn(config: &Path, env: &[(&str, &str)], log: &Path) -> Spawned {
    let mut cmd = pgpushd_command();
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "pgpushd=debug,info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Spawned(cmd.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rows_reach_the_emulator_through_the_proxy() {
    if !tinyproxy::available("http2_rows_reach_the_emulator_through_the_proxy") {
        return;
    }
    let proxy = Tinyproxy::start(None);
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let cfg = config(
        &db.url,
        &format!(
            "{}\n[network]\nproxy = \"{}\"\n",
            apns.app_toml,
            proxy.url()
        ),
    );
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    insert_rows(&client, 1, 200).await;
    wait_for_status(&client, "sent", 200, DEADLINE).await;
    daemon.stop().await;

    let answered = apns
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 200)
        .count();
    assert_eq!(answered, 200);
    // Every connection the emulator accepted was a tunnel the proxy was asked for.
    let connects = proxy.connects();
    let emulator = apns.emulator.addr().to_string();
    assert!(!connects.is_empty(), "the proxy was bypassed");
    assert!(connects.iter().all(|c| *c == emulator), "{connects:?}");
    assert_eq!(
        connects.len() as u64,
        apns.emulator.stats().connections_accepted,
        "{connects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_rows_and_feedback_go_through_an_authenticating_proxy() {
    if !tinyproxy::available("binary_rows_and_feedback_go_through_an_authenticating_proxy") {
        return;
    }
    let proxy = Tinyproxy::start(Some(("pgpushd", "pass-word")));
    let db = TestDb::new().await;
    let setup = Setup::new(|_| {}).await;
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    setup
        .emulator
        .add_feedback(&hex::decode(token(7)).unwrap(), at);
    // The app's own key; the password percent-encoded (needlessly, for `-`: tinyproxy's
    // config takes no `@` or `:`), which the daemon must decode.
    let app = setup.app_toml(Identity::EncryptedPem).replacen(
        "[apps.default]\n",
        &format!(
            "[apps.default]\nproxy = \"{}\"\n",
            proxy.url_with("pgpushd", "pass%2Dword")
        ),
        1,
    );
    let daemon = start_binary(config(&db.url, &app));
    let client = db.client().await;
    let recorded: Vec<(String, SystemTime)> =
        wait_for("the feedback recorded", DEADLINE, || async {
            let rows = client
                .query(
                    "SELECT device_token, unregistered_at FROM pgpushd.unregistered_tokens",
                    &[],
                )
                .await
                .unwrap();
            (rows.len() == 1).then(|| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await;
    assert_eq!(recorded, [(token(7), at)]);
    insert_rows(&client, 100, 50).await;
    wait_for_status(&client, "sent", 50, DEADLINE).await;
    daemon.stop().await;

    assert_eq!(taken(&setup.emulator).len(), 50);
    let gateway = format!("localhost:{}", setup.emulator.addr().port());
    let feedback = format!(
        "localhost:{}",
        setup.emulator.feedback_addr().unwrap().port()
    );
    let connects = proxy.connects();
    assert!(connects.contains(&gateway), "{connects:?}");
    assert!(connects.contains(&feedback), "{connects:?}");
    assert!(
        connects.iter().all(|c| *c == gateway || *c == feedback),
        "{connects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_proxy_credentials_keep_rows_pending_until_a_reload_fixes_them() {
    if !tinyproxy::available(
        "refused_proxy_credentials_keep_rows_pending_until_a_reload_fixes_them",
    ) {
        return;
    }
    let proxy = Tinyproxy::start(Some(("pgpushd", "s3cret-right")));
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let metrics = free_port();
    let write = |proxy_url: &str| {
        write_config(
            apns.dir.path(),
            &db.url,
            "",
            &format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{}\n[network]\nproxy = \"{proxy_url}\"\n",
                apns.app_toml
            ),
        )
    };
    let client = db.client().await;
    insert_rows(&client, 1, 20).await;
    let log = apns.dir.path().join("daemon.log");

    // No credentials: the proxy answers 407, which /healthz repeats.
    let path = write(&proxy.url());
    let mut daemon = spawn(&path, &[], &log);
    let refusal = format!(
        "proxy 127.0.0.1:{} refused CONNECT {}: ",
        proxy.port,
        apns.emulator.addr()
    );
    let healthz = |says: String| {
        let refusal = refusal.clone();
        wait_for("/healthz to say why", DEADLINE, move || {
            let says = format!("{refusal}{says}");
            async move {
                // No answer yet: the daemon is starting.
                let (status, body) = try_http_get(metrics, "/healthz").ok()?;
                (status == 503 && body.contains(&says)).then_some(body)
            }
        })
    };
    healthz("407 Proxy Authentication Required".into()).await;
    let (_, body) = http_get(metrics, "/metrics");
    assert!(
        body.lines()
            .any(|l| l == r#"pgpushd_app_healthy{app="default"} 0"#),
        "{body}"
    );
    // The rows wait: pending, no attempt counted, the reason in last_error.
    wait_for("the rows to say why they wait", DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'pending'),
                        count(*) FILTER (WHERE last_error LIKE '%407 Proxy Authentication Required%'),
                        coalesce(sum(attempts), 0)
                   FROM pgpushd.outbox",
                &[],
            )
            .await
            .unwrap();
        let (pending, explained, attempts): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((pending, attempts), (20, 0));
        (explained > 0).then_some(())
    })
    .await;

    // Wrong credentials (tinyproxy answers those 401), then the right ones: each reload
    // rebuilds the app although only the password changed.
    write(&proxy.url_with("pgpushd", "s3cret-wrong"));
    signal(&daemon, Signal::SIGHUP);
    healthz("401 Unauthorized".into()).await;
    assert_eq!(count(&client, "pending").await, 20);
    write(&proxy.url_with("pgpushd", "s3cret-right"));
    signal(&daemon, Signal::SIGHUP);
    wait_for_status(&client, "sent", 20, DEADLINE).await;
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    signal(&daemon, Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());

    assert_eq!(count(&client, "failed").await, 0);
    let emulator = apns.emulator.addr().to_string();
    assert!(proxy.connects().iter().all(|c| *c == emulator));
    // The log says why the rows waited, and never shows the credentials.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("407 Proxy Authentication Required"), "{log}");
    for secret in ["s3cret", "cGdwdXNoZDpzM2NyZXQt"] {
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_while_the_proxy_is_down_and_all_arrive_once_it_is_back() {
    if !tinyproxy::available("rows_wait_while_the_proxy_is_down_and_all_arrive_once_it_is_back") {
        return;
    }
    let mut proxy = Tinyproxy::start(None);
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let cfg = config(
        &db.url,
        &format!(
            "{}\n[network]\nproxy = \"{}\"\n",
            apns.app_toml,
            proxy.url()
        ),
    );
    let transport = ApnsSetup::transport(&cfg);
    let daemon = start(cfg, Arc::clone(&transport));
    let client = db.client().await;
    insert_rows(&client, 1, 100).await;
    wait_for_status(&client, "sent", 100, DEADLINE).await;
    let tunnels_before = proxy.connects().len();

    // Killed with its tunnels open: the connections break, and no new one can be had.
    proxy.kill();
    insert_rows(&client, 101, 100).await;
    let down = format!("cannot connect to proxy 127.0.0.1:{}", proxy.port);
    wait_for("the app to say the proxy is down", DEADLINE, || async {
        transport
            .health()
            .into_iter()
            .any(|(_, h)| h.is_err_and(|e| e.contains(&down)))
            .then_some(())
    })
    .await;
    wait_for("the new rows to say why they wait", DEADLINE, || async {
        let explained: i64 = client
            .query_one(
                "SELECT count(*) FROM pgpushd.outbox WHERE status = 'pending' AND last_error LIKE $1",
                &[&format!("%{down}%")],
            )
            .await
            .unwrap()
            .get(0);
        (explained > 0).then_some(())
    })
    .await;
    assert_eq!(count(&client, "sent").await, 100);
    assert_eq!(count(&client, "pending").await, 100);
    assert_eq!(count(&client, "failed").await, 0);

    // Back on the same port: every row arrives, none failed.
    proxy.restart();
    wait_for_status(&client, "sent", 200, DEADLINE).await;
    daemon.stop().await;
    assert_eq!(count(&client, "failed").await, 0);
    let delivered: std::collections::HashSet<String> = apns
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.device_token.clone())
        .collect();
    assert_eq!(delivered.len(), 200);
    assert!(proxy.connects().len() > tunnels_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_and_no_proxy_steer_a_spawned_daemon() {
    if !tinyproxy::available("https_proxy_and_no_proxy_steer_a_spawned_daemon") {
        return;
    }
    let proxy = Tinyproxy::start(None);
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    // The file names no proxy: the environment decides.
    let path = write_config(apns.dir.path(), &db.url, "", &apns.app_toml);
    let client = db.client().await;
    let log = apns.dir.path().join("daemon.log");
    let emulator = apns.emulator.addr().to_string();

    // HTTPS_PROXY, and a NO_PROXY that lists other hosts: through the proxy.
    insert_rows(&client, 1, 20).await;
    let mut daemon = spawn(
        &path,
        &[
            ("HTTPS_PROXY", &proxy.url()),
            ("NO_PROXY", "localhost,.apple.com,10.0.0.0/8"),
        ],
        &log,
    );
    wait_for_status(&client, "sent", 20, DEADLINE).await;
    signal(&daemon, Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
    let through = proxy.connects();
    assert!(!through.is_empty(), "the proxy was bypassed");
    assert!(through.iter().all(|c| *c == emulator), "{through:?}");

    // no_proxy naming the emulator's address and port: direct, the proxy asked nothing.
    insert_rows(&client, 21, 20).await;
    let mut daemon = spawn(
        &path,
        &[
            ("https_proxy", &proxy.url()),
            ("no_proxy", &format!("example.com, {emulator}")),
        ],
        &log,
    );
    wait_for_status(&client, "sent", 40, DEADLINE).await;
    signal(&daemon, Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
    assert_eq!(proxy.connects(), through);

    // A bad HTTPS_PROXY is a config error naming the variable: exit 78 before any socket.
    let out = pgpushd_command()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env("HTTPS_PROXY", "socks5://u:hunter2@127.0.0.1:1080")
        .env_remove("https_proxy")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTPS_PROXY: socks5:// proxies are not supported"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Browser rows go through the proxy to every push service, whichever protocol each
/// speaks: the HTTP/2 pool's tunnels, the HTTP/1.1 pool's, and the first connection
/// that asks the service which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_push_rows_reach_each_push_service_through_the_proxy() {
    use pgpushd_emulator::webpush::{WebPushEmulator, WebPushEmulatorConfig};

    if !tinyproxy::available("web_push_rows_reach_each_push_service_through_the_proxy") {
        return;
    }
    let proxy = Tinyproxy::start(None);
    let db = TestDb::new().await;
    let h2 = crate::webpush::WebpushSetup::new(|_| {}).await;
    let h1 = WebPushEmulator::start(WebPushEmulatorConfig {
        http1_only: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ca = h2.dir.path().join("webpush-ca.pem");
    let mut both = h2.emulator.ca_pem().to_vec();
    both.extend_from_slice(h1.ca_pem());
    std::fs::write(&ca, both).unwrap();
    let cfg = config(
        &db.url,
        &format!("{}\n[network]\nproxy = \"{}\"\n", h2.app_toml, proxy.url()),
    );
    let daemon = start(
        cfg.clone(),
        Arc::new(pgpushd::providers::Providers::new(&cfg.apps).unwrap()),
    );
    let client = db.client().await;
    for i in 0..20 {
        for sub in [h2.subscribe(), h1.subscribe(Some(&h2.public_key)).unwrap()] {
            client
                .execute(
                    "INSERT INTO pgpushd.outbox (app, device_token, payload)
                     VALUES ('web', $1, jsonb_build_object('n', $2::int))",
                    &[&sub.to_json(), &i],
                )
                .await
                .unwrap();
        }
    }
    wait_for_status(&client, "sent", 40, Duration::from_secs(30)).await;
    daemon.stop().await;
    let connects = proxy.connects();
    let targets = [h2.emulator.addr().to_string(), h1.addr().to_string()];
    assert!(connects.iter().all(|c| targets.contains(c)), "{connects:?}");
    for target in &targets {
        assert!(
            connects.contains(target),
            "{target} not tunnelled: {connects:?}"
        );
    }
    assert_eq!(h1.records().len(), 20);
    assert_eq!(h2.emulator.records().len(), 20);
    assert_eq!(
        connects.len() as u64,
        h2.emulator.stats().connections_accepted + h1.stats().connections_accepted,
        "every connection a push service accepted came through the proxy: {connects:?}"
    );
}
