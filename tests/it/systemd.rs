//! The files in `systemd/`: the example config parses and documents the defaults, the
//! unit hands the service the credentials of every setup the docs describe (and needs no
//! file a setup may lack), and the unit's hardening keeps `systemd-analyze security` at
//! 2.0 or below.

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

    // The one credential line, and no alternatives to uncomment: every setup is served.
    assert_eq!(
        load_credentials(&unit),
        [(
            "credentials".to_owned(),
            PathBuf::from(CREDENTIALS_DIRECTORY)
        )]
    );
    assert!(!unit.contains("#LoadCredential"), "{unit}");
    let key_file = match &example().apps["default"].auth {
        Auth::Token(t) => t.key_file.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key_file,
        Path::new("/run/credentials/pgpushd.service/credentials_AuthKey_ABC123DEFG.p8")
    );
}

/// Where the admin puts every credential file; postinst creates it (tests/it/packaging.rs).
pub const CREDENTIALS_DIRECTORY: &str = "/etc/pgpushd/credentials";
/// Where systemd puts a service's credentials, and where the service reads them.
const RUN_CREDENTIALS: &str = "/run/credentials/pgpushd.service";

/// The unit's `LoadCredential=ID:PATH` lines, comments left out.
pub fn load_credentials(unit: &str) -> Vec<(String, PathBuf)> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
        .map(|v| {
            let (id, path) = v.split_once(':').unwrap_or((v, v));
            (id.to_owned(), PathBuf::from(path))
        })
        .collect()
}

/// What the unit puts in `/run/credentials/pgpushd.service/` when the files `installed`
/// exist and no others, as systemd 252's `LoadCredential=` does (systemd.exec(5)): a file
/// `ID:PATH` is loaded as `ID`, and fails the start (243/CREDENTIALS) when missing; a
/// directory's every regular file is loaded as `ID_` and its path in the directory, `/`
/// made `_`. Our directory always exists (the package creates it, tests/it/packaging.rs).
/// An error names a source the setup lacks.
fn loaded(
    credentials: &[(String, PathBuf)],
    installed: &[PathBuf],
) -> Result<Vec<PathBuf>, String> {
    let mut loaded = Vec::new();
    for (id, source) in credentials {
        if source == Path::new(CREDENTIALS_DIRECTORY) {
            for file in installed {
                if let Ok(inside) = file.strip_prefix(source) {
                    let name = inside.to_str().unwrap().replace('/', "_");
                    loaded.push(Path::new(RUN_CREDENTIALS).join(format!("{id}_{name}")));
                }
            }
        } else if installed.contains(source) {
            loaded.push(Path::new(RUN_CREDENTIALS).join(id));
        } else {
            return Err(format!(
                "LoadCredential={id}:{} names a file this setup does not have: the unit \
                 fails to start with 243/CREDENTIALS",
                source.display()
            ));
        }
    }
    Ok(loaded)
}

/// The example config with only the apps named, each one active: the shipped
/// `[apps.default]` as it is, the commented ones (`# [apps.legacy]`, ...) uncommented.
fn example_with_apps(apps: &[&str]) -> String {
    let (_, text) = file("pgpushd.toml");
    let mut out = String::new();
    // The app whose lines these are, and whether it is commented out in the file.
    let mut app: Option<(String, bool)> = None;
    for line in text.lines() {
        let uncommented = line.strip_prefix("# ");
        let header = |l: &str| {
            l.strip_prefix("[apps.")
                .map(|rest| rest.split(['.', ']']).next().unwrap().to_owned())
        };
        if let Some(name) = header(line) {
            app = Some((name, false));
        } else if let Some(name) = uncommented.and_then(header) {
            app = Some((name, true));
        } else if line.starts_with('[') {
            app = None; // [network], [metrics], ...
        }
        match &app {
            None => out.push_str(line),
            Some((name, _)) if !apps.contains(&name.as_str()) => continue,
            Some((_, false)) => out.push_str(line),
            Some((_, true)) => {
                // `# key = value`, `# [table]` and `# # comment` come alive; prose stays.
                let live = uncommented.filter(|l| {
                    l.starts_with('[')
                        || l.starts_with("# ")
                        || l.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })
                });
                out.push_str(live.unwrap_or(line));
            }
        }
        out.push('\n');
    }
    out
}

/// Every file an app's auth reads.
fn credential_files(config: &Config) -> Vec<PathBuf> {
    config
        .apps
        .values()
        .flat_map(|app| match &app.auth {
            Auth::Token(t) => vec![t.key_file.clone()],
            Auth::Certificate(c) => [Some(c.file.clone()), c.passphrase_file.clone()]
                .into_iter()
                .flatten()
                .collect(),
            Auth::Fcm(f) => vec![f.service_account_file.clone()],
            Auth::Webpush(w) => vec![w.key_file.clone()],
        })
        .collect()
}

/// Issue 20, item 11: each documented setup starts. The example config's apps, alone and
/// together, are the setups the docs describe: an APNs token key, an APNs certificate
/// and its passphrase, a binary-protocol certificate, an FCM service account. For each,
/// the admin installs exactly the files its config names (as the docs say: FILE in
/// /etc/pgpushd/credentials/, named /run/credentials/pgpushd.service/credentials_FILE),
/// and the unit must then need no other file and hand the service every one of them.
#[test]
fn every_documented_setup_gets_its_credentials_and_needs_no_other() {
    let (_, unit) = file("pgpushd.service");
    let credentials = load_credentials(&unit);
    let setups: [(&str, &[&str]); 5] = [
        ("an APNs token key (the example as shipped)", &["default"]),
        ("an APNs certificate and passphrase", &["legacy"]),
        ("the binary protocol's certificate", &["gateway"]),
        ("an FCM service account alone", &["android"]),
        ("all of them", &["default", "legacy", "gateway", "android"]),
    ];
    for (setup, apps) in setups {
        let text = example_with_apps(apps);
        let config = Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), &text, None)
            .unwrap_or_else(|e| panic!("{setup}: {e}\n{text}"));
        let mut names: Vec<&str> = config.apps.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut wanted = apps.to_vec();
        wanted.sort_unstable();
        assert_eq!(names, wanted, "{setup}");
        let needed = credential_files(&config);
        assert!(!needed.is_empty(), "{setup}");
        // What the admin installs: each file the config names, by the documented rule.
        let installed: Vec<PathBuf> = needed
            .iter()
            .map(|p| {
                let file = p
                    .to_str()
                    .and_then(|p| p.strip_prefix(RUN_CREDENTIALS))
                    .and_then(|f| f.strip_prefix("/credentials_"))
                    .unwrap_or_else(|| {
                        panic!(
                            "{setup}: {} is not {RUN_CREDENTIALS}/credentials_FILE",
                            p.display()
                        )
                    });
                Path::new(CREDENTIALS_DIRECTORY).join(file)
            })
            .collect();
        let loaded = loaded(&credentials, &installed).unwrap_or_else(|e| panic!("{setup}: {e}"));
        for path in &needed {
            assert!(
                loaded.contains(path),
                "{setup}: the unit does not provide {}",
                path.display()
            );
        }
    }
    // The unit of earlier packages loaded the example key by name: each setup but the one
    // with exactly that file failed to start.
    let earlier = [(
        "AuthKey.p8".to_owned(),
        PathBuf::from("/etc/pgpushd/AuthKey_ABC123DEFG.p8"),
    )];
    assert!(loaded(
        &earlier,
        &[PathBuf::from("/etc/pgpushd/credentials/fcm.json")]
    )
    .is_err());
    assert!(loaded(
        &earlier,
        &[PathBuf::from("/etc/pgpushd/AuthKey_ABC123DEFG.p8")]
    )
    .is_ok());
}

/// Every credential path the docs write for the unit follows its rule, so no page tells
/// an admin to name a copy the unit never makes.
#[test]
fn the_docs_name_credentials_as_the_unit_loads_them() {
    let (_, unit) = file("pgpushd.service");
    let prefixes: Vec<String> = load_credentials(&unit)
        .iter()
        .map(|(id, _)| format!("{RUN_CREDENTIALS}/{id}_"))
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages: Vec<PathBuf> = [
        "README.md",
        "systemd/pgpushd.toml",
        "systemd/pgpushd.service",
        "pkg/deb/postinst",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut seen = 0;
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        for (at, _) in text.match_indices(&format!("{RUN_CREDENTIALS}/")) {
            let rest = &text[at..];
            let path: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'`),".contains(*c))
                .collect();
            if path.len() == RUN_CREDENTIALS.len() + 1 {
                continue; // the directory itself
            }
            seen += 1;
            assert!(
                prefixes.iter().any(|p| path.starts_with(p.as_str())),
                "{}: {path} is not a credential the unit loads ({prefixes:?})",
                page.display()
            );
        }
    }
    assert!(seen >= 8, "{seen}");
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
    // The database (64 batches + 7), the metrics listener's cap (64) and a dozen apps of
    // 64 connections: well within, and above systemd's default soft limit of 1024.
    let worst_case_of_a_big_config = 71 + 64 + 12 * 65;
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

/// A unit's directives (comments and blank lines aside), in order.
fn directives(unit: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The template is the unit for one instance of several: the same directives, the same
/// hardening, but the config, the credentials and the name it says.
#[test]
fn the_template_unit_is_the_unit_with_an_instance_s_config_and_credentials() {
    let (_, unit) = file("pgpushd.service");
    let (_, template) = file("pgpushd@.service");
    let per_instance = |line: String| match line.split_once('=') {
        Some(("Description", d)) => format!(
            "Description={}",
            d.replacen("pgpushd:", "pgpushd for %i:", 1)
        ),
        Some(("ExecStart", e)) => format!(
            "ExecStart={}",
            e.replace("/etc/pgpushd/pgpushd.toml", "/etc/pgpushd/%i.toml")
        ),
        Some(("LoadCredential", _)) => {
            "LoadCredential=credentials:/etc/pgpushd/%i.credentials".to_owned()
        }
        _ => line,
    };
    let expected: Vec<String> = directives(&unit).into_iter().map(per_instance).collect();
    assert_eq!(directives(&template), expected);
}

/// `systemd-analyze verify` finds nothing to say about either unit (an unknown key, a
/// bad value, a missing command all make it speak), with the binary where the test
/// built it; and the template's instances are hardened as the unit is.
#[test]
fn both_units_verify_cleanly_and_an_instance_is_hardened() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return crate::support::skip_without("systemd-analyze");
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_pgpushd");
    for (name, installed) in [
        ("pgpushd.service", "pgpushd.service"),
        ("pgpushd@.service", "pgpushd@orders.service"),
    ] {
        let (_, text) = file(name);
        let path = dir.path().join(installed);
        std::fs::write(&path, text.replace("/usr/bin/pgpushd", binary)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", "--threshold=20"])
        .arg(dir.path().join("pgpushd@orders.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Overall exposure level for pgpushd@orders.service"),
        "{text}"
    );
}
