//! The files in `systemd/`: the example config parses and documents the defaults, the
//! unit and the config name the same credentials, and the unit's hardening keeps
//! `systemd-analyze security` at 2.0 or below.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgpushd::config::{Auth, Config, RetentionConfig};

fn file(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

fn example() -> Config {
    let (_, text) = file("pgpushd.toml");
    Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), &text, None)
        .unwrap_or_else(|e| panic!("systemd/pgpushd.toml: {e}"))
}

#[test]
fn the_example_config_parses_and_shows_the_defaults() {
    let c = example();
    let defaults = Config::from_file_str(
        Path::new("/etc/pgpushd/pgpushd.toml"),
        "[database]\nurl = \"postgres://x@y/z\"\n[apps.default.token]\nkey_file = \"k\"\n\
         key_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n",
        None,
    )
    .unwrap();
    let (d, e) = (&defaults.database, &c.database);
    assert_eq!(e.listen_url, None);
    assert_eq!(e.poll_interval, d.poll_interval);
    assert_eq!(e.batch_size, d.batch_size);
    assert_eq!(e.max_batches_in_flight, d.max_batches_in_flight);
    assert_eq!(e.keepalive_interval, d.keepalive_interval);
    assert_eq!(e.connect_timeout, d.connect_timeout);
    assert_eq!(c.retry, defaults.retry);
    let (d, e) = (&defaults.apps["default"], &c.apps["default"]);
    assert_eq!(e.endpoint, d.endpoint);
    assert_eq!(e.protocol, d.protocol);
    assert_eq!(e.connections, d.connections);
    assert_eq!(e.request_timeout, d.request_timeout);
    assert_eq!(c.metrics.listen, None);
    assert_eq!(c.daemon, defaults.daemon);
    assert_eq!(c.log, defaults.log);
    // Deleting rows is opt-in.
    assert_eq!(c.retention, RetentionConfig::default());
    assert!(!c.retention.is_enabled());
    assert_eq!(c.apps.len(), 1);
}

#[test]
fn the_unit_and_the_example_config_agree() {
    let (_, unit) = file("pgpushd.service");
    let (_, toml) = file("pgpushd.toml");
    let setting = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(setting("Type"), ["notify"]);
    assert_eq!(
        setting("ExecStart"),
        ["/usr/bin/pgpushd run --config /etc/pgpushd/pgpushd.toml"]
    );
    assert_eq!(setting("RestartPreventExitStatus"), ["78"]);
    // Longer than the daemon's default drain, so systemd does not SIGKILL a drain.
    let stop = humantime::parse_duration(setting("TimeoutStopSec")[0]).unwrap();
    assert!(stop > Duration::from_secs(20), "{stop:?}");
    assert!(toml.contains("TimeoutStopSec (30s)"));

    // Every credential the unit loads (or shows, commented) is where the config looks.
    let mut credentials = setting("LoadCredential");
    credentials.extend(setting("#LoadCredential"));
    assert_eq!(credentials.len(), 3, "{credentials:?}");
    for c in credentials {
        let name = c.split(':').next().unwrap();
        let path = format!("\"/run/credentials/pgpushd.service/{name}\"");
        assert!(
            toml.contains(&path),
            "the example config never names {path}"
        );
    }
    let key_file = match &example().apps["default"].auth {
        Auth::Token(t) => t.key_file.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key_file,
        Path::new("/run/credentials/pgpushd.service/AuthKey.p8")
    );
}

#[test]
fn the_unit_sets_a_descriptor_limit_with_room_to_spare() {
    let (_, unit) = file("pgpushd.service");
    let limits: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("LimitNOFILE="))
        .collect();
    assert_eq!(limits.len(), 1, "{limits:?}");
    let limit: u64 = limits[0].parse().expect("one number, soft and hard alike");
    // The database (64 batches + 2), the metrics listener's cap (64) and a dozen apps of
    // 64 connections: well within, and above systemd's default soft limit of 1024.
    let worst_case_of_a_big_config = 66 + 64 + 12 * 65;
    assert!(limit >= 4 * worst_case_of_a_big_config, "{limit}");
    assert!(limit > 1024, "{limit}");
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_2_or_less() {
    let (path, _) = file("pgpushd.service");
    let run = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", "--threshold=20"])
        .arg(&path)
        .output();
    let out = match run {
        Ok(out) => out,
        Err(_) => return crate::support::skip_without("systemd-analyze"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Overall exposure level"), "{text}");
}
